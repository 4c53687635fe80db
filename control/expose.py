"""The host's expose port: accessor logins, sessions and their rules.

An accessor on another machine logs in with a token (``token NAME IP``)
and becomes a tunnel address of its own (IP). This module, in the control
process, owns the expose socket and the sessions; the writers relay the
packets (:meth:`fastfwd.engine.Writer._on_expose_readable` and
``_divert``), so no data passes through the control process.

The writers get a duplicate of the socket over their channels (SCM_RIGHTS)
and the session table as a message; writer 0 reads the socket and hands
over what is not an accessor's IP packet: logins, and datagrams from
addresses without a session, which are answered ``0x02`` here.

Rules beyond the upstream: only networks marked ``expose`` are reachable
(the writers drop and count the rest), an accessor may send from its own
IP only, a removed or re-assigned token ends its session at once, and
tokens appear in logs redacted.
"""

import asyncio
import errno
import logging
import socket
import time

from control import config as cfgmod
from control import messages
from fastfwd import endpoints, frames, linux

log = logging.getLogger(__name__)

# A restarted control process binds the port again once the writers have
# let go of the previous socket.
BIND_RETRY_S = 3.0
REFUSED_LOG_INTERVAL_S = 10.0


class ExposeServer:
    def __init__(self, side):
        self.side = side
        self.sock = None
        self.bound = None  # (host, port) of the open socket
        self.error = None  # why the wanted port is not open
        # token -> (IPv4Address, (host, port), the local address it dialled)
        self.sessions = {}
        self.logins = 0
        self.refused = 0
        self._refused_logged = 0.0
        self._exposed = ()
        self._warned_no_expose = False

    @property
    def cfg(self):
        return self.side.cfg

    # the socket

    async def apply(self, reload=False):
        """Bring socket and sessions in line with the configuration.

        The port is (re)bound when ``expose`` appears or changes, and on
        every reload when its line says ``restart``; sessions of tokens that
        are gone or now name another IP end here, and when the exposed
        networks change every accessor is asked to log in again, which
        hands it the new list.
        """
        cfg = self.cfg
        want = (cfg.expose.host, cfg.expose.port) if cfg.expose else None
        if cfg.tokens and want is None and not self._warned_no_expose:
            self._warned_no_expose = True
            log.warning("token lines without an expose line: no accessor can log in")
        rebind = want != self.bound or (
            reload and cfg.expose is not None and cfg.expose.restart
        )
        if want is None and self.sock is not None:
            self.close()
            log.info("expose closed")
        elif want is not None and (rebind or self.sock is None):
            self.close()
            await self._bind(want)
        for token, (ip, _, _) in list(self.sessions.items()):
            if self.token_ip(token) != ip:
                self._end(token, "token removed or given another IP")
        exposed = tuple(
            str(r.network) for r in cfg.routes.values() if r.expose
        )
        if exposed != self._exposed:
            for _, addr, local in self.sessions.values():
                self._send(frames.NOT_LOGGED_IN_FRAME, addr, local)
        self._exposed = exposed
        self.publish()

    async def _bind(self, addr):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        deadline = time.monotonic() + BIND_RETRY_S
        while True:
            try:
                sock.bind(addr)
                break
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                    continue
                sock.close()
                self.error = f"cannot listen on UDP {addr[0]}:{addr[1]}: {exc.strerror}"
                log.error("expose failed reason=%s", self.error)
                return
        # Big buffers, and UDP_GRO: an accessor's runs arrive whole. With
        # IP_PKTINFO the writers learn the address each datagram was sent
        # to, and answer from it (a host with several addresses).
        endpoints.tune_socket(sock)
        sock.setsockopt(linux.IPPROTO_IP, linux.IP_PKTINFO, 1)
        sock.setblocking(False)
        self.sock, self.bound, self.error = sock, addr, None
        log.info("expose listening addr=%s:%d", addr[0], addr[1])
        self.send_socket()

    def close(self):
        """Close the port; every session ends with it, and each accessor is
        told so."""
        if self.sessions:
            for _, addr, local in self.sessions.values():
                self._send(frames.NOT_LOGGED_IN_FRAME, addr, local)
            log.info("accessor sessions ended count=%d", len(self.sessions))
        self.sessions = {}
        if self.sock is not None:
            self.sock.close()
        self.sock, self.bound = None, None
        self.send_socket()
        self.publish()

    def release_workers(self):
        """Make the writers drop any socket a previous control process
        gave them (before this one binds the port again)."""
        self.send_socket()

    def send_socket(self, queue=None):
        """Give the writers the socket (or take it away)."""
        for role, q, chan in self.side.channels:
            if role != "writer" or (queue is not None and q != queue):
                continue
            packed = messages.pack(messages.SET_EXPOSE, read=q == 0)
            try:
                if self.sock is not None:
                    socket.send_fds(chan, [packed], [self.sock.fileno()])
                else:
                    chan.send(packed)
            except OSError as exc:
                log.warning(
                    "expose socket not passed to writer%d errno=%s", q, exc.errno
                )

    def publish(self, queue=None):
        """Tell the writers the sessions and what accessors may reach."""
        cfg = self.cfg
        packed = messages.pack(
            messages.SET_SESSIONS,
            sessions=[
                [str(ip), a[0], a[1], local] for ip, a, local in self.sessions.values()
            ],
            exposed=list(self._exposed or ()),
            host_ip=str(cfg.host_ip),
            pong=cfg.pong,
        )
        for role, q, chan in self.side.channels:
            if role == "writer" and (queue is None or q == queue):
                try:
                    chan.send(packed)
                except OSError as exc:
                    log.warning("sessions not sent to writer%d errno=%s", q, exc.errno)

    def on_writer_started(self, queue):
        self.send_socket(queue)
        self.publish(queue)

    # logins

    def on_frame(self, src, data, local=""):
        if src is None or not data or self.sock is None:
            return
        if data[0] == frames.LOGIN and len(data) > 1:
            self._login(src, bytes(data[1:]), local)
        else:
            # Not logged in (a first hello, a session the host forgot, or a
            # token that was removed): the accessor logs in again.
            self._send(frames.NOT_LOGGED_IN_FRAME, src, local)

    def token_ip(self, token):
        """The IP of a token line, if it fits the running tunnel network (a
        changed ``addr`` waits for a restart; its tokens wait with it)."""
        ip = self.cfg.tokens.get(token)
        if ip is None or cfgmod.token_ip_problem(self.cfg, ip):
            return None
        return ip

    def _login(self, src, raw, local=""):
        token = raw.decode("utf-8", "replace")
        ip = self.token_ip(token)
        if ip is None and token in self.cfg.tokens:
            log.error(
                "accessor login refused token=%s: its IP %s is outside the running "
                "tunnel network %s", frames.redact(token), self.cfg.tokens[token],
                self.cfg.addr.network,
            )  # fmt: skip
        if ip is None:
            # No answer: guessing tokens learns nothing.
            self.refused += 1
            now = time.monotonic()
            if now - self._refused_logged > REFUSED_LOG_INTERVAL_S:
                self._refused_logged = now
                log.warning(
                    "accessor login refused src=%s:%d token=%s refused_total=%d",
                    src[0], src[1], frames.redact(token), self.refused,
                )  # fmt: skip
            return
        for other, (_, addr, _) in list(self.sessions.items()):
            if addr == src and other != token:
                # One address, one session: its packets carry one IP.
                self.sessions.pop(other)
        old = self.sessions.get(token)
        self.sessions[token] = (ip, src, local)
        self.logins += 1
        cfg = self.cfg
        session = frames.Session(
            f"{ip}/{cfg.addr.network.prefixlen}", str(cfg.host_ip), cfg.mtu,
            self._exposed or (),
        )  # fmt: skip
        # The writers learn the session before the accessor does: its first
        # packet follows the answer at once.
        self.publish()
        self._send(frames.encode_session(session), src, local)
        if old is None or old[1] != src:
            log.info(
                "accessor logged in token=%s ip=%s src=%s:%d routes=%d",
                frames.redact(token), ip, src[0], src[1], len(session.routes),
            )  # fmt: skip

    def _end(self, token, reason):
        ip, addr, local = self.sessions.pop(token)
        # Its next login gets no answer; say so now rather than at its next
        # packet.
        self._send(frames.NOT_LOGGED_IN_FRAME, addr, local)
        log.info(
            "accessor session ended token=%s ip=%s reason=%s",
            frames.redact(token), ip, reason,
        )  # fmt: skip

    def _send(self, data, addr, local=""):
        """Send to ``addr`` from ``local``, the address it dialled (if known)."""
        if self.sock is None:
            return
        try:
            self.sock.sendmsg([data], linux.send_from(local), 0, addr)
        except OSError as exc:
            log.debug("expose send failed errno=%s", exc.errno)

    def statistics(self):
        return {
            "listen": f"{self.bound[0]}:{self.bound[1]}" if self.bound else None,
            "error": self.error,
            "sessions": [
                {"token": frames.redact(t), "ip": str(ip), "from": f"{a[0]}:{a[1]}"}
                for t, (ip, a, _) in sorted(self.sessions.items())
            ],
            "logins": self.logins,
            "refused_logins": self.refused,
        }
