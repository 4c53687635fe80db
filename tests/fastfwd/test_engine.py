import asyncio
import socket

import pytest

from control import messages
from fastfwd import engine, frames
from fastfwd import stats as st
from tests.fakes import FakeTun, ipv4_packet, ipv6_packet, udp_pair


@pytest.fixture
def counters():
    fd = st.create(1)
    c = st.Counters(fd)
    yield c
    import os

    os.close(fd)


@pytest.fixture
def rig(counters):
    loop = asyncio.new_event_loop()
    tun = FakeTun()
    ours, peer = udp_pair()
    ctl_a, ctl_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ctl_a.setblocking(False)
    ctl_b.settimeout(2.0)
    r = type("Rig", (), {})()
    r.loop, r.tun, r.sock, r.peer, r.control, r.counters = (
        loop,
        tun,
        ours,
        peer,
        ctl_b,
        counters,
    )
    r.reader_slot = counters.slot(0)
    r.writer_slot = counters.slot(1)
    r.reader = engine.Reader(loop, tun.engine_fd, ours, r.reader_slot, connected=False)
    r.writer = engine.Writer(
        loop, tun.engine_fd, ours, r.writer_slot, ctl_a, connected=False
    )
    r.spin = lambda: loop.run_until_complete(asyncio.sleep(0.05))
    yield r
    for h in (r.reader, r.writer):
        try:
            h.stop()
        except Exception:
            pass
    del r.reader_slot, r.writer_slot
    loop.close()
    tun.close()
    ours.close()
    peer.close()
    ctl_a.close()
    ctl_b.close()


def test_reader_sends_tun_packets_to_the_peer_and_counts_them(rig):
    rig.reader.set_peer(rig.peer.getsockname())
    rig.reader.start()
    packets = [ipv4_packet(bytes([i]) * 100) for i in range(5)]
    for p in packets:
        rig.tun.inject(p)
    rig.spin()
    got = [rig.peer.recv(65536) for _ in packets]
    assert got == packets
    assert rig.reader_slot[st.PKTS_OUT] == 5
    assert rig.reader_slot[st.BYTES_OUT] == sum(len(p) for p in packets)
    assert rig.reader_slot[st.LAST_OUT_NS] > 0


def test_reader_without_peer_drops_and_counts(rig):
    rig.reader.start()
    rig.tun.inject(ipv4_packet())
    rig.spin()
    assert rig.reader_slot[st.DROPS_NO_PEER] == 1
    assert rig.reader_slot[st.PKTS_OUT] == 0


def test_writer_puts_peer_ip_packets_into_tun(rig):
    rig.writer.set_peer([rig.peer.getsockname()])
    rig.writer.start()
    v4, v6 = ipv4_packet(), ipv6_packet()
    rig.peer.sendto(v4, rig.sock.getsockname())
    rig.peer.sendto(v6, rig.sock.getsockname())
    rig.spin()
    assert rig.tun.written() == v4
    assert rig.tun.written() == v6
    assert rig.writer_slot[st.PKTS_OUT] == 2
    assert rig.writer_slot[st.LAST_IN_NS] > 0


def test_writer_drops_ip_packets_from_an_address_that_is_not_the_peer(rig):
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rig.writer.set_peer([rig.peer.getsockname()])
    rig.writer.start()
    stranger.sendto(ipv4_packet(), rig.sock.getsockname())
    rig.spin()
    stranger.close()
    assert rig.tun.nothing_written()
    assert rig.writer_slot[st.DROPS_UNKNOWN_SRC] == 1


def test_writer_hands_heartbeats_to_control_with_their_source(rig):
    rig.writer.start()
    rig.peer.sendto(frames.HEARTBEAT_FRAME, rig.sock.getsockname())
    rig.spin()
    msg = messages.unpack(rig.control.recv(65536))
    assert msg["op"] == messages.FRAME
    assert msg["data"] == b"\x00"
    assert tuple(msg["src"]) == rig.peer.getsockname()
    assert rig.writer_slot[st.FRAMES_TO_CONTROL] == 1


