"""The paths a measurement runs through, each set up in one lab and torn
down again: the direct kernel path, fastfwd in its modes, and the
reference tunnels (OpenVPN in cleartext point-to-point mode, socat).

Every path routes the lab's bridge subnets from the host namespace to the
vm namespace and lets that traffic through Docker's firewall there, so the
iperf3 runs are the same for all of them. ``host_addr`` is where a
container reaches the host through the path.
"""

import os
import subprocess
import tempfile
import time

from lab.tunnel import Tunnel

OVPN_HOST_IP, OVPN_VM_IP = "192.168.252.1", "192.168.252.2"
SOCAT_HOST_IP, SOCAT_VM_IP = "192.168.253.1", "192.168.253.2"
TUNNEL_MTU = 1400


class Path:
    name = "?"
    kind = "?"
    host_addr = None

    def start(self, lab, workdir):
        raise NotImplementedError

    def stop(self, lab):
        raise NotImplementedError

    def pids(self):
        """``{"host": [pid, ...], "vm": [...]}`` of the processes doing the work."""
        return {}

    def client_ns(self, lab):
        """Where iperf3's client and ping run: the host namespace."""
        return lab.host_ns


def _accept_device(lab, dev, add=True):
    """Let traffic of ``dev`` through Docker's firewall in the vm namespace."""
    op = "-I" if add else "-D"
    rules = [
        ("raw", "PREROUTING", ["-i", dev, "-j", "ACCEPT"]),
        ("filter", "DOCKER-USER", ["-i", dev, "-j", "ACCEPT"]),
        ("filter", "DOCKER-USER", ["-o", dev, "-j", "ACCEPT"]),
    ]
    for table, chain, rule in rules:
        lab.run(
            lab.vm_ns, "iptables", "-w", "5", "-t", table, op, chain, *rule, check=add
        )


def _routes(lab, dev=None, via=None, add=True):
    for bridge in lab.bridges:
        target = ["dev", dev] if dev else ["via", str(via)]
        lab.run(
            lab.host_ns,
            "ip",
            "route",
            "add" if add else "del",
            str(bridge.subnet),
            *target,
            check=add,
        )


class Direct(Path):
    """No tunnel: the host routes the bridges via the veth, the kernel forwards."""

    name, kind = "direct", "direct"

    def start(self, lab, workdir):
        self.host_addr = str(lab.host_ip)
        _routes(lab, via=lab.vm_ip)
        _accept_device(lab, lab.vm_if)

    def stop(self, lab):
        _routes(lab, via=lab.vm_ip, add=False)
        _accept_device(lab, lab.vm_if, add=False)


class Fastfwd(Path):
    kind = "fastfwd"

    def __init__(self, offload, workers, steering=True):
        self.offload = offload
        self.workers = workers
        self.steering = steering
        self.name = f"fastfwd-{'offload' if offload else 'compat'}-w{workers}"
        if not steering:
            self.name += "-unsteered"
        self.host_addr = "192.168.251.2"
        self.tunnel = None

    def start(self, lab, workdir):
        flag = ["--offload", "on" if self.offload else "off"]
        flag += ["--steering", "on" if self.steering else "off"]
        # A fresh folder per run: no peer remembered from an earlier round.
        self.tunnel = Tunnel(lab, tempfile.mkdtemp(prefix=self.name + "-", dir=workdir), mtu=TUNNEL_MTU,
                             workers=self.workers, vm_args=flag, host_args=flag)  # fmt: skip
        self.tunnel.start()
        want = "offload" if self.offload else "compat"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            framings = {
                self.tunnel.status(side).get("framing") for side in ("host", "vm")
            }
            if framings == {want}:
                refused = self.tunnel.status("host")["refused_routes"]
                if refused:
                    raise RuntimeError(f"{self.name}: routes refused: {refused}")
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.name}: framing is {framings}, not {want}\n{self.tunnel.logs()}"
        )

    def stop(self, lab):
        self.tunnel.stop()

    def pids(self):
        """Every process of each side, the supervisor included (``status``
        lists the control process and the workers; the supervisor is the
        process the side was started as)."""
        out = {}
        procs = {"host": self.tunnel.host_proc, "vm": self.tunnel.vm_proc}
        for side in ("host", "vm"):
            out[side] = [procs[side].pid] + [
                p["pid"] for p in self.tunnel.status(side)["processes"]
            ]
        return out


