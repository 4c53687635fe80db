"""The VM side's control process: TUN address, host, heartbeats, firewall.

It dials the host (resolving its name again on every retry, with capped
backoff), sends a heartbeat at start and whenever 5 s pass without sending,
installs what Docker >= 28 demands for traffic arriving on the TUN, and
applies the ``connect``/``disconnect`` commands the host pushes to
DOCKER-USER. Everything it adds carries its mark and is removed on exit;
marked rules left by a killed run are purged at start.
"""

import asyncio
import ipaddress
import logging
import os
import socket
import time

from control import iptables as ipt
from control.dns import NameService
from control.peer import HEARTBEAT_S, HELLO_LEASE_S
from control.process import Side, framing_for
from control.routes import Netlink
from fastfwd import frames

log = logging.getLogger(__name__)

RESOLVE_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
# A host that sent nothing for this long is looked up again (its address
# may have changed, e.g. a new VM network); the tunnel is kept meanwhile.
SILENT_HOST_S = 30.0
PAIR_RETRY_S = 5.0
NETWORK_SCAN_S = 2.0
# A host that asks for a hello gets one at most this often.
HELLO_ANSWER_S = 1.0
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"


class VmSide(Side):
    name = "vm"

    def __init__(self, spec):
        super().__init__(spec)
        self.host = spec["host"]
        self.port = spec["port"]
        self.addr = ipaddress.IPv4Interface(spec["addr"])
        self.mtu = spec["mtu"]
        self.firewall = spec.get("firewall", True)
        # From the environment, not the command line: argv is world-readable.
        self.secret = os.environ.get("FASTFWD_SECRET", "").encode() or None
        self.vnet_hdr = bool(spec.get("vnet_hdr"))
        self.host_hello = None  # (version, caps, mtu, ports) of a fastfwd host
        self.host_hello_at = 0.0
        self.last_hello = 0.0
        self.last_answer = -HELLO_ANSWER_S  # the last hello a host asked for
        self.mtu_warned = None
        self.networks = set()  # bridge networks, reported to a fastfwd host
        self.closing = False  # teardown started: no more rule changes
        self._next_network_scan = 0.0
        self.nl = None
        self.ipt = None
        self.forward_chain = None
        self.host_addr = None
        self.last_heartbeat = 0.0
        self.heartbeats = 0
        self.resolve_task = None
        self.pairs = set()  # wanted (A, B) pairs, A < B
        self.applied = {}  # pair -> list of (table, chain, rule)
        self.missing = set()  # pairs whose bridges were not found (warned once)
        self._next_pair_retry = 0.0
        self.names = NameService(self)  # the dns and host commands

    async def setup(self):
        self.nl = Netlink()
        await self.nl.run(
            self.nl.configure_tun,
            self.tun_name,
            self.addr.ip,
            self.addr.network.prefixlen,
            self.mtu,
        )
        if self.firewall:
            await self.nl.run(self.setup_firewall)
        self.check_ip_forward()
        log.info(
            "tunnel up dev=%s addr=%s mtu=%d host=%s:%d",
            self.tun_name,
            self.addr,
            self.mtu,
            self.host,
            self.port,
        )
        self.resolve_task = self.loop.create_task(self.run_resolver())

    async def teardown(self):
        self.names.close()
        if self.resolve_task is not None:
            self.resolve_task.cancel()
        self.closing = True
        if self.nl is not None:
            # In the netlink thread: after any rule change already queued
            # there, so none lands behind the purge.
            await self.nl.run(self._purge)
            self._restore_ip_forward()
            self.nl.close()
        else:
            await self.cleanup()

    async def cleanup(self):
        self._purge()
        self._restore_ip_forward()

    def _purge(self):
        if not self.firewall:
            return
        try:
            backend = ipt.Iptables(ipt.detect_backend(), self.mark)
            removed = backend.purge()
            log.info("firewall rules removed count=%d", removed)
        except ipt.IptablesError as exc:
            log.warning("firewall cleanup failed reason=%s", exc)

    def _restore_ip_forward(self):
        try:
            was = _read(self.ip_forward_marker)
        except OSError:
            was = None
        if was is not None:
            _write(IP_FORWARD, was)
            os.unlink(self.ip_forward_marker)

    @property
    def ip_forward_marker(self):
        # Per network namespace and device: /proc/self/ns/net's inode names the namespace.
        ns = os.stat("/proc/self/ns/net").st_ino
        return f"/run/fastfwd/ip_forward-{ns}-{self.tun_name}"

    @property
    def mark(self):
        return f"fastfwd:{self.tun_name}"

    # firewall

    def setup_firewall(self):
        try:
            binary = ipt.detect_backend()
            self.ipt = ipt.Iptables(binary, self.mark)
            stale = self.ipt.purge()
            if stale:
                log.warning("stale firewall rules purged count=%d", stale)
            tun = self.tun_name
            # Docker >= 28 drops packets to containers that arrive from a
            # non-bridge interface in raw PREROUTING, before any filter rule.
            self.ipt.insert("raw", "PREROUTING", ["-i", tun, "-j", "ACCEPT"])
            self.forward_chain = (
                "DOCKER-USER"
                if self.ipt.has_chain("filter", "DOCKER-USER")
                else "FORWARD"
            )
            self.ipt.insert("filter", self.forward_chain, ["-i", tun, "-j", "ACCEPT"])
            self.ipt.insert("filter", self.forward_chain, ["-o", tun, "-j", "ACCEPT"])
            for direction in ("-i", "-o"):
                self.ipt.insert(
                    "mangle", "FORWARD",
                    [direction, tun, "-p", "tcp", "--tcp-flags", "SYN,RST", "SYN",
                     "-j", "TCPMSS", "--clamp-mss-to-pmtu"],
                )  # fmt: skip
            log.info("firewall ready backend=%s chain=%s", binary, self.forward_chain)
        except ipt.IptablesError as exc:
            self.ipt = None
            log.warning("firewall not managed reason=%s", exc)

    def check_ip_forward(self):
        try:
            value = _read(IP_FORWARD)
        except OSError:
            return
        marker = self.ip_forward_marker
        if value != "1":
            log.warning(
                "ip_forward was off, turned on for the tunnel path=%s", IP_FORWARD
            )
            # Remembered on disk: a restarted control process must still
            # restore it on exit.
            try:
                os.makedirs(os.path.dirname(marker), mode=0o700, exist_ok=True)
                _write(marker, value)
            except OSError as exc:
                log.warning(
                    "ip_forward marker not written path=%s errno=%s", marker, exc.errno
                )
            _write(IP_FORWARD, "1")

    # host

    async def run_resolver(self):
        """Resolve the host and connect the socket; retry for ever."""
        failures = 0
        while True:
            try:
                infos = await self.loop.getaddrinfo(
                    self.host, self.port, family=socket.AF_INET, type=socket.SOCK_DGRAM
                )
                addr = infos[0][4][:2]
            except (OSError, socket.gaierror) as exc:
                delay = RESOLVE_BACKOFF_S[min(failures, len(RESOLVE_BACKOFF_S) - 1)]
                failures += 1
                level = (
                    logging.WARNING
                    if failures in (1, 10) or failures % 100 == 0
                    else logging.DEBUG
                )
                log.log(
                    level,
                    "host unresolvable host=%s reason=%s retry_in_s=%.0f",
                    self.host,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            if addr != self.host_addr:
                self.connect(addr)
            await asyncio.sleep(RESOLVE_BACKOFF_S[-1])
            while (
                time.monotonic() - self.latest("writer", "last_in_ns") < SILENT_HOST_S
            ):
                await asyncio.sleep(RESOLVE_BACKOFF_S[-1])

    def connect(self, addr):
        # The sockets stay unconnected: the workers send to the address
        # they are told and take datagrams from it only. On a connected UDP
        # socket one ICMP "port unreachable" (a host briefly down) becomes a
        # socket error, and the event loop stops watching the socket for
        # good.
        old, self.host_addr = self.host_addr, tuple(addr)
        log.info("host connected addr=%s:%d previous=%s", addr[0], addr[1], old)
        self.host_hello = None
        self.send_framing()
        now = time.monotonic()
        self.send_heartbeat(now)
        self.send_hello(now)

    def send_hello(self, now):
        """Tell a fastfwd host what we can do and what we hold; an upstream
        host ignores it."""
        caps = frames.CAP_RESET_PAIRS | frames.CAP_NETWORKS
        if self.vnet_hdr:
            caps |= frames.CAP_OFFLOAD
            if self.gso_frames_ok:
                caps |= frames.CAP_GSO_FRAMES
        hello = frames.Hello(
            frames.HELLO_VERSION, caps, self.mtu,
            ports=tuple(sock.getsockname()[1] for sock in self.socks),
            pairs_digest=frames.pairs_digest(self.pairs),
            networks=tuple(sorted(self.networks)),
        )  # fmt: skip
        try:
            self.socks[0].sendto(frames.encode_hello(hello, self.secret), self.host_addr)
        except OSError as exc:
            log.debug("hello failed errno=%s", exc.errno)
        self.last_hello = now

    def on_frame(self, src, data):
        if not data or data[0] != frames.HELLO:
            log.debug(
                "frame from host ignored type=%d bytes=%d",
                data[0] if data else -1,
                len(data),
            )
            return
        hello = frames.decode_hello(data, self.secret)
        if hello is None:
            return
        if self.secret and not hello.authentic:
            log.debug("unsigned or wrongly signed hello from the host ignored")
            return
        now = time.monotonic()
        if hello.mtu != self.mtu and self.mtu_warned != hello.mtu:
            self.mtu_warned = hello.mtu
            log.warning(
                "mtu mismatch host_mtu=%d our_mtu=%d: set the same mtu on both sides",
                hello.mtu,
                self.mtu,
            )
        if hello.caps & frames.HELLO_ASK:
            hello = hello._replace(caps=hello.caps & ~frames.HELLO_ASK)
            if now - self.last_answer >= HELLO_ANSWER_S:
                # A restarted host asks what we can do. It never asks in an
                # answer, so hellos do not bounce.
                self.last_answer = now
                self.send_hello(now)
        old = self.host_hello
        changed = old is None or old[:4] != hello[:4]
        self.host_hello, self.host_hello_at = hello, now
        if changed:
            log.info("host is fastfwd version=%d caps=%#x", hello.version, hello.caps)
            self.send_framing()

    def send_framing(self):
        framing = "compat"
        if self.vnet_hdr and self.host_hello is not None:
            framing = framing_for(self.host_hello.caps)
        caps = self.host_hello.caps if self.host_hello is not None else 0
        self.set_workers_peer(
            [self.host_addr] if self.host_addr else [], framing, caps
        )

    def on_worker_started(self, role, queue):
        self.send_framing()

    def send_heartbeat(self, now):
        try:
            self.socks[0].sendto(frames.HEARTBEAT_FRAME, self.host_addr)
        except OSError as exc:
            log.debug("heartbeat failed errno=%s", exc.errno)
        self.last_heartbeat = now
        self.heartbeats += 1

    async def on_tick(self, now):
        if self.check_splits() and self.host_addr is not None:
            self.send_hello(now)  # offload frames arrive cut up: say so now
        self.refresh_frame_segments(now)
        if self.host_addr is not None:
            last_sent = max(self.last_heartbeat, self.latest("reader", "last_out_ns"))
            if now - last_sent >= HEARTBEAT_S:
                self.send_heartbeat(now)
            if now - self.last_hello >= HEARTBEAT_S:
                self.send_hello(now)
        if self.host_hello is not None and now - self.host_hello_at > HELLO_LEASE_S:
            log.info("host stopped answering hello, back to the upstream format")
            self.host_hello = None
            self.send_framing()
        if now >= self._next_network_scan:
            self._next_network_scan = now + NETWORK_SCAN_S
            networks = await self.nl.run(self.bridge_networks)
            if len(networks) > frames.MAX_HELLO_NETWORKS and len(self.networks) != len(
                networks
            ):
                log.warning(
                    "too many bridge networks to report networks=%d reported=%d",
                    len(networks), frames.MAX_HELLO_NETWORKS,
                )  # fmt: skip
            if networks != self.networks:
                log.info(
                    "bridge networks changed networks=%s",
                    ",".join(sorted(networks)) or "none",
                )
                self.networks = networks
                if self.host_addr is not None:
                    self.send_hello(now)
        if now >= self._next_pair_retry and self.pairs - self.applied.keys():
            self._next_pair_retry = now + PAIR_RETRY_S
            await self.nl.run(self.reconcile_pairs, frozenset(self.pairs))
        await self.names.on_tick(now)

    # control commands

    def on_control_body(self, body):
        commands = frames.decode_commands(body)
        log.debug("control body commands=%d bytes=%d", len(commands), len(body))
        for fields in commands:
            verb, args = fields[0], fields[1:]
            if verb == "reset-pairs" and not args:
                # fastfwd's host: the connect commands that follow are all.
                self.pairs.clear()
            elif verb in ("connect", "disconnect") and len(args) == 2:
                try:
                    pair = tuple(sorted(str(ipaddress.IPv4Address(a)) for a in args))
                except ValueError:
                    log.warning(
                        "control command ignored command=%s reason=bad address", verb
                    )
                    continue
                if pair[0] == pair[1]:
                    log.warning(
                        "control command ignored command=%s reason=same subnet twice",
                        verb,
                    )
                elif verb == "connect":
                    self.pairs.add(pair)
                else:
                    self.pairs.discard(pair)
            elif verb in ("dns", "host"):
                continue  # applied below, the body's names as one table
            else:
                log.warning("control command not supported command=%s", verb)
        self.names.on_commands(commands)
        self.loop.create_task(self.nl.run(self.reconcile_pairs, frozenset(self.pairs)))

    def bridge_networks(self):
        """IPv4 networks on the Linux bridges here: the docker networks
        (netlink thread only)."""
        links = self.nl.ipr.get_links()
        bridges = {
            link["index"]
            for link in links
            if link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) == "bridge"
        }
        out = set()
        for msg in self.nl.ipr.get_addr(family=socket.AF_INET):
            if msg["index"] in bridges:
                out.add(
                    str(
                        ipaddress.IPv4Interface(
                            f"{msg.get('address')}/{msg['prefixlen']}"
                        ).network
                    )
                )
        return out

    def bridge_of(self, subnet_address):
        """``(ifname, network)`` of the interface holding ``subnet_address``."""
        ip = ipaddress.IPv4Address(subnet_address)
        for name, iface in self.nl.ipv4_addresses():
            if (
                name != self.tun_name
                and ip in iface.network
                and not iface.ip.is_loopback
            ):
                return name, iface.network
        return None

    def pair_rules(self, a, b):
        found_a, found_b = self.bridge_of(a), self.bridge_of(b)
        if found_a is None or found_b is None:
            return None
        (br_a, net_a), (br_b, net_b) = found_a, found_b
        chain = self.forward_chain
        return [
            ("filter", chain, ["-i", br_a, "-o", br_b, "-j", "ACCEPT"]),
            ("filter", chain, ["-i", br_b, "-o", br_a, "-j", "ACCEPT"]),
            # Docker >= 28 drops container-bound packets from other interfaces.
            ("raw", "PREROUTING", ["-i", br_a, "-d", str(net_b), "-j", "ACCEPT"]),
            ("raw", "PREROUTING", ["-i", br_b, "-d", str(net_a), "-j", "ACCEPT"]),
        ]

    def reconcile_pairs(self, wanted):
        """Make the applied rules match ``wanted`` (netlink thread only).

        ``wanted`` is a snapshot of :attr:`pairs`; :attr:`applied` is only
        ever changed here, in the netlink thread.
        """
        if self.ipt is None or self.closing:
            return
        for pair in list(self.applied.keys() - wanted):
            for table, chain, rule in self.applied.pop(pair):
                self.ipt.delete(table, chain, rule)
            log.info("subnets disconnected a=%s b=%s", *pair)
        for pair in wanted - self.applied.keys():
            rules = self.pair_rules(*pair)
            if rules is None:
                level = logging.DEBUG if pair in self.missing else logging.WARNING
                log.log(level, "subnets not found, will retry a=%s b=%s", *pair)
                self.missing.add(pair)
                continue
            self.missing.discard(pair)
            try:
                for table, chain, rule in rules:
                    self.ipt.insert(table, chain, rule)
            except ipt.IptablesError as exc:
                log.error(
                    "subnets not connected a=%s b=%s reason=%s", pair[0], pair[1], exc
                )
                continue
            self.applied[pair] = rules
            log.info("subnets connected a=%s b=%s", *pair)

    async def status(self):
        out = await super().status()
        out.update(
            host=None
            if self.host_addr is None
            else f"{self.host_addr[0]}:{self.host_addr[1]}",
            framing=self.framing,
            frame_segment_bytes=self.frame_seg,
            heartbeats=self.heartbeats,
            pairs=sorted(" ".join(p) for p in self.applied),
            pending_pairs=sorted(" ".join(p) for p in self.pairs - self.applied.keys()),
            networks=sorted(self.networks),
            address=str(self.addr),
        )
        out["dns"] = self.names.statistics()
        return out


def _read(path):
    with open(path, encoding="ascii") as f:
        return f.read().strip()


def _write(path, value):
    with open(path, "w", encoding="ascii") as f:
        f.write(value)
