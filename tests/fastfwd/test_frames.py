from fastfwd import frames
from tests.fakes import ipv4_packet, ipv6_packet


def test_is_ip_accepts_versions_4_and_6_only():
    assert frames.is_ip(0x45)
    assert frames.is_ip(0x60)
    assert not frames.is_ip(0x00)
    assert not frames.is_ip(0x01)
    assert not frames.is_ip(0x5F)


def test_control_datagrams_split_body_in_mtu_chunks_after_header():
    body = frames.encode_commands([("connect", "172.18.0.0", "172.19.0.0")] * 100)
    datagrams = frames.control_datagrams(body, 1400)
    assert datagrams[0] == bytes([1, len(body) >> 8, len(body) & 0xFF])
    assert all(len(d) <= 1400 for d in datagrams[1:])
    assert b"".join(datagrams[1:]) == body
    assert len(datagrams) == 1 + -(-len(body) // 1400)


def test_control_header_rejects_body_over_64k():
    try:
        frames.control_header(70000)
    except ValueError:
        return
    raise AssertionError("a 70000-byte body was accepted")


def test_parse_control_header_only_takes_three_byte_frames():
    assert frames.parse_control_header(b"\x01\x01\x00") == 256
    assert frames.parse_control_header(b"\x01\x01") is None
    assert frames.parse_control_header(b"\x00\x01\x00") is None


def test_encode_commands_refuses_fields_the_upstream_would_crash_on():
    for bad in ("", "a b", "a,b"):
        try:
            frames.encode_commands([("connect", bad, "172.19.0.0")])
        except ValueError:
            continue
        raise AssertionError(f"field {bad!r} was accepted")


def test_decode_commands_tolerates_extra_spaces_and_empty_commands():
    assert frames.decode_commands(b"connect  a b,, disconnect c d ,") == [
        ["connect", "a", "b"],
        ["disconnect", "c", "d"],
    ]


def test_looks_like_ip_packet_tells_packets_from_control_text():
    v4, v6 = ipv4_packet(), ipv6_packet()
    assert frames.looks_like_ip_packet(v4, len(v4))
    assert frames.looks_like_ip_packet(v6, len(v6))
    text = b"connect 172.18.0.0 172.19.0.0,disconnect 172.20.0.0 172.21.0.0"
    assert not frames.looks_like_ip_packet(text, len(text))
    assert not frames.looks_like_ip_packet(v4, len(v4) - 1)


def test_hello_round_trip_with_ports_digest_and_networks():
    hello = frames.Hello(
        1,
        frames.CAP_OFFLOAD | frames.CAP_NETWORKS,
        1400,
        (40000, 40001),
        0xDEADBEEF,
        ("172.18.0.0/16", "10.5.0.0/24"),
    )
    assert frames.decode_hello(frames.encode_hello(hello)) == hello


def test_malformed_hellos_are_rejected():
    good = frames.encode_hello(frames.Hello(1, 0, 1400, (1,), 0, ("172.18.0.0/16",)))
    assert frames.decode_hello(good[:-1]) is None
    assert frames.decode_hello(good + b"x") is None
    assert frames.decode_hello(b"\x03NOPE" + good[5:]) is None
    assert frames.decode_hello(good[:-1] + b"\x40") is None  # prefix length 64


def test_pairs_digest_ignores_order_within_and_between_pairs():
    a = frames.pairs_digest(
        [("172.18.0.0", "172.19.0.0"), ("172.20.0.0", "172.21.0.0")]
    )
    b = frames.pairs_digest(
        [("172.21.0.0", "172.20.0.0"), ("172.19.0.0", "172.18.0.0")]
    )
    assert a == b != frames.pairs_digest([])


def test_split_bodies_keeps_each_body_under_64k_and_names_together():
    pairs = [
        ("connect", f"10.{i // 256}.{i % 256}.0", f"10.200.{i % 256}.0")
        for i in range(4000)
    ]
    names = [("dns", "dev.test"), ("host", "192.168.251.2", "a.dev.test", "b.dev.test")]
    bodies = frames.split_bodies(pairs, keep_together=names)
    assert len(bodies) >= 2
    assert all(len(b) <= frames.MAX_CONTROL_BODY_BYTES for b in bodies)
    decoded = [frames.decode_commands(b) for b in bodies]
    assert sum(len(d) for d in decoded) == len(pairs) + len(names)
    assert [c for d in decoded for c in d if c[0] in ("dns", "host")] == decoded[-1][
        -2:
    ]


def test_split_bodies_of_a_small_set_is_one_body():
    assert frames.split_bodies([("connect", "a", "b")]) == [b"connect a b"]


def test_signed_hello_is_authentic_only_with_the_same_secret():
    hello = frames.Hello(1, frames.CAP_OFFLOAD, 1400, (40000,), 5, ("172.18.0.0/16",))
    signed = frames.encode_hello(hello, b"a-secret-of-16-chars", now_ms=1234)
    good = frames.decode_hello(signed, b"a-secret-of-16-chars")
    assert good.authentic and good.auth_ms == 1234 and good.caps & frames.CAP_AUTH
    assert not frames.decode_hello(signed, b"another-secret-of-16").authentic
    assert not frames.decode_hello(signed).authentic
    tampered = bytearray(signed)
    tampered[9] ^= 1  # the MTU
    assert not frames.decode_hello(bytes(tampered), b"a-secret-of-16-chars").authentic
