"""The wire format shared with desktop-docker-connector.

A datagram whose first nibble is 4 or 6 is one raw IP packet. Anything else
starts with a frame type byte:

* ``0x00`` heartbeat, VM side -> host, one byte.
* ``0x01`` host -> VM side: a 3-byte header ``0x01 LEN_HI LEN_LO`` followed
  by the comma-separated control body in datagrams of at most MTU bytes.
  Sent to the host, ``0x01`` + text is the upstream's "append this
  configuration line".
* Accessor login uses ``0x00``/``0x01`` + token and ``0x02`` (not logged in).

Both upstream sides read into 2000-byte buffers and keep body lengths in 16
bits, so a compatible peer needs MTU < 2000 and bodies under 64 KiB.

fastfwd's extensions, used only between two fastfwd sides after a hello
exchange (docs/protocol.md):

* ``0x03`` hello: capabilities, MTU and the sender's worker ports.
* ``0x10`` offload frame: a 10-byte virtio-net header, then one packet of up
  to 64 KiB that may still need segmentation (a TCP super-packet).
"""

import hashlib
import hmac
import ipaddress
import struct
import time
import zlib
from typing import NamedTuple

HEARTBEAT = 0x00
CONTROL = 0x01
NOT_LOGGED_IN = 0x02
HELLO = 0x03
OFFLOAD = 0x10

HELLO_MAGIC = b"FFWD"
HELLO_VERSION = 1
CAP_OFFLOAD = 0x0001  # the sender accepts OFFLOAD frames
CAP_RESET_PAIRS = 0x0002  # the VM side takes a "reset-pairs" command
CAP_NETWORKS = 0x0004  # the VM side reports its bridge networks
CAP_AUTH = 0x0008  # an authentication trailer follows (shared secret)
# The sender takes offload frames sent as UDP_SEGMENT runs (the kernel cuts
# one frame into MTU-sized datagrams, no IP fragmentation) and receives
# them whole through UDP_GRO; withdrawn when its path splits them.
CAP_GSO_FRAMES = 0x0010
# Not a capability: a host hello with this bit asks the VM side for its
# hello now (a restarted host control process learning what it can do).
# Only such hellos are answered, so hellos never bounce back and forth.
HELLO_ASK = 0x0020
MAX_HELLO_NETWORKS = 200
MAX_HELLO_PORTS = 255
_HELLO = struct.Struct("!B4sBHHIBB")
_NET = struct.Struct("!4sB")
# Authentication trailer: milliseconds since the epoch, then the first 16
# bytes of HMAC-SHA256(secret, everything before the MAC).
_AUTH = struct.Struct("!Q16s")


class Hello(NamedTuple):
    version: int
    caps: int
    mtu: int
    ports: tuple = ()  # the sender's worker UDP ports
    pairs_digest: int = 0  # VM side: digest of the subnet pairs it was told to connect
    networks: tuple = ()  # VM side: its bridge networks, as "a.b.c.d/n" strings
    auth_ms: int = 0  # with CAP_AUTH: the sender's clock when it signed
    authentic: bool = False  # decode_hello: the MAC matched the given secret


HEARTBEAT_FRAME = b"\x00"
CONTROL_HEADER_BYTES = 3
MAX_CONTROL_BODY_BYTES = 0xFFFF
UPSTREAM_BUFFER_BYTES = 2000

_IPV4 = 4
_IPV6 = 6


def is_ip(first_byte):
    """Whether a datagram starting with this byte is a raw IP packet."""
    version = first_byte >> 4
    return version == _IPV4 or version == _IPV6


def looks_like_ip_packet(buf, n):
    """Whether ``buf[:n]`` is plausibly one whole IP packet.

    Stricter than :func:`is_ip`: the header's own length field must match
    the datagram. A control body chunk is text whose first byte may well
    have the nibble 6 ("c", "d", "h"), but its "length field" never matches.
    """
    if n < 20:
        return False
    version = buf[0] >> 4
    if version == _IPV4:
        return buf[0] & 0x0F >= 5 and (buf[2] << 8 | buf[3]) == n
    if version == _IPV6:
        return n >= 40 and (buf[4] << 8 | buf[5]) + 40 == n
    return False


def control_header(body_len):
    """The 3-byte datagram that announces a control body."""
    if not 0 <= body_len <= MAX_CONTROL_BODY_BYTES:
        raise ValueError(f"control body of {body_len} bytes exceeds 64 KiB")
    return struct.pack("!BH", CONTROL, body_len)


