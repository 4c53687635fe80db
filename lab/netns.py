"""Network namespace primitives for the lab: commands, links and /etc/netns.

The lab shells out to iproute2 rather than using pyroute2: it is test
infrastructure, and `ip netns exec` already does the mount-namespace and
/etc/netns bind-mount work that a test process wants for name resolution.

Nothing here decides names; callers pass fully prefixed names, and every
interface name goes through `check_ifname` before the kernel sees it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

IFNAMSIZ_CHARS = 15  # the kernel's IFNAMSIZ (16) minus the terminating NUL
NETNS_ETC = Path("/etc/netns")
DEFAULT_TIMEOUT_S = 30.0


class LabError(Exception):
    """The lab could not be built, used or torn down as asked."""


class CommandError(LabError, subprocess.CalledProcessError):
    """A command the lab ran exited non-zero; the message carries its stderr.

    It is also a `subprocess.CalledProcessError`, so callers used to
    `subprocess.run(check=True)` can catch either.
    """

    def __init__(self, returncode, cmd, output=None, stderr=None):
        subprocess.CalledProcessError.__init__(self, returncode, cmd, output, stderr)

    def __str__(self) -> str:
        why = (self.stderr or self.stdout or "").strip().splitlines()
        reason = why[-1] if why else "no output"
        return f"command failed rc={self.returncode}: {' '.join(self.cmd)}: {reason}"


def check_ifname(name: str) -> str:
    """Return `name` if the kernel accepts it as an interface name.

    Raises:
        LabError: the name is empty, too long or has a character that
            iproute2 or the kernel refuse.
    """
    if not name or len(name) > IFNAMSIZ_CHARS:
        raise LabError(
            f"interface name {name!r} has {len(name)} characters; "
            f"the kernel allows 1 to {IFNAMSIZ_CHARS}"
        )
    if "/" in name or any(c.isspace() for c in name) or name in (".", ".."):
        raise LabError(f"interface name {name!r} has a forbidden character")
    return name


def run_cmd(
    argv: Sequence[object],
    *,
    check: bool = True,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    input: str | None = None,
    cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `argv` with text output captured (`cwd`, `env` as for Popen).

    Raises:
        CommandError: `check` is set and the command exited non-zero.
        subprocess.TimeoutExpired: it ran longer than `timeout` (it is
            killed first).
    """
    cmd = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv]
    log.debug("run cmd=%s", cmd)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, input=input,
        cwd=cwd, env=env,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


def exec_argv(ns: str, argv: Sequence[object]) -> list[str]:
    """Return the argv that runs `argv` inside namespace `ns`.

    `ip netns exec` execs the command in place (no extra process), keeps
    the working directory and environment, and bind-mounts the files of
    /etc/netns/<ns>/ over /etc.
    """
    return ["ip", "netns", "exec", ns, *(str(a) for a in argv)]


def ip(ns: str | None, *args: object, check: bool = True) -> str:
    """Run `ip [-n ns] args...` and return its stdout."""
    argv: list[object] = ["ip"]
    if ns is not None:
        argv += ["-n", ns]
    return run_cmd([*argv, *args], check=check).stdout


def list_namespaces() -> list[str]:
    """Names of every namespace under /run/netns."""
    out = run_cmd(["ip", "netns", "list"]).stdout
    # lines look like "name" or "name (id: 3)"
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def add_namespace(name: str) -> None:
    """Create namespace `name` and bring its loopback up."""
    run_cmd(["ip", "netns", "add", name])
    ip(name, "link", "set", "lo", "up")


def delete_namespace(name: str) -> bool:
    """Delete namespace `name`; return False when it did not exist.

    The kernel frees the namespace, and every interface in it, once the
    last process inside has exited, so callers stop those first.
    """
    if name not in list_namespaces():
        return False
    run_cmd(["ip", "netns", "delete", name])
    return True


def namespace_pids(name: str) -> list[int]:
    """PIDs of the processes that live in namespace `name`."""
    proc = run_cmd(["ip", "netns", "pids", name], check=False)
    if proc.returncode != 0:
        return []
    return [int(tok) for tok in proc.stdout.split()]


def link_names(ns: str | None = None) -> list[str]:
    """Names of the links in `ns` (the root namespace when None)."""
    links = json.loads(ip(ns, "-j", "link", "show") or "[]")
    return [link["ifname"] for link in links]


def add_veth(name: str, ns: str, peer: str, peer_ns: str, mtu: int) -> None:
    """Create a veth pair with each end born directly in its namespace.

    Creating the peer straight in `peer_ns` avoids a name clash in `ns`
    (a container's end is called eth0, like the VM's own uplink).
    """
    check_ifname(name)
    check_ifname(peer)
    ip(ns, "link", "add", name, "mtu", mtu, "type", "veth",
       "peer", "name", peer, "mtu", mtu, "netns", peer_ns)  # fmt: skip


def kernel_state(ns: str) -> dict:
    """Links, IPv4 addresses, IPv4 routes and ip_forward of namespace `ns`.

    Every list is sorted, so that two states compare equal when the kernel
    holds the same things: "links" (names), "addresses" ("dev addr/len"),
    "routes" (lines of `ip route show table all`), "ip_forward" ("0"/"1").

    LIMIT: IPv4 only. IPv6 link-local addresses and routes appear
    asynchronously after a link comes up, which would make comparisons
    flaky; a tunnel that installs IPv6 state needs its own check.
    """
    addresses = []
    for link in json.loads(ip(ns, "-4", "-j", "addr", "show") or "[]"):
        for a in link.get("addr_info", []):
            addresses.append(f"{link['ifname']} {a['local']}/{a['prefixlen']}")
    routes = ip(ns, "-4", "route", "show", "table", "all").splitlines()
    return {
        "links": sorted(link_names(ns)),
        "addresses": sorted(addresses),
        "routes": sorted(line.strip() for line in routes if line.strip()),
        "ip_forward": get_sysctl(ns, "net.ipv4.ip_forward"),
    }


def set_sysctl(ns: str, key: str, value: object) -> None:
    """Set sysctl `key` inside namespace `ns`."""
    run_cmd(exec_argv(ns, ["sysctl", "-q", "-w", f"{key}={value}"]))


def get_sysctl(ns: str, key: str) -> str:
    """Read sysctl `key` inside namespace `ns`."""
    return run_cmd(exec_argv(ns, ["sysctl", "-n", key])).stdout.strip()


def write_netns_etc(ns: str, files: dict[str, str]) -> Path:
    """Write files that `ip netns exec ns` bind-mounts over /etc/<file>.

    Returns the directory written, which the caller removes at teardown.
    """
    directory = NETNS_ETC / ns
    for attempt in range(3):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            break
        except FileNotFoundError:
            # another lab removed an empty /etc/netns between our two mkdirs
            if attempt == 2:
                raise
    for filename, text in files.items():
        (directory / filename).write_text(text)
    return directory


def remove_netns_etc(ns: str, *, remove_parent_if_empty: bool = False) -> bool:
    """Remove /etc/netns/<ns>; return False when there was nothing to remove.

    With `remove_parent_if_empty`, for a caller that created /etc/netns
    itself, also remove /etc/netns when nothing else is left in it.
    """
    directory = NETNS_ETC / ns
    existed = directory.exists()
    if existed:
        shutil.rmtree(directory)
    if remove_parent_if_empty:
        try:
            NETNS_ETC.rmdir()
        except OSError:
            pass  # another namespace still has files there
    return existed
