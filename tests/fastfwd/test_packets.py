"""Software checksums and segmentation for the accessor relay, checked
against a word-by-word reference and the receiver's own checks."""

import socket
import struct

import pytest

from fastfwd import frames, packets
from tests import packets as tests_packets


def reference_checksum(data):
    """The word-by-word Internet checksum the interop tests use."""
    return tests_packets.checksum(data).to_bytes(2, "big")


@pytest.mark.parametrize(
    "data", [b"", b"\x01", b"\x45\x00\x00\x54", bytes(range(256)) * 7, b"\xff" * 64]
)
def test_checksum_matches_the_word_by_word_sum(data):
    ours = int.from_bytes(packets.checksum(data), "big")
    ref = int.from_bytes(reference_checksum(data), "big")
    # 0x0000 and 0xFFFF are the same one's-complement value.
    assert ours == ref or {ours, ref} == {0, 0xFFFF}


def tcp_super_packet(payload, flags=0x18, seq=1000, ip_id=7):
    src, dst = socket.inet_aton("172.18.0.2"), socket.inet_aton("192.168.251.5")
    tcp = struct.pack("!HHIIBBHHH", 5201, 40000, seq, 99, 5 << 4, flags, 512, 0, 0)
    total = 20 + len(tcp) + len(payload)
    ip = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ip_id, 0x4000, 64, 6, 0, src, dst)
    )
    # As the kernel hands it over: the checksum field holds the
    # (uncomplemented) sum of the pseudo-header.
    pseudo = src + dst + bytes((0, 6)) + (len(tcp) + len(payload)).to_bytes(2, "big")
    partial = 0xFFFF - int.from_bytes(packets.checksum(pseudo), "big")
    tcp = tcp[:16] + partial.to_bytes(2, "big") + tcp[18:]
    return bytes(ip) + tcp + payload


def vnet(gso_type, gso_size, flags=packets.NEEDS_CSUM, csum_start=20, csum_offset=16):
    return struct.pack("<BBHHHH", flags, gso_type, 40, gso_size, csum_start, csum_offset)


def test_super_packet_is_cut_into_valid_mss_segments():
    payload = bytes(range(256)) * 20 + b"odd"  # 5123 bytes: an odd tail
    pkt = tcp_super_packet(payload, flags=0x19 | 0x80)  # FIN PSH ACK CWR
    data, size = packets.finish(vnet(packets.GSO_TCPV4, 1360), pkt)
    assert size == 1400
    out = packets.split(data, size)
    assert [len(p) - 40 for p in out] == [1360, 1360, 1360, 1043]
    rebuilt = b""
    for i, seg in enumerate(out):
        assert packets.valid_checksum(seg[:20]), "IP header checksum"
        tcp_len = len(seg) - 20
        pseudo = seg[12:20] + bytes((0, 6)) + tcp_len.to_bytes(2, "big")
        assert packets.valid_checksum(pseudo + seg[20:]), "TCP checksum"
        assert int.from_bytes(seg[2:4], "big") == len(seg)
        assert int.from_bytes(seg[4:6], "big") == 7 + i
        assert int.from_bytes(seg[24:28], "big") == 1000 + 1360 * i
        flags = seg[33]
        last = i == len(out) - 1
        assert bool(flags & 0x01) == last and bool(flags & 0x08) == last
        assert bool(flags & 0x80) == (i == 0)
        assert flags & 0x10  # ACK everywhere
        rebuilt += seg[40:]
    assert rebuilt == payload


def test_partial_checksum_is_completed():
    pkt = tcp_super_packet(b"hello world")
    out, size = packets.finish(vnet(packets.GSO_NONE, 0), pkt)
    assert size == len(out) == len(pkt)
    pseudo = out[12:20] + bytes((0, 6)) + (len(out) - 20).to_bytes(2, "big")
    assert packets.valid_checksum(pseudo + out[20:])
    assert out[:36] == pkt[:36] and out[38:] == pkt[38:] and out[36:38] != pkt[36:38]


def test_unsupported_packets_are_refused():
    v6 = bytes([0x60]) + bytes(59)
    assert packets.finish(vnet(packets.GSO_NONE, 0), v6) is None
    assert packets.finish(vnet(4, 1360), tcp_super_packet(b"x" * 3000)) is None  # TCPv6
    assert packets.finish(vnet(packets.GSO_NONE, 0, csum_start=2000), tcp_super_packet(b"x")) is None


def test_echo_reply_swaps_addresses_and_keeps_checksums_valid():
    icmp = bytearray(b"\x08\x00\x00\x00\x12\x34\x00\x01" + b"ping" * 14)
    icmp[2:4] = packets.checksum(icmp)
    ip = bytearray(struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0,
        socket.inet_aton("192.168.251.5"), socket.inet_aton("192.168.251.2"),
    ))  # fmt: skip
    ip[10:12] = packets.checksum(ip)
    reply = packets.echo_reply(bytes(ip + icmp))
    assert reply[12:16] == socket.inet_aton("192.168.251.2")
    assert reply[16:20] == socket.inet_aton("192.168.251.5")
    assert reply[20] == 0 and reply[24:] == bytes(icmp[4:])
    assert packets.valid_checksum(reply[:20]) and packets.valid_checksum(reply[20:])
    assert packets.echo_reply(bytes(ip[:20]) + b"\x00" + bytes(icmp[1:])) is None
    # Only whole, well-formed requests are answered: not a first fragment,
    # not a bad ICMP checksum, not a datagram longer than its IP length.
    frag = bytearray(ip)
    frag[6] |= 0x20  # more fragments
    frag[10:12] = b"\0\0"
    frag[10:12] = packets.checksum(frag)
    assert packets.echo_reply(bytes(frag + icmp)) is None
    bad = bytearray(icmp)
    bad[-1] ^= 0xFF
    assert packets.echo_reply(bytes(ip + bad)) is None
    assert packets.echo_reply(bytes(ip + icmp) + b"junk") is None


def test_session_answer_round_trips_and_matches_the_upstream_text():
    s = frames.Session("192.168.251.5/24", "192.168.251.2", 1400, ("172.18.0.0/16", "10.1.0.0/24"))
    data = frames.encode_session(s)
    assert data == (
        b"\x01addr 192.168.251.5/24,peer 192.168.251.2,mtu 1400,"
        b"route 172.18.0.0/16,route 10.1.0.0/24"
    )
    assert frames.decode_session(data) == s
    assert frames.decode_session(b"\x01addr 192.168.251.5/24,mtu 1400") is None
    assert frames.decode_session(b"\x02") is None
    # Unknown keys and broken routes are skipped.
    got = frames.decode_session(b"\x01addr 10.0.0.5/24,peer 10.0.0.2,mtu 1400,x y,route bad")
    assert got.routes == ()


def test_tokens_are_never_logged_whole():
    for token in ("abc", "abcd", "a-long-secret-token"):
        shown = frames.redact(token)
        assert token not in shown
    assert frames.login_frame(frames.LOGIN, "tok") == b"\x01tok"
    with pytest.raises(ValueError):
        frames.login_frame(frames.LOGIN, "")
