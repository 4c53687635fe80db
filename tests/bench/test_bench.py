"""Micro-benchmarks of the per-packet steps, reported, never asserted.

They run once as plain tests in the normal suite (pytest-benchmark is
disabled there by ``--benchmark-disable``); for figures run
``.venv/bin/python -m pytest tests/bench --benchmark-enable``.
"""

import asyncio
import socket

import pytest

from control import messages
from fastfwd import engine, frames
from fastfwd import stats as st
from tests.fakes import FakeTun, ipv4_packet

BATCH = 256


def test_bench_classify_batch(benchmark):
    packets = [ipv4_packet(), b"\x00", b"\x01\x00\x05", bytes([0x60]) + b"\0" * 60] * (
        BATCH // 4
    )

    def classify():
        return sum(1 for p in packets if frames.is_ip(p[0]))

    assert benchmark(classify) == BATCH // 2


def test_bench_looks_like_ip_packet(benchmark):
    p = ipv4_packet(b"z" * 1300)
    assert benchmark(frames.looks_like_ip_packet, p, len(p))


def test_bench_control_encoding(benchmark):
    commands = [
        ("connect", f"172.{18 + i}.0.0", f"172.{100 + i}.0.0") for i in range(60)
    ]

    def encode():
        return frames.control_datagrams(frames.encode_commands(commands), 1400)

    assert len(benchmark(encode)) == 3


def test_bench_hello_round_trip(benchmark):
    hello = frames.encode_hello(
        frames.Hello(1, frames.CAP_OFFLOAD, 1400, (40000, 40001), 7, ("172.18.0.0/16",))
    )
    assert benchmark(frames.decode_hello, hello).mtu == 1400


def test_bench_message_pack_unpack(benchmark):
    data = messages.pack(
        messages.SET_PEER, addrs=[["10.0.0.2", 40000]], framing="offload"
    )
    assert benchmark(messages.unpack, data)["framing"] == "offload"


@pytest.fixture
def reader_rig():
    loop = asyncio.new_event_loop()
    fd = st.create(1)
    counters = st.Counters(fd)
    tun = FakeTun()
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    out.setblocking(False)
    reader = engine.Reader(loop, tun.engine_fd, out, counters.slot(0), connected=False)
    reader.set_peer(sink.getsockname())
    yield reader, tun, sink
    del reader
    loop.close()
    tun.close()
    out.close()
    sink.close()


def test_bench_reader_batch_tun_to_udp(benchmark, reader_rig):
    """One wake-up of the reader draining 8 packets from TUN to UDP (the
    fake TUN's datagram queue holds few packets: net.unix.max_dgram_qlen)."""
    reader, tun, sink = reader_rig
    packet = ipv4_packet(b"p" * 1372)
    sink.setblocking(False)

    def setup():
        for _ in range(8):
            tun.inject(packet)
        try:
            while True:
                sink.recv(65536)
        except BlockingIOError:
            pass

    benchmark.pedantic(reader._on_tun_readable, setup=setup, rounds=50)
    assert reader._c[st.PKTS_OUT] >= 8