def test_writer_drops_malformed_and_empty_datagrams(rig):
    rig.writer.set_peer([rig.peer.getsockname()])
    rig.writer.start()
    rig.peer.sendto(b"\xff" * 40, rig.sock.getsockname())
    rig.peer.sendto(b"", rig.sock.getsockname())
    rig.spin()
    assert rig.writer_slot[st.DROPS_MALFORMED] == 2
    assert rig.tun.nothing_written()


def _connected_writer(rig):
    # The client role: the socket stays unconnected, the peer is told.
    rig.peer.connect(rig.sock.getsockname())
    w = engine.Writer(
        rig.loop,
        rig.tun.engine_fd,
        rig.sock,
        rig.writer_slot,
        rig.writer._channel,
        connected=True,
    )
    w.set_peer([rig.peer.getsockname()])
    w.start()
    return w


def test_vm_writer_reassembles_a_control_body_split_over_datagrams(rig):
    w = _connected_writer(rig)
    body = frames.encode_commands([("connect", "172.18.0.0", "172.19.0.0")] * 3)
    for d in frames.control_datagrams(body, 16):
        rig.peer.send(d)
    rig.spin()
    w.stop()
    msg = messages.unpack(rig.control.recv(65536))
    assert msg == {"op": messages.CONTROL_BODY, "body": body}
    assert rig.tun.nothing_written()


def test_vm_writer_forwards_an_ip_packet_that_arrives_inside_a_body(rig):
    w = _connected_writer(rig)
    body = b"connect 172.18.0.0 172.19.0.0"
    header, first, second = frames.control_datagrams(body, 20)
    packet = ipv4_packet()
    for d in (header, first, packet, second):
        rig.peer.send(d)
    rig.spin()
    w.stop()
    assert rig.tun.written() == packet
    assert messages.unpack(rig.control.recv(65536))["body"] == body


def test_vm_writer_abandons_a_body_whose_chunk_never_comes(rig, monkeypatch):
    monkeypatch.setattr(engine, "CONTROL_BODY_TIMEOUT_NS", 0)
    w = _connected_writer(rig)
    rig.peer.send(frames.control_header(100))
    rig.spin()
    packet = ipv6_packet()
    rig.peer.send(packet)
    rig.spin()
    w.stop()
    assert rig.writer_slot[st.CONTROL_ABORTED] == 1
    assert rig.tun.written() == packet


def test_vm_writer_takes_nothing_from_strangers_before_its_host_is_known(rig):
    w = engine.Writer(
        rig.loop,
        rig.tun.engine_fd,
        rig.sock,
        rig.writer_slot,
        rig.writer._channel,
        connected=True,
    )
    w.start()
    body = b"connect 172.18.0.0 172.19.0.0"
    for d in frames.control_datagrams(body, 1400) + [ipv4_packet()]:
        rig.peer.sendto(d, rig.sock.getsockname())
    rig.spin()
    w.stop()
    assert rig.writer_slot[st.DROPS_UNKNOWN_SRC] == 3
    assert rig.tun.nothing_written()
    rig.control.settimeout(0.2)
    with pytest.raises(TimeoutError):
        rig.control.recv(65536)


def test_host_writer_counts_peer_heartbeats_as_liveness_without_control(rig):
    rig.writer.set_peer([rig.peer.getsockname()])
    rig.writer.start()
    rig.peer.sendto(frames.HEARTBEAT_FRAME, rig.sock.getsockname())
    rig.spin()
    assert rig.writer_slot[st.LAST_IN_NS] > 0
    assert rig.writer_slot[st.FRAMES_TO_CONTROL] == 0


