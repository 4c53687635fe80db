"""Building and reading the few IPv4/ICMP packets the interop tests need."""

import socket
import struct


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src, dst, proto, payload, ttl=64, ident=7):
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, ttl, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def icmp_echo(src, dst, ident, seq, kind=8, data=b"fastfwd-interop"):
    body = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return ipv4(src, dst, 1, body)


def parse_icmp(packet):
    """``(src, dst, type, ident, seq)`` of an IPv4 ICMP echo packet, or None."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != 1:
        return None
    ihl = (packet[0] & 0x0F) * 4
    kind, _, _, ident, seq = struct.unpack("!BBHHH", packet[ihl : ihl + 8])
    return (
        socket.inet_ntoa(packet[12:16]),
        socket.inet_ntoa(packet[16:20]),
        kind,
        ident,
        seq,
    )


def echo_reply_to(request):
    """The echo reply a pinged host would send back for ``request``."""
    src, dst, kind, ident, seq = parse_icmp(request)
    ihl = (request[0] & 0x0F) * 4
    data = request[ihl + 8 :]
    return icmp_echo(dst, src, ident, seq, kind=0, data=data)
