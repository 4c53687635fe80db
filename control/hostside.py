"""The host side's control process: TUN address, routes, peer, pushes.

It configures the TUN device, keeps one route per ``route`` line in the
kernel (restoring routes something else removed), learns the VM peer from
heartbeats (:mod:`control.peer`), tells the workers where to send, and
pushes the ``iptables`` pairs to each new peer as the upstream's control
message. SIGHUP reloads the configuration file atomically.
"""

import ipaddress
import logging
import os
import time

from control import config as cfgmod
from control import messages, watch
from control.expose import ExposeServer
from control.hostsfile import HostsNames
from control.peer import HELLO_LEASE_S, PeerTracker
from control.process import Side, framing_for
from control.proxy import ProxySet
from control.routes import (
    ROUTE_CHECK_S, Netlink, RouteTable, remove_owned_routes, routable,
)
from fastfwd import frames, logsetup
from fastfwd.errors import ConfigError

log = logging.getLogger(__name__)

REPAIR_INTERVAL_S = 2.0
# Signed hellos are accepted within this distance of the host's clock.
HELLO_CLOCK_SKEW_MS = 60_000
AUTH_WARNING_INTERVAL_S = 60.0


class HostSide(Side):
    name = "host"

    def __init__(self, spec):
        super().__init__(spec)
        self.overrides = spec.get("overrides", {})
        self.cfg = self.initial_config()
        self.peer = PeerTracker(self.cfg.state)
        self.nl = None
        self.routes = None
        self.watch_task = None
        self.proxies = None  # ProxySet, once the TUN has the tunnel address
        self._next_route_check = 0.0
        self.pushes = 0
        self.udp_config_ignored = 0
        self.vnet_hdr = bool(spec.get("vnet_hdr"))
        self.peer_hello = None  # (version, caps, mtu, ports) of the current peer
        self.peer_hello_at = 0.0
        self.mtu_warned = None
        self.gone_pairs = set()  # pairs connected earlier in this run, now not
        self.docker_networks = set()  # bridge networks the VM side reported
        # Time stamp of the newest signed hello accepted. A new control
        # process starts at its own clock: hellos signed before it started,
        # replays among them, are refused (the peer answers the hello it
        # is asked for with a fresh one).
        self.last_auth_ms = int(time.time() * 1000)
        self.next_repair = 0.0
        self.closing = False
        self.rejected_hellos = 0
        self.next_auth_warning = 0.0
        self.names = HostsNames(spec.get("config"), self.push_controls)
        self.expose = ExposeServer(self)

    def initial_config(self):
        """The file's configuration; if it turned invalid while a previous
        control process ran, the last one applied (kept next to the state
        file), so a restart never changes what runs."""
        path = self.spec.get("config")
        if not path:
            return cfgmod.Config()
        try:
            cfg = cfgmod.parse(path)
        except ConfigError as exc:
            snapshot = self._snapshot_path(
                self.overrides.get("state") or _state_line(path)
            )
            try:
                with open(snapshot, encoding="utf-8") as f:
                    cfg = cfgmod.parse_text(f.read(), path)
            except (OSError, ConfigError):
                raise exc from None
            for line in cfgmod.format_problems(exc.problems):
                log.error("configuration rejected, last applied one used %s", line)
        for key, value in self.overrides.items():
            setattr(cfg, key, value)
        return cfg

    @staticmethod
    def _snapshot_path(state_path):
        return state_path + ".conf"

    def save_snapshot(self):
        path = self.spec.get("config")
        if not path:
            return
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            target = self._snapshot_path(self.cfg.state)
            os.makedirs(os.path.dirname(target) or ".", mode=0o700, exist_ok=True)
            # It holds tokens and the secret: readable by root only.
            fd = os.open(target + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with open(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(target + ".tmp", target)
        except OSError as exc:
            log.debug("configuration snapshot not written errno=%s", exc.errno)

    async def setup(self):
        self.nl = Netlink()
        prefixlen = self.cfg.addr.network.prefixlen
        await self.nl.run(
            self.nl.configure_tun,
            self.tun_name,
            self.cfg.host_ip,
            prefixlen,
            self.cfg.mtu,
        )
        self.routes = await self.nl.run(RouteTable, self.nl, self.tun_name)
        # Before the routes: the restored peer's networks are among them.
        self.restore_peer(time.monotonic())
        added, _ = await self.reconcile_routes()
        log.info(
            "tunnel up dev=%s addr=%s/%d mtu=%d listen=%s:%d routes=%d",
            self.tun_name, self.cfg.host_ip, self.cfg.addr.network.prefixlen,
            self.cfg.mtu, self.cfg.host, self.cfg.port, len(added),
        )  # fmt: skip
        self.proxies = ProxySet(self.cfg.host_ip)
        await self.proxies.apply(self.cfg.proxies)
        self.names.configure(self.cfg.hosts, self.cfg.host_ip)
        await self.expose.apply()
        self.announce_restored_peer()
        if self.spec.get("config"):
            self.save_snapshot()
            self.watch_task = self.loop.create_task(
                watch.run_watch(self.spec["config"], self.reload)
            )

    async def teardown(self):
        self.closing = True  # no route change may follow the removal below
        self.names.close()
        self.expose.close()
        if self.watch_task is not None:
            self.watch_task.cancel()
        if self.proxies is not None:
            await self.proxies.close()
        if self.routes is not None:
            await self.nl.run(self.routes.remove_all)
        self.peer.save()
        if self.nl is not None:
            self.nl.close()

    async def cleanup(self):
        await remove_owned_routes(self.tun_name)

    # peer

    def on_frame(self, src, data):
        if src is None or not data:
            return
        kind = data[0]
        secret = self.secret
        if kind == frames.HEARTBEAT and len(data) == 1:
            # With a secret, only a signed hello may change the peer.
            if not secret and self.peer.heard(src, time.monotonic()):
                self.on_peer_changed()
        elif kind == frames.HELLO:
            hello = frames.decode_hello(data, secret)
            if hello is None:
                log.debug("malformed hello ignored src=%s", src)
                return
            now = time.monotonic()
            if secret:
                if not self.hello_is_authentic(src, hello):
                    return
                if self.peer.force(src, now):
                    self.on_peer_changed()
            elif self.peer.heard(src, now):
                self.on_peer_changed()
            if src == self.peer.peer:
                self.on_hello(src, hello, now)
        elif kind == frames.CONTROL and len(data) > 1:
            self.on_udp_config(src, bytes(data[1:]))
        else:
            log.debug("frame ignored src=%s type=%d bytes=%d", src, kind, len(data))

    def restore_peer(self, now):
        """The previous control process's peer, from the state file, in
        the framing its last hello asked for: a restart of this process
        changes nothing on the wire. Its networks count for the routes."""
        peer = self.peer.load(now)
        if peer is None:
            return
        self.peer_hello = _hello_from_info(self.peer.info)
        self.peer_hello_at = now
        if self.peer_hello is not None:
            self.docker_networks = _reported_networks(self.peer_hello)

    def announce_restored_peer(self):
        """Once set up: tell the workers and the restored peer."""
        if self.peer.peer is None:
            return
        self.send_peer()
        self.push_controls()
        if self.peer.info is not None:
            # A fastfwd peer (it said hello before): ask it to say what it
            # can do now. An upstream one is never sent a hello.
            self.send_hello(self.peer.peer, ask=True)

    def on_unknown_source(self, src):
        """IP packets from a stranger: a peer whose address changed under NAT
        while it kept sending (it sends no heartbeat then). Treated like a
        heartbeat: it can only take over from a peer that went silent."""
        if (
            src is not None
            and not self.secret
            and self.peer.heard(src, time.monotonic())
        ):
            self.on_peer_changed()

    @property
    def secret(self):
        return self.cfg.secret.encode() if self.cfg.secret else None

    def hello_is_authentic(self, src, hello):
        """A signed, fresh hello that was not seen before (replays of a
        captured one carry an old time stamp)."""
        now_ms = int(time.time() * 1000)
        if not hello.authentic:
            self.rejected_hellos += 1
            now = time.monotonic()
            if now >= self.next_auth_warning:
                # Once a minute at most: a VM side without the secret, or
                # with another one, would otherwise fail in silence.
                self.next_auth_warning = now + AUTH_WARNING_INTERVAL_S
                log.warning(
                    "hello without a valid signature ignored src=%s:%d rejected=%d: "
                    "does the VM side have the same secret?",
                    src[0], src[1], self.rejected_hellos,
                )  # fmt: skip
            return False
        if (
            abs(now_ms - hello.auth_ms) > HELLO_CLOCK_SKEW_MS
            or hello.auth_ms <= self.last_auth_ms
        ):
            self.rejected_hellos += 1
            log.debug("stale or replayed hello ignored src=%s", src)
            return False
        self.last_auth_ms = hello.auth_ms
        return True

    def on_peer_changed(self):
        # A new peer speaks the upstream format until its hello says more.
        self.peer_hello = None
        if self.docker_networks:
            self.docker_networks = set()
            self.loop.create_task(self.reconcile_routes())
        self.send_peer()
        self.push_controls()

    def on_hello(self, src, hello, now):
        """A fastfwd VM side announced itself: answer, and use what it can do."""
        if hello.version != frames.HELLO_VERSION or not 576 <= hello.mtu <= 65535:
            log.debug(
                "hello ignored src=%s version=%d mtu=%d", src, hello.version, hello.mtu
            )
            return
        self.send_hello(src)
        if hello.mtu != self.cfg.mtu and self.mtu_warned != (src, hello.mtu):
            self.mtu_warned = (src, hello.mtu)
            log.warning(
                "mtu mismatch peer=%s:%d peer_mtu=%d our_mtu=%d: set the same -mtu on both sides",
                src[0],
                src[1],
                hello.mtu,
                self.cfg.mtu,
            )
        old = self.peer_hello
        self.peer_hello, self.peer_hello_at = hello, now
        if old is None or _hello_info(old) != _hello_info(hello):
            self.peer.info = _hello_info(hello)
            self.peer.save()
        if old is None or (old.caps, old.ports) != (hello.caps, hello.ports):
            log.info(
                "peer is fastfwd version=%d caps=%#x ports=%d",
                hello.version,
                hello.caps,
                len(hello.ports),
            )
            self.send_peer()
        if (
            hello.caps & frames.CAP_RESET_PAIRS
            and hello.pairs_digest != self.pairs_digest()
            and now >= self.next_repair
        ):
            # The VM side's pairs differ from ours (a lost datagram, a
            # restart): send the whole set again, at most once per interval
            # however fast hellos come.
            self.next_repair = now + REPAIR_INTERVAL_S
            self.push_controls()
        if old is None or old.networks != hello.networks:
            self.docker_networks = _reported_networks(hello)
            if self.cfg.docker_routes:
                self.loop.create_task(self.reconcile_routes())

    def send_hello(self, dst, ask=False):
        """The host's hello: an answer to the VM side's, or news (it stopped
        taking GSO frames)."""
        our_caps = 0
        if self.vnet_hdr and self.cfg.offload:
            our_caps = frames.CAP_OFFLOAD
            if self.gso_frames_ok:
                our_caps |= frames.CAP_GSO_FRAMES
        if ask:
            our_caps |= frames.HELLO_ASK
        try:
            reply = frames.Hello(frames.HELLO_VERSION, our_caps, self.cfg.mtu)
            self.socks[0].sendto(frames.encode_hello(reply, self.secret), dst)
        except OSError as exc:
            log.debug("hello failed errno=%s", exc.errno)

    def wanted_framing(self):
        if self.peer_hello is None or not (self.vnet_hdr and self.cfg.offload):
            return "compat"
        return framing_for(self.peer_hello.caps)

    def send_peer(self):
        """Tell every worker where the peer is and how to frame for it."""
        peer = self.peer.peer
        if peer is None:
            return
        ports = self.peer_hello.ports if self.peer_hello else ()
        addrs = [(peer[0], p) for p in ports] or [peer]
        if peer not in addrs:
            addrs.insert(0, peer)
        caps = self.peer_hello.caps if self.peer_hello else 0
        self.set_workers_peer(addrs, self.wanted_framing(), caps)

    def on_worker_started(self, role, queue):
        self.send_peer()
        if role == "writer":
            self.expose.on_writer_started(queue)

    def on_expose_frame(self, src, data, local=""):
        self.expose.on_frame(src, data, local)

    async def on_tick(self, now):
        # Offload frames cut up on the way: say so now, not at the next hello.
        if self.check_splits() and self.peer.peer and self.peer_hello is not None:
            self.send_hello(self.peer.peer)
        self.refresh_frame_segments(now)
        last = self.latest("writer", "last_in_ns")
        if last:
            self.peer.traffic(last)
        if self.peer.tick(now):
            self.on_peer_changed()
        if self.peer_hello is not None and now - self.peer_hello_at > HELLO_LEASE_S:
            log.info("peer stopped saying hello, back to the upstream format")
            self.peer_hello = None
            self.peer.info = None  # a restart must not bring it back
            self.peer.save()
            self.send_peer()
            if self.docker_networks:
                self.docker_networks = set()
                await self.reconcile_routes()
        if now >= self._next_route_check:
            self._next_route_check = now + ROUTE_CHECK_S
            added, _ = await self.reconcile_routes()
            if added:
                log.warning(
                    "routes restored dev=%s count=%d", self.tun_name, len(added)
                )

    def wanted_routes(self):
        """``route`` lines, plus the VM side's bridge networks with
        ``docker-routes on``."""
        routes = dict(self.cfg.routes)
        if self.cfg.docker_routes:
            for text in self.docker_networks:
                net = ipaddress.IPv4Network(text)
                routes.setdefault(net, cfgmod.Route(net))
        return list(routes.values())

    async def reconcile_routes(self):
        if self.closing:
            return [], []
        return await self.nl.run(self.routes.reconcile, self.wanted_routes())

    # control pushes

    def commands(self):
        """The control commands that describe the wanted VM-side state.

        A fastfwd VM side gets the complete set after ``reset-pairs``, so a
        pair dropped from the file disappears there too; an upstream one
        gets the upstream's incremental commands, with a ``disconnect`` for
        every pair an ``A-B`` line or a removed line took away.
        """
        connected = [("connect", a, b) for a, b in self.cfg.connected_pairs()]
        names = self.names.commands()  # the whole name table, every time
        if (
            self.peer_hello is not None
            and self.peer_hello.caps & frames.CAP_RESET_PAIRS
        ):
            return [("reset-pairs",), *connected, *names]
        gone = {
            tuple(sorted(p)) for p in self.cfg.disconnected_pairs()
        } | self.gone_pairs
        return connected + [("disconnect", a, b) for a, b in sorted(gone)] + names

    def pairs_digest(self):
        return frames.pairs_digest(self.cfg.connected_pairs())

    def push_controls(self, commands=None):
        """Send ``commands`` (default: all) to the peer, in as many control
        bodies as the 64 KiB limit needs (the name table stays in one)."""
        peer = self.peer.peer
        commands = self.commands() if commands is None else commands
        if peer is None or not commands:
            return
        names = [c for c in commands if c[0] in ("dns", "host")]
        others = [c for c in commands if c[0] not in ("dns", "host")]
        try:
            bodies = frames.split_bodies(others, keep_together=names)
        except ValueError as exc:
            log.error("controls not pushed peer=%s:%d reason=%s", peer[0], peer[1], exc)
            return
        sock = self.socks[0]
        for body in bodies:
            for datagram in frames.control_datagrams(body, self.cfg.mtu):
                try:
                    sock.sendto(datagram, peer)
                except OSError as exc:
                    log.warning(
                        "control push failed peer=%s:%d errno=%s",
                        peer[0],
                        peer[1],
                        exc.errno,
                    )
                    return
        self.pushes += 1
        log.info(
            "controls pushed peer=%s:%d commands=%d bodies=%d bytes=%d",
            peer[0], peer[1], len(commands), len(bodies), sum(map(len, bodies)),
        )  # fmt: skip

    # configuration

    def on_udp_config(self, src, text):
        if not self.cfg.udp_config:
            self.udp_config_ignored += 1
            log.debug("udp config line ignored src=%s", src)
            return
        log.info("udp config line accepted src=%s:%d", src[0], src[1])
        try:
            new = cfgmod.parse_text(
                text.decode("utf-8", errors="replace"), "<udp>", base=self.cfg
            )
        except ConfigError as exc:
            for line in cfgmod.format_problems(exc.problems):
                log.error("configuration rejected %s", line)
            return
        self.loop.create_task(self.apply(new))

    def on_sighup(self):
        self.loop.create_task(self.reload())

    async def reload(self):
        """Read the configuration file again and apply what changed.

        All or nothing: with any bad line the running configuration stays.
        """
        if not self.spec.get("config"):
            return
        try:
            new = cfgmod.parse(self.spec["config"])
        except ConfigError as exc:
            for line in cfgmod.format_problems(exc.problems):
                log.error("configuration rejected, running configuration kept %s", line)
            return
        for key, value in self.overrides.items():
            setattr(new, key, value)
        await self.apply(new)
        self.save_snapshot()

    async def apply(self, new, push=False):
        """Switch to ``new``: routes, pairs and loglevel change live.

        The ``iptables`` pairs are pushed when they changed, or always with
        ``push`` (a line given with ``fastfwd config`` is sent at once, like
        the upstream does, even when it repeats the running state).
        """
        old = self.cfg
        changed = cfgmod.restart_changes(old, new)
        for name in changed:
            log.warning(
                "restart needed directive=%s running=%s file=%s",
                name,
                getattr(old, name),
                getattr(new, name),
            )
            setattr(new, name, getattr(old, name))
        self.cfg = new
        added, removed = await self.reconcile_routes()
        if old.loglevel != new.loglevel:
            logsetup.set_level(new.loglevel)
            self.to_workers(messages.pack(messages.SET_LOGLEVEL, level=new.loglevel))
        old_on = {tuple(sorted(p)) for p in old.connected_pairs()}
        new_on = {tuple(sorted(p)) for p in new.connected_pairs()}
        self.gone_pairs = (self.gone_pairs | (old_on - new_on)) - new_on
        push = self.names.configure(new.hosts, new.host_ip) or push
        if push or old.pairs != new.pairs:
            self.push_controls()
        if old.proxies != new.proxies or self.proxies.failed:
            await self.proxies.apply(new.proxies)  # also retries failed lines
        await self.expose.apply(reload=True)
        log.info(
            "configuration changed routes_added=%d routes_removed=%d",
            len(added),
            len(removed),
        )

    async def on_local_request(self, request):
        if request.get("op") != "config":
            return await super().on_local_request(request)
        lines = request.get("lines")
        if not isinstance(lines, list) or not all(
            isinstance(x, str) and "\n" not in x for x in lines
        ):
            return {
                "ok": False,
                "code": "bad_request",
                "error": "lines must be a list of single-line strings",
            }
        text = "\n".join(lines)
        if not text.strip():
            return {
                "ok": False,
                "code": "bad_request",
                "error": "no configuration line given",
            }
        try:
            new = cfgmod.parse_text(text, "<config>", base=self.cfg)
        except ConfigError as exc:
            return {
                "ok": False,
                "code": "invalid_config",
                "error": "configuration unchanged",
                "problems": cfgmod.format_problems(exc.problems),
            }
        restart = cfgmod.restart_changes(self.cfg, new)
        await self.apply(
            new,
            push=any(
                line.split()[:1] == ["iptables"] for line in text.lower().split("\n")
            ),
        )
        warnings = [f"{name} takes effect at the next restart" for name in restart]
        # The routes these lines name (checked against the running
        # tunnel network, as the whole was).
        given = cfgmod.parse_text(
            text, "<config>", base=cfgmod.Config(addr=self.cfg.addr, port=self.cfg.port)
        ).routes
        for net, reason in self.routes.refused.items():
            if net in given:
                warnings.append(f"route {net} refused: {reason}")
        path = self.spec.get("config")
        message = f"applied {len(lines)} line(s)"
        if path:
            # Appended like the upstream does, so the lines survive a restart.
            try:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(text + "\n")
                message += f", saved to {path}"
            except OSError as exc:
                warnings.append(f"not saved to {path}: {exc.strerror}")
        return {"ok": True, "message": message, "warnings": warnings}

    async def status(self):
        out = await super().status()
        owned = await self.nl.run(self.routes.owned)
        peer = self.peer.peer
        out.update(
            peer=None if peer is None else f"{peer[0]}:{peer[1]}",
            peer_silent_s=None
            if peer is None
            else round(time.monotonic() - self.peer.last_heard, 1),
            routes=sorted(str(n) for n in owned),
            refused_routes={str(k): v for k, v in self.routes.refused.items()},
            control_pushes=self.pushes,
            address=f"{self.cfg.host_ip}/{self.cfg.addr.network.prefixlen}",
            framing=self.framing,
            frame_segment_bytes=self.frame_seg,
            peer_mtu=self.peer_hello.mtu if self.peer_hello else None,
            authenticated=bool(self.secret),
            rejected_hellos=self.rejected_hellos,
            docker_networks=sorted(self.docker_networks),
            proxies=self.proxies.statistics(),
        )
        out["names"] = self.names.statistics()
        out["expose"] = self.expose.statistics()
        return out


def _state_line(path):
    """The ``state`` path a file names, read leniently (the file may be
    invalid elsewhere)."""
    found = cfgmod.DEFAULT_STATE
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                if (
                    len(fields) == 2
                    and fields[0] == "state"
                    and os.path.isabs(fields[1])
                ):
                    found = fields[1]
    except OSError:
        pass
    return found


def _reported_networks(hello):
    """The bridge networks a VM side's hello reports that may be routed."""
    if not hello.caps & frames.CAP_NETWORKS:
        return set()
    return {n for n in hello.networks if routable(n)}


def _hello_info(hello):
    """What the state file keeps of a peer's hello."""
    return {
        "caps": hello.caps,
        "mtu": hello.mtu,
        "ports": list(hello.ports),
        "networks": list(hello.networks),
    }


def _hello_from_info(info):
    """A hello rebuilt from :func:`_hello_info`; None if there is none or
    it is not one a peer could have sent (the state file may have been
    edited by hand)."""

    def whole(v, low, high):
        if type(v) is not int or not low <= v <= high:
            raise ValueError(f"{v!r} not in {low}..{high}")
        return v

    if not isinstance(info, dict):
        return None
    try:
        ports, networks = info["ports"], info["networks"]
        if not isinstance(ports, list) or len(ports) > frames.MAX_HELLO_PORTS:
            raise ValueError("ports")
        if not isinstance(networks, list) or len(networks) > frames.MAX_HELLO_NETWORKS:
            raise ValueError("networks")
        return frames.Hello(
            frames.HELLO_VERSION,
            whole(info["caps"], 0, 0xFFFF),
            whole(info["mtu"], 576, 65535),
            ports=tuple(whole(p, 1, 65535) for p in ports),
            networks=tuple(
                str(ipaddress.IPv4Network(n)) for n in networks if isinstance(n, str)
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("peer's hello in the state file ignored reason=%s", exc)
        return None