def test_host_writer_throttles_a_stranger_flooding_heartbeats(rig):
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rig.writer.set_peer([rig.peer.getsockname()])
    rig.writer.start()
    for _ in range(300):
        stranger.sendto(frames.HEARTBEAT_FRAME, rig.sock.getsockname())
    rig.spin()
    stranger.close()
    handed = rig.writer_slot[st.FRAMES_TO_CONTROL]
    assert handed <= engine.STRANGER_BURST + 10
    received = rig.writer_slot[st.PKTS_IN]  # the kernel may drop some of 300
    assert received > engine.STRANGER_BURST + 10
    assert (
        rig.writer_slot[st.DROPS_THROTTLED]
        + handed
        + rig.writer_slot[st.DROPS_CONTROL_FULL]
        == received
    )


def test_writer_counts_ip_junk_shorter_than_a_header_as_malformed(rig):
    rig.writer.set_peer([rig.peer.getsockname()])
    rig.writer.start()
    rig.peer.sendto(b"\x45", rig.sock.getsockname())
    rig.peer.sendto(b"\x60" * 19, rig.sock.getsockname())
    rig.spin()
    assert rig.writer_slot[st.DROPS_MALFORMED] == 2
    assert rig.tun.nothing_written()


def test_vm_writer_aborts_a_body_longer_than_announced(rig):
    w = _connected_writer(rig)
    rig.peer.send(frames.control_header(10))
    rig.peer.send(b"connect 172.18.0.0 172.19.0.0")
    rig.spin()
    w.stop()
    assert rig.writer_slot[st.CONTROL_ABORTED] == 1
    assert rig.writer_slot[st.CONTROL_BODIES] == 0


def test_reader_sends_runs_of_equal_packets_as_separate_datagrams_in_order(
    rig, counters
):
    reader = engine.Reader(
        rig.loop,
        rig.tun.engine_fd,
        rig.sock,
        counters.slot(0),
        connected=False,
        gso=True,
    )
    reader.set_peer(rig.peer.getsockname())
    reader.start()
    packets = [ipv4_packet(bytes([i]) * 1000) for i in range(4)]
    packets += [
        ipv4_packet(b"s" * 500),
        ipv4_packet(b"L" * 1300),
        ipv4_packet(b"L" * 1300),
    ]
    for p in packets:
        rig.tun.inject(p)
    rig.spin()
    reader.stop()
    got = [rig.peer.recv(65536) for _ in packets]
    assert got == packets  # one packet per datagram, as an upstream peer needs
    assert counters.slot(0)[st.PKTS_OUT] == len(packets)


def test_writer_splits_a_run_received_with_udp_gro(rig):
    from fastfwd.endpoints import tune_socket

    tune_socket(rig.sock)  # turns UDP_GRO on
    w = engine.Writer(
        rig.loop,
        rig.tun.engine_fd,
        rig.sock,
        rig.writer_slot,
        rig.writer._channel,
        connected=False,
    )
    assert w._gro
    w.set_peer([rig.peer.getsockname()])
    w.start()
    packets = [ipv4_packet(bytes([i]) * 1000) for i in range(5)] + [
        ipv4_packet(b"t" * 300)
    ]
    run = b"".join(packets)
    seg = len(packets[0])
    rig.peer.sendmsg(
        [run],
        [(engine.SOL_UDP, engine.UDP_SEGMENT, seg.to_bytes(2, "little"))],
        0,
        rig.sock.getsockname(),
    )
    rig.spin()
    w.stop()
    assert [rig.tun.written() for _ in packets] == packets
    assert rig.writer_slot[st.PKTS_OUT] == len(packets)


