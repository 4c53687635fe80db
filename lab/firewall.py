"""The firewall Docker Engine >= 28 installs, rebuilt inside the lab's VM.

What matters for a tunnel is what Docker 28 drops:

- filter: FORWARD policy DROP; traffic may enter a bridge only from that same
  bridge or as a reply (DOCKER-CT); traffic between two bridges is dropped by
  the isolation chains; DOCKER-USER is empty and runs first, the one place
  where users (and the VM side of fastfwd) are meant to add ACCEPTs.
- raw: a packet for a container that arrives on any interface other than
  the container's bridge is dropped before routing ("direct routing"
  protection), which is exactly what tunnel traffic from a TUN device is.
- nat: bridge traffic leaving by any other interface is masqueraded.

The rules are added with plain `iptables` commands, one rule per command, in
the order Docker creates them, so they land in whichever backend (nft or
legacy) that binary drives, as they would on a real VM.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .netns import LabError, exec_argv, run_cmd

if TYPE_CHECKING:
    from .topology import Bridge, Container

log = logging.getLogger(__name__)

FILTER_CHAINS = (
    "DOCKER",
    "DOCKER-USER",
    "DOCKER-FORWARD",
    "DOCKER-CT",
    "DOCKER-BRIDGE",
    "DOCKER-ISOLATION-STAGE-1",
    "DOCKER-ISOLATION-STAGE-2",
)
SAVED_TABLES = ("filter", "raw", "nat", "mangle")


@dataclass(frozen=True)
class Iptables:
    """One iptables binary and the iptables-save that matches it.

    Attributes:
        path: absolute path of the iptables binary.
        save_path: absolute path of its iptables-save.
        backend: "nf_tables" or "legacy", as `iptables --version` reports.
        version: the full first line of `iptables --version`.
    """

    path: str
    save_path: str
    backend: str
    version: str


def find_iptables(name: str = "iptables") -> Iptables:
    """Locate `name` (e.g. "iptables", "iptables-legacy") and its backend.

    Raises:
        LabError: the binary or its -save companion is not installed.
    """
    path = shutil.which(name)
    save_path = shutil.which(f"{name}-save")
    if path is None or save_path is None:
        raise LabError(
            f"{name} or {name}-save not found on PATH; install the iptables package"
        )
    version = run_cmd([path, "--version"]).stdout.strip().splitlines()[0]
    match = re.search(r"\((nf_tables|legacy)\)", version)
    # LIMIT: iptables older than 1.8 prints no backend; it can only be legacy.
    backend = match.group(1) if match else "legacy"
    return Iptables(path=path, save_path=save_path, backend=backend, version=version)


def docker_rules(
    bridges: Iterable[Bridge], containers: Iterable[Container]
) -> list[list[str]]:
    """The iptables argument lists Docker 28 would run for this topology.

    Pure: nothing is executed. Each item is the argv after the binary name.
    """
    bridges = list(bridges)
    rules: list[list[str]] = [["-t", "filter", "-P", "FORWARD", "DROP"]]
    rules += [["-t", "filter", "-N", chain] for chain in FILTER_CHAINS]
    rules += [
        ["-t", "filter", "-A", "FORWARD", "-j", "DOCKER-USER"],
        ["-t", "filter", "-A", "FORWARD", "-j", "DOCKER-FORWARD"],
        ["-t", "filter", "-A", "DOCKER-FORWARD", "-j", "DOCKER-CT"],
        ["-t", "filter", "-A", "DOCKER-FORWARD", "-j", "DOCKER-ISOLATION-STAGE-1"],
        ["-t", "filter", "-A", "DOCKER-FORWARD", "-j", "DOCKER-BRIDGE"],
    ]
    for br in bridges:
        name = br.name
        rules += [
            ["-t", "filter", "-A", "DOCKER-FORWARD", "-i", name, "-j", "ACCEPT"],
            ["-t", "filter", "-A", "DOCKER-CT", "-o", name, "-m", "conntrack",
             "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
            ["-t", "filter", "-A", "DOCKER-BRIDGE", "-o", name, "-j", "DOCKER"],
            ["-t", "filter", "-A", "DOCKER", "!", "-i", name, "-o", name,
             "-j", "DROP"],
            ["-t", "filter", "-A", "DOCKER-ISOLATION-STAGE-1", "-i", name,
             "!", "-o", name, "-j", "DOCKER-ISOLATION-STAGE-2"],
            ["-t", "filter", "-A", "DOCKER-ISOLATION-STAGE-2", "-o", name,
             "-j", "DROP"],
            ["-t", "nat", "-A", "POSTROUTING", "-s", str(br.subnet), "!", "-o",
             name, "-j", "MASQUERADE"],
        ]  # fmt: skip
    for c in containers:
        rules.append(
            ["-t", "raw", "-A", "PREROUTING", "-d", f"{c.ip}/32", "!", "-i",
             c.bridge.name, "-j", "DROP"]
        )  # fmt: skip
    return rules


def install_docker_firewall(
    ns: str,
    tool: Iptables,
    bridges: Iterable[Bridge],
    containers: Iterable[Container],
) -> int:
    """Install Docker 28's rules in namespace `ns`; return how many ran.

    Expects a fresh namespace (empty tables): the rules are appended, not
    checked for duplicates.
    """
    rules = docker_rules(bridges, containers)
    for args in rules:
        run_iptables(ns, tool, *args)
    log.debug("docker firewall installed ns=%s rules=%d", ns, len(rules))
    return len(rules)


def run_iptables(ns: str, tool: Iptables, *args: str) -> str:
    """Run `tool` with `args` inside `ns` and return its stdout.

    Adds `-w` (wait for the xtables lock) unless the caller passed it: the
    legacy backend's lock file is shared by every namespace on the machine.
    """
    wait = [] if "-w" in args or "--wait" in args else ["-w"]
    return run_cmd(exec_argv(ns, [tool.path, *wait, *args])).stdout


def save_tables(ns: str, tool: Iptables) -> dict[str, str]:
    """`iptables-save` of each table in SAVED_TABLES, made comparable.

    Comment lines (with their timestamps) are dropped and packet counters
    zeroed, so two saves of the same rules compare equal.
    """
    tables = {}
    for table in SAVED_TABLES:
        out = run_cmd(exec_argv(ns, [tool.save_path, "-t", table])).stdout
        lines = []
        for line in out.splitlines():
            if line.startswith("#"):
                continue
            lines.append(re.sub(r" \[\d+:\d+\]$", " [0:0]", line))
        tables[table] = "\n".join(lines) + "\n" if lines else ""
    return tables
