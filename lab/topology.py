"""The lab: a Docker Desktop VM, its host and its containers in namespaces.

    P-host                P-vm                            P-c1
    P-h 198.18.0.1/30 ==== P-v 198.18.0.2/30
                           P-b1 172.18.0.1/16 -- P-p1 ==== eth0 172.18.0.2
                           P-b2 172.19.0.1/16 -- P-p2 ==== eth0 172.19.0.2
                                                          P-c2

    P-hr 198.18.0.5/30 ==== P-r 198.18.0.6/30    (with remote=True)
                            P-rem: another machine on the host's network

(P is the lab's prefix, `====` a veth pair, `--` a bridge port.)

The host namespace has no route to the bridges (that is the tunnel's job);
the vm namespace forwards and carries Docker 28's firewall; inside the vm
namespace, host.docker.internal resolves to the host's veth address.

Ownership: a Lab owns every namespace, interface, /etc/netns directory and
tracked process whose name or record carries its prefix, and only those.
Its prefix is checked to be unused when chosen, so anything found later
with that prefix is its own.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from . import guard, netns
from .firewall import (
    Iptables,
    find_iptables,
    install_docker_firewall,
    run_iptables,
    save_tables,
)
from .netns import DEFAULT_TIMEOUT_S, NETNS_ETC, LabError, check_ifname, ip
from .processes import STOP_GRACE_S, kill_pid, stop_process

log = logging.getLogger(__name__)

PREFIX_HEAD = "ff"
HOST_DOCKER_INTERNAL = "host.docker.internal"


@dataclass(frozen=True)
class Bridge:
    """A docker network: a Linux bridge in the vm namespace.

    Attributes:
        name: interface name, e.g. "ff1a2b-b1".
        subnet: the network's subnet.
        gateway: the bridge's own address, the containers' default route.
    """

    name: str
    subnet: IPv4Network
    gateway: IPv4Address


@dataclass(frozen=True)
class Container:
    """A container: a namespace whose eth0 is a port of one bridge.

    Attributes:
        name: short name, "c1", "c2", ... in bridge order.
        ns: namespace name, e.g. "ff1a2b-c1".
        ip: address of its eth0.
        bridge: the bridge it is attached to.
        port: the bridge-side veth end, in the vm namespace.
    """

    name: str
    ns: str
    ip: IPv4Address
    bridge: Bridge
    port: str


class Lab:
    """Builds the topology on `build()` (or `with`), removes it on `teardown()`.

    Args:
        bridges: number of docker networks; defaults to len(subnets), or 2.
        containers_per_bridge: containers on each bridge.
        subnets: one CIDR per bridge; default 172.18.0.0/16, 172.19.0.0/16, ...
        underlay: the host<->vm /30; host takes its first address, vm the second.
        mtu: MTU of every veth and bridge.
        docker_firewall: install Docker 28's iptables rules in the vm namespace.
        iptables: the iptables binary to use ("iptables-legacy", ...).
        prefix: name prefix; default "ff" + 4 random hex digits, unused so far.
        remote: add another machine (namespace ``P-rem``) on a veth to the
            host, for accessors; ``remote_underlay`` is that /30.

    Raises:
        ValueError: inconsistent arguments (overlapping subnets, a subnet
            too small for its containers, a malformed prefix).
        LabError: a generated interface name is longer than the kernel
            allows.
    """

    def __init__(
        self,
        bridges: int | None = None,
        containers_per_bridge: int = 1,
        *,
        subnets: Sequence[str] | None = None,
        underlay: str = "198.18.0.0/30",
        mtu: int = 1500,
        docker_firewall: bool = True,
        iptables: str = "iptables",
        prefix: str | None = None,
        remote: bool = False,
        remote_underlay: str = "198.18.0.4/30",
    ) -> None:
        if bridges is None:
            bridges = len(subnets) if subnets is not None else 2
        if subnets is None:
            if not 1 <= bridges <= 14:
                raise ValueError("give subnets= for more than 14 bridges")
            subnets = [f"172.{18 + i}.0.0/16" for i in range(bridges)]
        if len(subnets) != bridges:
            raise ValueError(f"{bridges} bridges need {bridges} subnets, got {subnets}")
        if containers_per_bridge < 0:
            raise ValueError("containers_per_bridge must be >= 0")
        if prefix is not None and not re.fullmatch(r"[a-z0-9]{1,8}", prefix):
            raise ValueError(f"prefix {prefix!r} must be 1-8 of [a-z0-9]")
        self.prefix = prefix or _unused_prefix()
        self.mtu = mtu
        self.docker_firewall = docker_firewall
        self.iptables_name = iptables
        self.tool: Iptables | None = None  # set by build(): the binary used

        self.underlay = IPv4Network(underlay)
        if self.underlay.num_addresses < 4:
            raise ValueError(f"underlay {underlay} has no room for two hosts")
        self.host_ip, self.vm_ip = list(self.underlay.hosts())[:2]
        self.host_ns = f"{self.prefix}-host"
        self.vm_ns = f"{self.prefix}-vm"
        self.host_if = check_ifname(f"{self.prefix}-h")
        self.vm_if = check_ifname(f"{self.prefix}-v")
        self.remote_ns = f"{self.prefix}-rem" if remote else None
        self.remote_underlay = IPv4Network(remote_underlay)
        self.host_remote_ip, self.remote_ip = list(self.remote_underlay.hosts())[:2]
        self.host_remote_if = check_ifname(f"{self.prefix}-hr")
        self.remote_if = check_ifname(f"{self.prefix}-r")

        self.bridges: list[Bridge] = []
        self.containers: list[Container] = []
        taken = [self.underlay] + ([self.remote_underlay] if remote else [])
        for b, cidr in enumerate(subnets, start=1):
            subnet = IPv4Network(cidr)
            if any(subnet.overlaps(other) for other in taken):
                raise ValueError(f"subnet {subnet} overlaps one of {taken}")
            taken.append(subnet)
            hosts = subnet.hosts()
            bridge = Bridge(check_ifname(f"{self.prefix}-b{b}"), subnet, next(hosts))
            self.bridges.append(bridge)
            for _ in range(containers_per_bridge):
                n = len(self.containers) + 1
                addr = next(hosts, None)
                if addr is None:
                    raise ValueError(f"subnet {subnet} is too small for its containers")
                port = check_ifname(f"{self.prefix}-p{n}")
                c = Container(f"c{n}", f"{self.prefix}-c{n}", addr, bridge, port)
                self.containers.append(c)

        self._owner_pid = os.getpid()
        self._state = "new"  # new -> building -> built -> torn down
        self._created_ns: list[str] = []
        self._etc_dirs: list[str] = []
        self._made_netns_etc = False
        self._procs: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"<Lab prefix={self.prefix} state={self._state}>"

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of the lab: host, vm, then the containers."""
        extra = [self.remote_ns] if self.remote_ns else []
        return [self.host_ns, self.vm_ns, *(c.ns for c in self.containers), *extra]

    # lifecycle

    def __enter__(self) -> Lab:
        return self.build()

    def __exit__(self, *exc_info) -> None:
        self.teardown()

    def build(self) -> Lab:
        """Create the whole topology; on any failure, remove what was made.

        Returns the lab itself. Building a built lab does nothing.

        Raises:
            LabError: a command failed (the message names it and its stderr),
                or the lab was already torn down.
        """
        if self._state == "built":
            return self
        if self._state != "new":
            raise LabError(f"lab {self.prefix} was torn down; make a new Lab")
        self.tool = find_iptables(self.iptables_name)
        guard.register(self)
        self._state = "building"
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        self._state = "built"
        log.info("lab built prefix=%s namespaces=%d", self.prefix, len(self.namespaces))
        return self

    def _build(self) -> None:
        for ns in self.namespaces:
            self._created_ns.append(ns)  # before: a half-made one is removed too
            netns.add_namespace(ns)

        # underlay: host <-> vm
        netns.add_veth(self.host_if, self.host_ns, self.vm_if, self.vm_ns, self.mtu)
        plen = self.underlay.prefixlen
        ip(self.host_ns, "addr", "add", f"{self.host_ip}/{plen}", "dev", self.host_if)
        ip(self.vm_ns, "addr", "add", f"{self.vm_ip}/{plen}", "dev", self.vm_if)
        ip(self.host_ns, "link", "set", self.host_if, "up")
        ip(self.vm_ns, "link", "set", self.vm_if, "up")
        netns.set_sysctl(self.vm_ns, "net.ipv4.ip_forward", 1)

        if self.remote_ns:
            netns.add_veth(
                self.host_remote_if, self.host_ns, self.remote_if, self.remote_ns,
                self.mtu,
            )  # fmt: skip
            plen = self.remote_underlay.prefixlen
            for ns, ifname, addr in (
                (self.host_ns, self.host_remote_if, self.host_remote_ip),
                (self.remote_ns, self.remote_if, self.remote_ip),
            ):
                ip(ns, "addr", "add", f"{addr}/{plen}", "dev", ifname)
                ip(ns, "link", "set", ifname, "up")

        # docker networks
        for br in self.bridges:
            ip(self.vm_ns, "link", "add", br.name, "mtu", self.mtu, "type", "bridge")
            cidr = f"{br.gateway}/{br.subnet.prefixlen}"
            ip(self.vm_ns, "addr", "add", cidr, "dev", br.name)
            ip(self.vm_ns, "link", "set", br.name, "up")

        # containers
        for c in self.containers:
            netns.add_veth(c.port, self.vm_ns, "eth0", c.ns, self.mtu)
            ip(self.vm_ns, "link", "set", c.port, "master", c.bridge.name, "up")
            cidr = f"{c.ip}/{c.bridge.subnet.prefixlen}"
            ip(c.ns, "addr", "add", cidr, "dev", "eth0")
            ip(c.ns, "link", "set", "eth0", "up")
            ip(c.ns, "route", "add", "default", "via", c.bridge.gateway)

        # name resolution inside the vm, for `ip netns exec` users
        files = {
            "hosts": f"127.0.0.1 localhost\n{self.host_ip} {HOST_DOCKER_INTERNAL}\n"
        }
        if os.path.exists("/etc/resolv.conf"):
            # ip netns exec warns on every run when the bind target is missing
            files["resolv.conf"] = "nameserver 127.0.0.1\n"
        self._made_netns_etc = self._made_netns_etc or not NETNS_ETC.exists()
        self._etc_dirs.append(self.vm_ns)
        netns.write_netns_etc(self.vm_ns, files)

        if self.docker_firewall:
            install_docker_firewall(
                self.vm_ns, self.tool, self.bridges, self.containers
            )

    def teardown(self) -> None:
        """Stop tracked processes and remove everything the lab created.

        Idempotent, and safe after a partial build. Tries every step even
        when one fails.

        Raises:
            LabError: something could not be removed; the message lists what.
        """
        if os.getpid() != self._owner_pid or self._state in ("new", "torn down"):
            return
        errors: list[str] = []

        # processes: tracked ones by PID and group, then strays in our namespaces
        for proc in list(self._procs):
            try:
                stop_process(proc)
            except Exception as exc:
                errors.append(f"stopping pid {proc.pid}: {exc}")
            self._procs.remove(proc)
        for ns in self._owned_namespaces():
            for pid in netns.namespace_pids(ns):
                if pid == os.getpid():
                    continue
                log.warning("untracked process in lab namespace ns=%s pid=%d", ns, pid)
                kill_pid(pid)

        # namespaces take their veths, bridges and iptables rules with them
        for ns in reversed(self._owned_namespaces()):
            try:
                netns.delete_namespace(ns)
            except Exception as exc:
                errors.append(f"deleting namespace {ns}: {exc}")
        self._created_ns.clear()

        # nothing should ever be made in the root namespace; check anyway
        for name in netns.link_names(None):
            if name.startswith(f"{self.prefix}-"):
                log.warning("leftover link in root namespace link=%s", name)
                try:
                    ip(None, "link", "delete", name)
                except Exception as exc:
                    errors.append(f"deleting link {name}: {exc}")

        for ns in self._etc_dirs:
            try:
                netns.remove_netns_etc(ns, remove_parent_if_empty=self._made_netns_etc)
            except OSError as exc:
                errors.append(f"removing {NETNS_ETC / ns}: {exc}")
        self._etc_dirs.clear()

        left = self._owned_namespaces()
        if left:
            errors.append(f"namespaces still present: {left}")
        if errors:
            raise LabError(
                f"lab {self.prefix} teardown incomplete: " + "; ".join(errors)
            )
        self._state = "torn down"
        guard.release(self)
        log.info("lab torn down prefix=%s", self.prefix)

    def _owned_namespaces(self) -> list[str]:
        mine = f"{self.prefix}-"
        found = [ns for ns in netns.list_namespaces() if ns.startswith(mine)]
        return list(dict.fromkeys([*self._created_ns, *found]))

    # using the lab

    def run(
        self,
        ns: str,
        *argv: object,
        check: bool = True,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        input: str | None = None,
        cwd: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run `argv` in namespace `ns` and wait; output is captured as text.

        `cwd` and `env` apply to the command (`ip netns exec` keeps both).

        Raises:
            CommandError: `check` is set and it exited non-zero.
            subprocess.TimeoutExpired: it ran past `timeout` (it is killed).
        """
        return netns.run_cmd(netns.exec_argv(self._ns(ns), argv), check=check,
                       timeout=timeout, input=input, cwd=cwd, env=env)  # fmt: skip

    def popen(self, ns: str, *argv: object, **kwargs) -> subprocess.Popen:
        """Start `argv` in namespace `ns`; teardown stops it if still running.

        `kwargs` go to `subprocess.Popen`. The process gets its own session
        (and so process group) unless `start_new_session=False` is passed.
        """
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(netns.exec_argv(self._ns(ns), argv), **kwargs)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> int | None:
        """Stop a process from `popen` now (SIGTERM, then SIGKILL); untrack it.

        Returns its exit status.
        """
        try:
            return stop_process(proc, grace_s)
        finally:
            if proc in self._procs:
                self._procs.remove(proc)

    def iptables(self, ns: str, *args: object) -> str:
        """Run the lab's iptables binary with `args` in `ns`; return stdout."""
        return run_iptables(self._ns(ns), self._tool(), *(str(a) for a in args))

    def snapshot(self, ns: str) -> dict:
        """What the kernel holds in `ns`, for before/after comparisons.

        Returns `netns.kernel_state(ns)` ("links", "addresses", "routes",
        "ip_forward") plus "iptables": table -> `iptables-save` text without
        comments and with zeroed counters, for filter, raw, nat and mangle.
        """
        ns = self._ns(ns)
        return {**netns.kernel_state(ns), "iptables": save_tables(ns, self._tool())}

    def _ns(self, ns: str) -> str:
        if ns not in self.namespaces:
            raise LabError(f"namespace {ns!r} is not part of lab {self.prefix}")
        return ns

    def _tool(self) -> Iptables:
        if self.tool is None:
            raise LabError(f"lab {self.prefix} is not built; call build() first")
        return self.tool


def _unused_prefix() -> str:
    """`ff` + 4 random hex digits that no namespace or /etc/netns entry uses."""
    in_use = set(netns.list_namespaces())
    if NETNS_ETC.is_dir():
        in_use.update(os.listdir(NETNS_ETC))
    in_use.update(netns.link_names(None))
    for _ in range(100):
        prefix = PREFIX_HEAD + secrets.token_hex(2)
        if not any(name.startswith(f"{prefix}-") for name in in_use):
            return prefix
    raise LabError("no unused lab prefix after 100 tries; remove stale ff* namespaces")
