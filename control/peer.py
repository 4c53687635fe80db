"""Which address the host sends to: learning and keeping the VM peer.

The upstream host takes the source of any datagram as its peer, so anything
that reaches the port can steal the tunnel, and under Docker Desktop and
Lima every container reaches the host from 127.0.0.1. Here a live peer is
never replaced on a whim: a heartbeat from a new address only makes it a
candidate, and the candidate takes over once the current peer has been
silent for longer than a heartbeat interval (a live VM side sends at least
one datagram per interval). A restarted VM side is thus followed within
about one heartbeat, and a stranger cannot take a tunnel that is in use.

The last peer is kept in a small JSON state file, with what its last hello
said (capabilities, ports, networks), so a restarted host control process
sends to it in the same framing before the next heartbeat arrives.
"""

import ipaddress
import json
import logging
import os
import tempfile

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
# A live peer is never silent longer than one heartbeat interval; allow for
# scheduling and one lost heartbeat's worth of jitter.
STALE_AFTER_S = HEARTBEAT_S + 1.5
# fastfwd sides say hello every heartbeat interval; a peer silent on hello
# for this long is treated as an upstream one again.
HELLO_LEASE_S = 3 * HEARTBEAT_S + 1.0


class PeerTracker:
    """Decides the peer address from heartbeats and observed traffic.

    Times are monotonic seconds supplied by the caller, which keeps this
    pure logic and testable without a clock.
    """

    def __init__(self, state_path=None, stale_after_s=STALE_AFTER_S):
        self.state_path = state_path
        self.stale_after_s = stale_after_s
        self.peer = None
        self.last_heard = 0.0
        self.candidate = None
        self.candidate_heard = 0.0
        # A peer restored from the state file has not been heard in this
        # run yet; if the VM side restarted too, it is gone.
        self.confirmed = False
        # What the peer's hello said, as a JSON-able dict, kept with the
        # peer in the state file; None for an upstream peer.
        self.info = None

    def is_stale(self, now):
        return self.peer is None or now - self.last_heard > self.stale_after_s

    def heard(self, src, now):
        """A heartbeat from ``src`` arrived; True when the peer changed."""
        if src == self.peer:
            self.last_heard = now
            self.confirmed = True
            return False
        if self.is_stale(now) or (not self.confirmed and src[0] == self.peer[0]):
            # A restored peer is replaced at once by a new port on its own
            # address: the VM side restarted while the host was down.
            self._switch(src, now)
            return True
        self.candidate, self.candidate_heard = src, now
        return False

    def force(self, src, now):
        """An authenticated handshake from ``src``: it is the peer now.
        True when the peer changed."""
        if src == self.peer:
            self.last_heard = now
            self.confirmed = True
            return False
        self._switch(src, now)
        return True

    def traffic(self, now):
        """The current peer's packets were forwarded at ``now``."""
        if self.peer is not None and now > self.last_heard:
            self.last_heard = now
            self.confirmed = True

    def tick(self, now):
        """Promote a fresh candidate once the peer went silent; True if so."""
        if self.candidate is None:
            return False
        if now - self.candidate_heard > self.stale_after_s:
            self.candidate = None
            return False
        if self.is_stale(now):
            self._switch(self.candidate, now)
            return True
        return False

    def _switch(self, src, now):
        old = self.peer
        self.peer, self.last_heard = src, now
        self.candidate = None
        self.confirmed = True
        self.info = None
        log.info("peer connected addr=%s:%d previous=%s", src[0], src[1], _fmt(old))
        self.save()

    # persistence

    def load(self, now):
        """Take the peer from the state file; it gets one interval of grace.
        A peer already heard in this run is kept."""
        if not self.state_path or self.peer is not None:
            return None
        try:
            with open(self.state_path, encoding="utf-8") as f:
                data = json.load(f)
            ip, port = data["peer"]
            if type(port) is not int or not 0 < port < 65536 or type(ip) is not str:
                raise ValueError(f"peer {ip!r}:{port!r} is not an address")
            peer = (str(ipaddress.IPv4Address(ip)), port)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("state file ignored path=%s reason=%s", self.state_path, exc)
            return None
        info = data.get("hello")
        self.peer, self.last_heard = peer, now
        self.confirmed = False
        self.info = info if isinstance(info, dict) else None
        log.info("peer restored addr=%s:%d state=%s", peer[0], peer[1], self.state_path)
        return peer

    def save(self):
        if not self.state_path or self.peer is None:
            return
        directory = os.path.dirname(self.state_path) or "."
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fastfwd-state-")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"peer": list(self.peer), "hello": self.info}, f)
            os.replace(tmp, self.state_path)
        except OSError as exc:
            log.warning(
                "state file not written path=%s errno=%s", self.state_path, exc.errno
            )


def _fmt(addr):
    return "none" if addr is None else f"{addr[0]}:{addr[1]}"
