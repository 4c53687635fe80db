"""The accessor's control process (``fastfwd access``): login and routes.

An accessor runs on another machine and reaches the containers a host
exposes. Its workers are those of the other sides (one reader and one
writer, upstream framing: one IP packet per datagram), talking to the
host's expose port only, and this process speaks the login:

1. send ``0x00`` + token; the host answers ``0x02`` (not logged in);
2. send ``0x01`` + token; the host answers ``0x01`` + ``addr IP/PREFIX,
   peer HOSTIP,mtu N,route CIDR,...``;
3. give the TUN that address and MTU and route each exposed network into
   it, except those ``--exclude`` names;
4. whenever the host says ``0x02`` again (it restarted, the exposed
   networks changed, the token was removed), log in again.

A login that gets no answer (a wrong token, a host that is down) is
retried with backoff up to 30 s. Routes are marked like the host's and
removed on exit; the device goes with the process.
"""

import ipaddress
import logging
import os
import time

from control.config import Route
from control.process import Side
from control.routes import (
    ROUTE_CHECK_S, Netlink, RouteTable, remove_owned_routes, routable,
)
from fastfwd import frames

log = logging.getLogger(__name__)

LOGIN_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
# The host may answer a burst of packets with as many 0x02: one login each
# this often is enough.
RELOGIN_MIN_INTERVAL_S = 0.5