def test_a_flood_on_the_expose_port_leaves_the_tunnels_budget_alone(rig):
    """Strangers' frames on the expose port and on the tunnel's port have
    separate budgets: a login flood cannot keep a new VM side out."""
    expose, flooder = udp_pair()
    rig.writer.set_expose(expose, True)
    rig.writer.start()
    for _ in range(int(engine.STRANGER_BURST) + 50):
        flooder.sendto(b"\x00flood", expose.getsockname())
    rig.spin()
    assert rig.writer_slot[st.DROPS_THROTTLED] >= 40
    rig.peer.sendto(frames.HEARTBEAT_FRAME, rig.sock.getsockname())
    rig.spin()
    ops = []
    rig.control.settimeout(0.2)
    try:
        while True:
            ops.append(messages.unpack(rig.control.recv(65536))["op"])
    except TimeoutError:
        pass
    assert ops.count(messages.EXPOSE_FRAME) == int(engine.EXPOSE_SOURCE_BURST)
    assert ops[-1] == messages.FRAME  # the heartbeat still got through
    flooder.close()


def test_one_flooding_source_leaves_other_accessors_logins_alone(rig):
    expose, flooder = udp_pair()
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.2", 0))
    rig.writer.set_expose(expose, True)
    rig.writer.start()
    for _ in range(500):
        flooder.sendto(b"\x00flood", expose.getsockname())
    rig.spin()
    other.sendto(b"\x01token", expose.getsockname())
    rig.spin()
    rig.control.settimeout(0.2)
    srcs = []
    try:
        while True:
            msg = messages.unpack(rig.control.recv(65536))
            srcs.append(msg["src"][0])
    except TimeoutError:
        pass
    assert srcs.count("127.0.0.1") == int(engine.EXPOSE_SOURCE_BURST)
    assert srcs[-1] == "127.0.0.2"  # the login still reached control
    flooder.close()
    other.close()


def _offload_frame(payload_bytes):
    """An OFFLOAD frame: frame byte, a virtio-net header, an IPv4 packet."""
    from fastfwd.packets import GSO_NONE, VNET_HDR_BYTES
    import struct

    hdr = struct.pack("<BBHHHH", 0, GSO_NONE, 0, 0, 0, 0)
    assert len(hdr) == VNET_HDR_BYTES
    return bytes([frames.OFFLOAD]) + hdr + ipv4_packet(b"g" * payload_bytes)


def _gso_writer(rig, client=False):
    from fastfwd.endpoints import tune_socket

    tune_socket(rig.sock)  # UDP_GRO on
    w = engine.Writer(
        rig.loop, rig.tun.engine_fd, rig.sock, rig.writer_slot,
        rig.writer._channel, connected=client, vnet_hdr=True,
    )  # fmt: skip
    w.set_peer([rig.peer.getsockname()])
    w.start()
    return w


def _assert_piece_dropped(rig, w, piece):
    """``piece`` of a frame, sent alone, is counted and never written."""
    rig.peer.sendto(piece, rig.sock.getsockname())
    rig.spin()
    w.stop()
    assert rig.writer_slot[st.DROPS_SPLIT] == 1
    assert rig.tun.nothing_written()


def test_writer_takes_a_gso_frame_whole_and_drops_a_cut_up_one(rig):
    import sys

    w = _gso_writer(rig)
    frame = _offload_frame(6000)
    cmsg = [(socket.SOL_UDP, 103, (1400).to_bytes(2, sys.byteorder))]  # UDP_SEGMENT
    rig.peer.sendmsg([frame], cmsg, 0, rig.sock.getsockname())
    rig.spin()
    assert rig.tun.written() == frame[1:]  # header and packet, as one write
    # The first datagram of a frame alone (the path cut it up): not written.
    _assert_piece_dropped(rig, w, frame[:1400])