def parse_control_header(data):
    """Body length announced by a header datagram, or None if it is not one."""
    if len(data) != CONTROL_HEADER_BYTES or data[0] != CONTROL:
        return None
    return data[1] << 8 | data[2]


def control_datagrams(body, mtu):
    """The datagrams that carry one control body: header, then chunks.

    ``body`` is the encoded command text; each chunk is at most ``mtu``
    bytes, as the upstream VM side expects.
    """
    if mtu < 1:
        raise ValueError("mtu must be positive")
    out = [control_header(len(body))]
    out.extend(body[i : i + mtu] for i in range(0, len(body), mtu))
    return out


def encode_commands(commands):
    """Join well-formed commands into one control body.

    Each command is a sequence of fields; fields must be non-empty and
    contain no space or comma, because the upstream VM side splits on them
    and crashes on a malformed command.
    """
    parts = []
    for command in commands:
        fields = [str(f) for f in command]
        for field in fields:
            if not field or " " in field or "," in field:
                raise ValueError(f"malformed control field {field!r}")
        parts.append(" ".join(fields))
    return ",".join(parts).encode("ascii")


def split_bodies(commands, keep_together=()):
    """Encode ``commands`` as one or more control bodies of at most 64 KiB.

    Commands are never cut; the ones in ``keep_together`` (a name table,
    which the VM side replaces as a whole per body) go into the last body
    together. Raises ValueError if ``keep_together`` alone exceeds 64 KiB.
    """
    bodies, current = [], []
    for command in commands:
        trial = encode_commands([*current, command])
        if len(trial) > MAX_CONTROL_BODY_BYTES and current:
            bodies.append(encode_commands(current))
            current = [command]
        else:
            current.append(command)
    together = list(keep_together)
    if together:
        if (
            current
            and len(encode_commands([*current, *together])) <= MAX_CONTROL_BODY_BYTES
        ):
            current.extend(together)
        else:
            if current:
                bodies.append(encode_commands(current))
            current = together
    if current:
        body = encode_commands(current)
        if len(body) > MAX_CONTROL_BODY_BYTES:
            raise ValueError("a command group exceeds 64 KiB")
        bodies.append(body)
    return bodies


def decode_commands(body):
    """Split a control body into commands, each a list of fields.

    Tolerant of what fastfwd never sends (repeated spaces, empty commands),
    so an odd peer cannot crash the VM side.
    """
    text = bytes(body).decode("ascii", errors="replace")
    return [c.split() for c in text.split(",") if c.strip()]


def encode_hello(hello, secret=None, now_ms=None):
    """The hello frame for a :class:`Hello` (ports and networks truncated to
    fit); with ``secret`` (bytes) it is signed, see :data:`CAP_AUTH`."""
    if secret:
        hello = hello._replace(caps=hello.caps | CAP_AUTH)
    ports = list(hello.ports)[:MAX_HELLO_PORTS]
    nets = [ipaddress.IPv4Network(n) for n in list(hello.networks)[:MAX_HELLO_NETWORKS]]
    head = _HELLO.pack(
        HELLO, HELLO_MAGIC, HELLO_VERSION, hello.caps, hello.mtu,
        hello.pairs_digest & 0xFFFFFFFF, len(ports), len(nets),
    )  # fmt: skip
    body = struct.pack(f"!{len(ports)}H", *ports)
    body += b"".join(_NET.pack(n.network_address.packed, n.prefixlen) for n in nets)
    if not secret:
        return head + body
    stamp = int(time.time() * 1000) if now_ms is None else now_ms
    signed = head + body + stamp.to_bytes(8, "big")
    return signed + _mac(secret, signed)


def _mac(secret, data):
    return hmac.new(secret, data, hashlib.sha256).digest()[:16]