class FastfwdAccessor(Fastfwd):
    """An accessor on another machine (the lab's remote namespace) reaching
    a container through the host's expose port: accessor -> host -> VM side
    in offload mode. Measured from the remote namespace."""

    kind = "fastfwd"
    name = "fastfwd-accessor"
    EXPOSE_PORT = 2512
    TOKEN = "perf-accessor-token"

    def __init__(self):
        super().__init__(True, 1)
        self.name = "fastfwd-accessor"
        self.host_addr = None

    def start(self, lab, workdir):
        lines = [
            *[f"route {b.subnet} expose" for b in lab.bridges],
            f"expose {lab.host_remote_ip}:{self.EXPOSE_PORT}",
            f"token {self.TOKEN} 192.168.251.5",
        ]
        self.tunnel = Tunnel(
            lab, tempfile.mkdtemp(prefix=self.name + "-", dir=workdir),
            mtu=TUNNEL_MTU, routes=[], lines=lines,
        )  # fmt: skip
        self.tunnel.start()
        self.tunnel.start_accessor(self.TOKEN, self.EXPOSE_PORT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if self.tunnel.status("access").get("routes"):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: accessor not logged in\n{self.tunnel.logs()}")

    def pids(self):
        out = super().pids()
        out["access"] = [self.tunnel.access_proc.pid] + [
            p["pid"] for p in self.tunnel.status("access")["processes"]
        ]
        return out

    def client_ns(self, lab):
        return lab.remote_ns


class _ReferenceTunnel(Path):
    """A reference tunnel: one process per side on device ``dev``."""

    kind = "reference"
    dev = "?"

    def _connect(self, lab, vm_ip):
        """Route through the device, let it past Docker's firewall, and wait
        until the far end answers."""
        _routes(lab, dev=self.dev)
        _accept_device(lab, self.dev)
        _wait_ping(lab, vm_ip)

    def stop(self, lab):
        _accept_device(lab, self.dev, add=False)
        for proc in self.procs.values():
            lab.stop(proc)
        _wait_gone(lab, self.dev)

    def pids(self):
        return {side: [p.pid] for side, p in self.procs.items()}


class OpenVPN(_ReferenceTunnel):
    """OpenVPN 2.6 point-to-point without keys: cleartext, one packet per datagram."""

    name, dev = "openvpn", "ovpn0"
    host_addr = OVPN_HOST_IP

    def start(self, lab, workdir):
        self.procs = {}
        for side, ns, local, remote, ip, peer in (
            ("host", lab.host_ns, lab.host_ip, lab.vm_ip, OVPN_HOST_IP, OVPN_VM_IP),
            ("vm", lab.vm_ns, lab.vm_ip, lab.host_ip, OVPN_VM_IP, OVPN_HOST_IP),
        ):
            log = open(os.path.join(workdir, f"openvpn-{side}.log"), "wb")
            self.procs[side] = lab.popen(
                ns, "openvpn", "--dev", "ovpn0", "--dev-type", "tun", "--proto", "udp",
                "--local", str(local), "--lport", "1194", "--remote", str(remote), "--rport", "1194",
                "--ifconfig", ip, peer, "--tun-mtu", str(TUNNEL_MTU), "--verb", "1",
                "--sndbuf", "4194304", "--rcvbuf", "4194304",
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            log.close()
        _wait_link(lab, lab.host_ns, "ovpn0")
        _wait_link(lab, lab.vm_ns, "ovpn0")
        self._connect(lab, OVPN_VM_IP)


class Socat(_ReferenceTunnel):
    """socat copying between a TUN device and a UDP socket, one packet per datagram."""

    name, dev = "socat", "sct0"
    host_addr = SOCAT_HOST_IP

    def start(self, lab, workdir):
        self.procs = {}
        for side, ns, local, remote, ip in (
            ("host", lab.host_ns, lab.host_ip, lab.vm_ip, SOCAT_HOST_IP),
            ("vm", lab.vm_ns, lab.vm_ip, lab.host_ip, SOCAT_VM_IP),
        ):
            self.procs[side] = lab.popen(
                ns, "socat", "-b", "65536",
                f"TUN:{ip}/24,tun-type=tun,iff-no-pi,iff-up,tun-name=sct0",
                f"UDP-DATAGRAM:{remote}:7000,bind={local}:7000",
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        for ns in (lab.host_ns, lab.vm_ns):
            _wait_link(lab, ns, "sct0")
            lab.run(ns, "ip", "link", "set", "sct0", "mtu", str(TUNNEL_MTU))
        self._connect(lab, SOCAT_VM_IP)


def _wait_link(lab, ns, dev, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if lab.run(ns, "ip", "link", "show", dev, check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{dev} did not appear in {ns}")


def _wait_gone(lab, dev, timeout_s=10.0):
    """Wait until ``dev`` and its routes are gone from both namespaces, so
    the next path's routes do not meet them."""
    deadline = time.monotonic() + timeout_s
    for ns in (lab.host_ns, lab.vm_ns):
        while lab.run(ns, "ip", "link", "show", dev, check=False).returncode == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{dev} is still in {ns}")
            time.sleep(0.05)


def _wait_ping(lab, ip, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if lab.run(lab.host_ns, "ping", "-c1", "-W1", ip, check=False).returncode == 0:
            return
    raise RuntimeError(f"{ip} does not answer through the path")


def all_paths(max_workers):
    paths = [Direct(), OpenVPN(), Socat(), Fastfwd(False, 1), Fastfwd(True, 1)]
    paths.append(Fastfwd(True, 1, steering=False))
    paths += [Fastfwd(True, w) for w in range(2, max_workers + 1)]
    paths.append(FastfwdAccessor())
    return paths