class AccessSide(Side):
    name = "access"

    def __init__(self, spec):
        super().__init__(spec)
        self.remote = (spec["remote"][0], int(spec["remote"][1]))
        self.exclude = [ipaddress.IPv4Network(x) for x in spec.get("exclude", ())]
        # From the environment, not the command line of this process.
        self.token = os.environ.get("FASTFWD_TOKEN", "")
        self.session = None  # frames.Session last applied
        self.logged_in = False
        self.logins = 0
        self.relogins = 0
        self.attempts = 0  # logins sent without an answer since the last one
        self.next_login = 0.0
        self.last_login_sent = 0.0
        self.nl = None
        self.routes = None
        self.excluded = []
        self._applying = None
        self.pending = None
        self.wanted = []  # Route objects of the applied session
        self.address = None  # the device's address from the applied session
        self._next_route_check = 0.0

    async def setup(self):
        # The device is ours and goes with us: no IPv6 chatter from it (the
        # host drops an accessor's IPv6 anyway).
        try:
            path = f"/proc/sys/net/ipv6/conf/{self.tun_name}/disable_ipv6"
            with open(path, "w") as f:
                f.write("1")
        except OSError as exc:
            log.debug("IPv6 left on dev=%s errno=%s", self.tun_name, exc.errno)
        self.nl = Netlink()
        self.routes = await self.nl.run(RouteTable, self.nl, self.tun_name)
        self.set_workers_peer([self.remote], "compat")
        log.info(
            "accessor started dev=%s remote=%s:%d token=%s",
            self.tun_name, self.remote[0], self.remote[1], frames.redact(self.token),
        )  # fmt: skip
        self.send_login(frames.LOGIN_HELLO, time.monotonic())

    async def teardown(self):
        if self._applying is not None:
            await self._applying
        if self.routes is not None:
            await self.nl.run(self.routes.remove_all)
        if self.nl is not None:
            self.nl.close()

    async def cleanup(self):
        await remove_owned_routes(self.tun_name)

    def on_worker_started(self, role, queue):
        self.set_workers_peer([self.remote], "compat")

    # login

    def send_login(self, kind, now):
        try:
            self.socks[0].sendto(frames.login_frame(kind, self.token), self.remote)
        except OSError as exc:
            log.debug("login not sent errno=%s", exc.errno)
        if kind == frames.LOGIN:
            self.last_login_sent = now
        delay = LOGIN_BACKOFF_S[min(self.attempts, len(LOGIN_BACKOFF_S) - 1)]
        self.attempts += 1
        self.next_login = now + delay
        if self.attempts == 4:
            log.warning(
                "login not answered attempts=%d remote=%s:%d: the host does not "
                "know this token, or has no expose port there; retrying every "
                "%.0fs at most",
                self.attempts, self.remote[0], self.remote[1], LOGIN_BACKOFF_S[-1],
            )  # fmt: skip

    def on_frame(self, src, data):
        if not data:
            return
        now = time.monotonic()
        if data[0] == frames.NOT_LOGGED_IN and len(data) == 1:
            if self.logged_in:
                self.relogins += 1
                log.info("host asks for a new login")
            self.logged_in = False
            if now - self.last_login_sent >= RELOGIN_MIN_INTERVAL_S:
                self.send_login(frames.LOGIN, now)
            return
        if data[0] == frames.LOGIN:
            session = frames.decode_session(data)
            if session is None:
                log.warning("login answer not understood bytes=%d", len(data))
                return
            self.attempts = 0
            if not self.logged_in and session == self.session:
                log.info("logged in again addr=%s", session.addr)
            self.logged_in = True
            self.logins += 1
            self.pending = session
            if self._applying is None and session != self.session:
                self._applying = self.loop.create_task(self.apply_sessions())
            return
        log.debug("frame from host ignored type=%d bytes=%d", data[0], len(data))

    async def apply_sessions(self):
        """Apply the newest session answer until none is left waiting."""
        try:
            while self.pending is not None and self.pending != self.session:
                await self.apply_session(self.pending)
        finally:
            self._applying = None

    async def apply_session(self, session):
        """Address, MTU and routes of a (new) session."""
        try:
            addr = ipaddress.IPv4Interface(session.addr)
            reason = _unusable(addr) or await self.nl.run(
                self.routes.conflict, addr.network, True
            )
            if reason:
                log.error("session refused addr=%s reason=%s", session.addr, reason)
                self.session, self.wanted, self.address = session, [], None
                await self.nl.run(self.routes.reconcile, [])
                await self.nl.run(self.nl.flush_addresses, self.tun_name)
                return
            await self.nl.run(
                self.nl.replace_tun_address, self.tun_name, addr.ip,
                addr.network.prefixlen, session.mtu,
            )  # fmt: skip
            wanted, excluded = [], []
            for text in session.routes:
                net = ipaddress.IPv4Network(text)
                if any(net.overlaps(x) for x in self.exclude):
                    excluded.append(net)
                elif not routable(net):
                    log.error(
                        "route refused dst=%s reason=not unicast, or wider than /8",
                        net,
                    )
                else:
                    wanted.append(Route(net))
            added, removed = await self.nl.run(self.routes.reconcile, wanted)
            self.session, self.excluded, self.wanted = session, excluded, wanted
            self.address = session.addr
            log.info(
                "logged in addr=%s peer=%s mtu=%d routes=%s excluded=%s",
                session.addr, session.peer, session.mtu,
                ",".join(str(r.network) for r in wanted) or "-",
                ",".join(map(str, excluded)) or "-",
            )  # fmt: skip
        except Exception:
            log.exception("session not applied")
            self.session = session  # not retried in a loop; the next login will

    async def on_tick(self, now):
        if not self.logged_in and now >= self.next_login:
            self.send_login(frames.LOGIN_HELLO, now)
        if (
            self.session is not None
            and self._applying is None
            and now >= self._next_route_check
        ):
            # Restore routes something else removed.
            self._next_route_check = now + ROUTE_CHECK_S
            added, _ = await self.nl.run(self.routes.reconcile, self.wanted)
            if added:
                log.warning(
                    "routes restored dev=%s count=%d", self.tun_name, len(added)
                )

    async def status(self):
        out = await super().status()
        owned = await self.nl.run(self.routes.owned)
        s = self.session
        out.update(
            remote=f"{self.remote[0]}:{self.remote[1]}",
            logged_in=self.logged_in,
            address=self.address,
            host_ip=s.peer if s else None,
            mtu=s.mtu if s else None,
            routes=sorted(str(n) for n in owned),
            excluded=sorted(str(n) for n in self.excluded),
            refused_routes={str(k): v for k, v in self.routes.refused.items()},
            logins=self.logins,
            relogin_requests=self.relogins,
        )
        return out


def _unusable(addr):
    """Why a host-given address cannot be this device's, or None: it must
    be a unicast address of a routable network of /8 or longer, and not
    that network's own or broadcast address."""
    ip, net = addr.ip, addr.network
    if not routable(net) or ip.is_reserved or ip.is_loopback or ip.is_link_local:
        return "not a unicast address of a /8-or-longer network"
    if net.prefixlen < 31 and ip in (net.network_address, net.broadcast_address):
        return "the network's own or broadcast address"
    return None