def decode_hello(data, secret=None):
    """The :class:`Hello` in a frame, or None if the frame is malformed.

    With ``secret``, ``authentic`` tells whether the frame was signed with
    it; checking the time stamp's freshness is the caller's business.
    """
    data = bytes(data)
    if len(data) < _HELLO.size:
        return None
    kind, magic, version, caps, mtu, digest, nports, nnets = _HELLO.unpack_from(data)
    if kind != HELLO or magic != HELLO_MAGIC:
        return None
    size = _HELLO.size + 2 * nports + _NET.size * nnets
    auth_ms, authentic = 0, False
    if caps & CAP_AUTH:
        if len(data) != size + _AUTH.size:
            return None
        auth_ms, mac = _AUTH.unpack_from(data, size)
        authentic = bool(secret) and hmac.compare_digest(
            mac, _mac(secret, data[: size + 8])
        )
    elif len(data) != size:
        return None
    ports = struct.unpack_from(f"!{nports}H", data, _HELLO.size)
    nets = []
    offset = _HELLO.size + 2 * nports
    for _ in range(nnets):
        addr, prefix = _NET.unpack_from(data, offset)
        offset += _NET.size
        if prefix > 32:
            return None
        nets.append(str(ipaddress.IPv4Network((addr, prefix), strict=False)))
    return Hello(version, caps, mtu, ports, digest, tuple(nets), auth_ms, authentic)


def pairs_digest(pairs):
    """A digest of a set of subnet pairs that both sides compute alike."""
    text = "\n".join(sorted(" ".join(sorted(p)) for p in pairs))
    return zlib.crc32(text.encode("ascii"))


# Accessor login (the expose port). The accessor sends LOGIN_HELLO + token,
# the host answers NOT_LOGGED_IN, the accessor sends LOGIN + token and the
# host answers LOGIN + the session text; a datagram from an address without
# a session gets NOT_LOGGED_IN, a login with an unknown token no answer.
LOGIN_HELLO = 0x00
LOGIN = 0x01
NOT_LOGGED_IN_FRAME = b"\x02"
MAX_TOKEN_BYTES = 512


class Session(NamedTuple):
    """What a host tells an accessor at login."""

    addr: str  # the accessor's tunnel address, "IP/PREFIX"
    peer: str  # the host's tunnel IP
    mtu: int
    routes: tuple = ()  # exposed networks, "a.b.c.d/n"


def encode_session(session):
    """The upstream's login answer: ``0x01`` then ``addr A,peer P,mtu N,route R...``."""
    parts = [f"addr {session.addr}", f"peer {session.peer}", f"mtu {session.mtu}"]
    parts += [f"route {r}" for r in session.routes]
    return bytes((LOGIN,)) + ",".join(parts).encode("ascii")


def decode_session(data):
    """A :class:`Session` from a login answer, or None if it is not one.

    Unknown keys are skipped (a newer host may say more); ``addr``, ``peer``
    and ``mtu`` must be present and valid.
    """
    if len(data) < 2 or data[0] != LOGIN:
        return None
    try:
        text = bytes(data[1:]).decode("ascii")
    except UnicodeDecodeError:
        return None
    found, routes = {}, []
    for item in text.split(","):
        key, _, value = item.strip().partition(" ")
        value = value.strip()
        if key == "route":
            try:
                routes.append(str(ipaddress.IPv4Network(value, strict=False)))
            except ValueError:
                continue
        elif key in ("addr", "peer", "mtu"):
            found[key] = value
    try:
        addr = ipaddress.IPv4Interface(found["addr"])
        peer = ipaddress.IPv4Address(found["peer"])
        mtu = int(found["mtu"])
    except (KeyError, ValueError):
        return None
    if "/" not in found["addr"] or not 576 <= mtu <= 65535:
        return None
    return Session(str(addr), str(peer), mtu, tuple(routes))


def login_frame(kind, token):
    """``kind`` (LOGIN_HELLO or LOGIN) followed by the token's bytes."""
    raw = token.encode("utf-8")
    if not raw or len(raw) > MAX_TOKEN_BYTES:
        raise ValueError("a token must have 1 to 512 bytes")
    return bytes((kind,)) + raw


def redact(token):
    """A token as logs may show it: never whole."""
    if len(token) <= 4:
        return "*" * len(token)
    head = "".join(c if c.isascii() and c.isprintable() else "?" for c in token[:2])
    return head + "…" + f"({len(token)})"


def offload_frame_bytes(buf, start=0, end=None):
    """The length an OFFLOAD frame at ``buf[start]`` must have: frame byte,
    virtio-net header and the packet's own IP length; 0 if unreadable
    before ``end`` (default: the end of ``buf``)."""
    ip = start + 11
    if (len(buf) if end is None else end) < ip + 6:
        return 0
    version = buf[ip] >> 4
    if version == _IPV4:
        return 11 + (buf[ip + 2] << 8 | buf[ip + 3])
    if version == _IPV6:
        return 11 + 40 + (buf[ip + 4] << 8 | buf[ip + 5])
    return 0