def test_reader_sends_offload_frames_as_runs_of_path_sized_datagrams(rig):
    reader = engine.Reader(
        rig.loop, rig.tun.engine_fd, rig.sock, rig.reader_slot,
        connected=False, vnet_hdr=True,
    )  # fmt: skip
    reader.set_peer(rig.peer.getsockname())
    reader.set_framing(engine.OFFLOAD)
    reader.set_frame_segments(1400)
    reader.start()
    frame = _offload_frame(6000)
    rig.tun.inject(frame[1:])  # what TUN hands over: header and packet
    rig.spin()
    reader.stop()
    got = b""
    sizes = []
    rig.peer.settimeout(0.5)
    while len(got) < len(frame):
        d = rig.peer.recv(65536)
        sizes.append(len(d))
        got += d
    assert got == frame
    assert sizes[:-1] == [1400] * (len(sizes) - 1) and len(sizes) == -(-len(frame) // 1400)


def test_a_cut_up_frame_during_a_control_body_is_never_written(rig):
    """The slow path (a control body being collected) checks frames too."""
    w = _gso_writer(rig, client=True)
    rig.peer.sendto(frames.control_header(100), rig.sock.getsockname())
    _assert_piece_dropped(rig, w, _offload_frame(6000)[:1400])


def test_a_peer_in_offload_framing_sends_frames_only(rig):
    """Once the peer's first frame has arrived, a bare IP packet from it is
    not its own (a piece of a cut-up frame, say): dropped, never written.
    Before that it is: the sides switch framing one after the other."""
    w = _gso_writer(rig)
    w.set_peer([rig.peer.getsockname()], engine.OFFLOAD)
    early = ipv4_packet(b"early")
    rig.peer.sendto(early, rig.sock.getsockname())
    rig.spin()
    assert rig.tun.written() == bytes(10) + early  # sent before the switch
    frame = _offload_frame(100)
    rig.peer.sendto(frame, rig.sock.getsockname())
    rig.spin()
    assert rig.tun.written() == frame[1:]
    # The same peer told again (every hello does): frames only still.
    w.set_peer([rig.peer.getsockname()], engine.OFFLOAD)
    rig.peer.sendto(ipv4_packet(), rig.sock.getsockname())
    rig.spin()
    assert rig.tun.nothing_written()
    assert rig.writer_slot[st.DROPS_MALFORMED] == 1
    # A new peer starts over: its packets from before its switch pass.
    w.set_peer([rig.peer.getsockname(), ("127.0.0.1", 9)], engine.OFFLOAD)
    rig.peer.sendto(early, rig.sock.getsockname())
    rig.spin()
    w.stop()
    assert rig.tun.written() == bytes(10) + early


def _send_run(rig, datagrams):
    """Send equal-sized datagrams (the last may be shorter) as one
    UDP_SEGMENT run: on the wire they are separate datagrams, and a socket
    with UDP_GRO takes them as one buffer, as it does when a receiving NIC's
    GRO joins datagrams that were sent one by one."""
    import sys

    seg = len(datagrams[0])
    cmsg = [(socket.SOL_UDP, 103, seg.to_bytes(2, sys.byteorder))]  # UDP_SEGMENT
    rig.peer.sendmsg([b"".join(datagrams)], cmsg, 0, rig.sock.getsockname())


def test_writer_takes_frames_that_udp_gro_joined_one_by_one(rig):
    """Small frames of one size (a flow's ACKs) sent one by one can reach
    the socket joined by the receiving NIC's GRO: each is written."""
    w = _gso_writer(rig)
    w.set_peer([rig.peer.getsockname()], engine.OFFLOAD)
    acks = [_offload_frame(12) for _ in range(4)]
    acks[1] = acks[1][:-1] + b"x"  # four frames, not one repeated
    _send_run(rig, acks + [_offload_frame(3)])
    rig.spin()
    w.stop()
    assert [rig.tun.written() for _ in range(5)] == [f[1:] for f in acks] + [
        _offload_frame(3)[1:]
    ]
    assert rig.writer_slot[st.PKTS_OUT] == 5
    assert rig.writer_slot[st.DROPS_SPLIT] == 0


def test_writer_takes_a_gso_frame_and_the_frame_gro_joined_to_it(rig):
    """A GSO frame that fills its last segment exactly does not end GRO's
    run: the next frame arrives in the same buffer, and both are written."""
    w = _gso_writer(rig)
    seg = 1000
    big = _offload_frame(3 * seg - 11 - 20)  # 3 segments, the last full
    assert len(big) == 3 * seg
    small = _offload_frame(200)
    data = big + small
    _send_run(rig, [data[i : i + seg] for i in range(0, len(data), seg)])
    rig.spin()
    w.stop()
    assert rig.tun.written() == big[1:]
    assert rig.tun.written() == small[1:]
    assert rig.writer_slot[st.DROPS_SPLIT] == 0


def test_writer_drops_the_cut_up_tail_of_a_joined_run(rig):
    """A whole frame, then the first piece of a frame whose rest never came:
    the whole one is written, the piece counted as split."""
    w = _gso_writer(rig)
    seg = 500
    first = _offload_frame(seg - 11 - 20)
    cut = _offload_frame(3000)[:seg]
    _send_run(rig, [first, cut])
    rig.spin()
    w.stop()
    assert rig.tun.written() == first[1:]
    assert rig.tun.nothing_written()
    assert rig.writer_slot[st.DROPS_SPLIT] == 1


def test_a_bad_frame_in_a_joined_run_costs_only_its_own_datagram(rig):
    """A frame whose IP length cannot hold a packet: its datagram is
    dropped as it would be alone, the frames behind it are written."""
    w = _gso_writer(rig)
    good = _offload_frame(30)
    bad = bytearray(good)
    bad[11 + 2 : 11 + 4] = (8).to_bytes(2, "big")  # IP length 8: no packet
    _send_run(rig, [bytes(bad), good, good])
    rig.spin()
    w.stop()
    assert [rig.tun.written(), rig.tun.written()] == [good[1:], good[1:]]
    assert rig.tun.nothing_written()
    assert rig.writer_slot[st.DROPS_SPLIT] == 1  # as the bad one alone


def test_heartbeats_and_hellos_joined_behind_frames_are_heard(rig):
    """The VM side sends heartbeats and hellos from its first worker's
    socket, so GRO can join them behind that socket's frames; reading past
    the run (old bytes of an earlier datagram) must not make them frames."""
    w = _gso_writer(rig)
    w.set_peer([rig.peer.getsockname()], engine.OFFLOAD)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.sendto(bytes(200) + b"\x45" * 300, rig.sock.getsockname())
    rig.spin()  # leaves IPv4-looking bytes behind the next runs
    stranger.close()
    a = _offload_frame(40)
    _send_run(rig, [a, a, frames.HEARTBEAT_FRAME])
    hello = b"\x01route 10.0.0.0/8\n"  # a control frame of another size
    _send_run(rig, [a, a, hello])
    rig.spin()
    w.stop()
    assert [rig.tun.written() for _ in range(4)] == [a[1:]] * 4
    assert rig.tun.nothing_written()
    assert rig.writer_slot[st.DROPS_SPLIT] == 0
    assert rig.writer_slot[st.DROPS_MALFORMED] == 0
    rig.control.settimeout(2)
    msgs = []
    while not any(m.get("data") == hello for m in msgs):
        msgs.append(messages.unpack(rig.control.recv(65536)))
    assert [m["op"] for m in msgs][-1] == messages.FRAME


def test_a_datagram_in_a_joined_run_that_is_no_frame_is_never_written(rig):
    """A bare IP packet in a run from a peer in offload framing, shaped so
    that bytes 11 on look like a packet of the right length: dropped as it
    would be alone, not written with its bytes 1-10 taken as a header."""
    w = _gso_writer(rig)
    w.set_peer([rig.peer.getsockname()], engine.OFFLOAD)
    a = _offload_frame(100)
    bogus = bytearray(len(a))
    bogus[0] = 0x45
    bogus[11:] = ipv4_packet(b"z" * (len(a) - 11 - 20))
    _send_run(rig, [a, bytes(bogus)])
    rig.spin()
    w.stop()
    assert rig.tun.written() == a[1:]
    assert rig.tun.nothing_written()
    assert rig.writer_slot[st.DROPS_MALFORMED] == 1
