"""IPv4 packet surgery for the accessor relay, done in software.

An accessor speaks one IP packet per datagram, but a VM side in offload mode
hands the host TCP super-packets (up to 64 KiB, described by a virtio-net
header) and packets whose checksum is still partial. Before such traffic
goes to an accessor the host finishes it here: :func:`finish` completes a
partial checksum and :func:`segments` cuts a TCP super-packet into
MSS-sized packets, each with its own IP header, sequence number and
checksums, exactly as the kernel's software GSO would.

Only IPv4 is handled: accessor addresses are IPv4. Nothing here is on the
fast path of the VM <-> host tunnel; it runs for accessor traffic only.
"""

import struct

# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
_VNET = struct.Struct("<BBHHHH")
VNET_HDR_BYTES = _VNET.size
NEEDS_CSUM = 0x01
GSO_NONE, GSO_TCPV4, GSO_ECN = 0, 1, 0x80
PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
_TCP_FIN, _TCP_PSH, _TCP_CWR = 0x01, 0x08, 0x80


def checksum(data):
    """The Internet checksum of ``data`` as 2 big-endian bytes.

    The one's-complement sum of 16-bit words equals the whole buffer read
    as one big number modulo 0xFFFF (2**16 is 1 modulo 0xFFFF), which
    Python computes in C.
    """
    if len(data) & 1:
        data = bytes(data) + b"\0"
    total = int.from_bytes(data, "big") % 0xFFFF
    return (0xFFFF - total).to_bytes(2, "big")


def _pseudo(ip, proto, length):
    return bytes(ip[12:20]) + bytes((0, proto)) + length.to_bytes(2, "big")


def finish(hdr, packet):
    """Packets ready for the wire from a virtio-net header and its packet.

    Returns ``(data, size)``: the packets back to back in one buffer, each
    ``size`` bytes but the last, which may be shorter (one packet: ``size``
    is its length), ready for one ``UDP_SEGMENT`` send. None when the packet
    is of a kind this module does not finish (IPv6, a GSO type other than
    TCPv4, inconsistent offsets); the caller drops and counts it.
    """
    flags, gso_type, _, gso_size, csum_start, csum_offset = _VNET.unpack(hdr)
    kind = gso_type & ~GSO_ECN
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    if kind == GSO_NONE:
        if not flags & NEEDS_CSUM:
            return bytes(packet), len(packet)
        at = csum_start + csum_offset
        if csum_start >= len(packet) or at + 2 > len(packet):
            return None
        out = bytearray(packet)
        # The field holds the pseudo-header sum the kernel started with.
        out[at : at + 2] = checksum(out[csum_start:])
        return out, len(out)
    if kind == GSO_TCPV4 and gso_size:
        return segments(packet, gso_size)
    return None


def segments(packet, mss):
    """Cut an IPv4 TCP super-packet into packets of at most ``mss`` payload.

    Each segment gets the IP header with its own total length, a
    consecutive IP ID and a fresh header checksum, and the TCP header with
    its sequence number moved on and a full checksum. FIN and PSH stay on
    the last segment only, CWR on the first only. Returns ``(data, size)``
    as :func:`finish` does.

    The TCP checksum adds up pseudo-header, header and payload as separate
    numbers (a one's-complement sum splits at any even offset), so the
    payload is read once and copied once, into the output.
    """
    ihl = (packet[0] & 0x0F) * 4
    if packet[9] != PROTO_TCP or len(packet) < ihl + 20:
        return None
    thl = (packet[ihl + 12] >> 4) * 4
    head = ihl + thl
    if thl < 20 or len(packet) < head:
        return None
    ip = bytearray(packet[:ihl])
    tcp = bytearray(packet[ihl:head])
    payload = memoryview(packet)[head:]
    ip_id = int.from_bytes(ip[4:6], "big")
    seq = int.from_bytes(tcp[4:8], "big")
    tcp_flags = tcp[13]
    addrs = int.from_bytes(ip[12:16], "big") + int.from_bytes(ip[16:20], "big")
    total = len(payload)
    out = bytearray()
    for i, start in enumerate(range(0, max(total, 1), mss)):
        chunk = payload[start : start + mss]
        size = len(chunk)
        ip[2:4] = (head + size).to_bytes(2, "big")
        ip[4:6] = ((ip_id + i) & 0xFFFF).to_bytes(2, "big")
        ip[10:12] = b"\0\0"
        ip[10:12] = checksum(ip)
        tcp[4:8] = ((seq + start) & 0xFFFFFFFF).to_bytes(4, "big")
        f = tcp_flags
        if start + mss < total:
            f &= ~(_TCP_FIN | _TCP_PSH)
        if i:
            f &= ~_TCP_CWR
        tcp[13] = f
        tcp[16:18] = b"\0\0"
        body = int.from_bytes(chunk, "big")
        if size & 1:
            body <<= 8  # an odd tail is padded with a zero byte
        # Pseudo-header: both addresses, the protocol, the TCP length.
        sum_ = addrs + PROTO_TCP + thl + size + int.from_bytes(tcp, "big") + body
        tcp[16:18] = (0xFFFF - sum_ % 0xFFFF).to_bytes(2, "big")
        out += ip
        out += tcp
        out += chunk
    return out, head + min(mss, total) if total else head


def split(data, size):
    """The packets of a :func:`finish` result, one by one."""
    return [bytes(data[i : i + size]) for i in range(0, len(data), size)]


def echo_reply(packet):
    """The ICMP echo reply to an IPv4 echo request, or None if ``packet``
    is not a well-formed one."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != PROTO_ICMP:
        return None
    ihl = (packet[0] & 0x0F) * 4
    total = int.from_bytes(packet[2:4], "big")
    if ihl < 20 or total != len(packet) or total < ihl + 8 or packet[ihl] != 8:
        return None
    if int.from_bytes(packet[6:8], "big") & 0x3FFF:
        return None  # a fragment (MF set or an offset): not a whole request
    if not valid_checksum(packet[:ihl]) or not valid_checksum(packet[ihl:total]):
        return None
    out = bytearray(packet[:total])
    out[12:16], out[16:20] = packet[16:20], packet[12:16]
    out[8] = 64
    out[10:12] = b"\0\0"
    out[10:12] = checksum(out[:ihl])
    out[ihl] = 0  # echo reply
    out[ihl + 2 : ihl + 4] = b"\0\0"
    out[ihl + 2 : ihl + 4] = checksum(out[ihl:])
    return bytes(out)


def valid_checksum(data):
    """Whether ``data`` (a header or segment including its checksum field)
    sums to zero, as a receiver checks it."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    return int.from_bytes(data, "big") % 0xFFFF == 0
