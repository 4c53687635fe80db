"""In-memory stand-ins for the TUN device and the UDP transport.

They are real file descriptors with datagram semantics, so the engine's
reads, writes and readiness callbacks behave exactly as with the kernel's
TUN queue: one read returns one whole packet, a read that would block
returns nothing, one write is one packet.
"""

import socket
import struct


class FakeTun:
    """A TUN queue: give ``engine_fd`` to the engine, use ``send``/``recv``."""

    def __init__(self):
        self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._theirs.setblocking(False)
        self._ours.settimeout(2.0)
        self.engine_fd = self._theirs.fileno()

    def inject(self, packet):
        """A packet the kernel routed into the TUN (the reader will read it)."""
        self._ours.send(packet)

    def written(self, timeout_s=2.0):
        """The next packet the engine wrote into the TUN."""
        self._ours.settimeout(timeout_s)
        return self._ours.recv(65536)

    def nothing_written(self, timeout_s=0.2):
        self._ours.settimeout(timeout_s)
        try:
            self._ours.recv(65536)
        except TimeoutError:
            return True
        return False

    def close(self):
        self._ours.close()
        self._theirs.close()


def udp_pair():
    """Two UDP sockets on loopback: ``(engine_side, peer_side)``."""
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    a.setblocking(False)
    b.settimeout(2.0)
    return a, b


def ipv4_packet(payload=b"x" * 32, src="10.9.0.1", dst="10.9.0.2", proto=17):
    """A syntactically valid IPv4 packet (checksum not computed)."""
    total = 20 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    return header + payload


def ipv6_packet(payload=b"y" * 16):
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(payload),
        17,
        64,
        b"\xfd" + b"\0" * 15,
        b"\xfd" + b"\0" * 14 + b"\1",
    )
    return header + payload
