"""fastfwd against peers that speak exactly the upstream's bytes
(DESIGN.md section 4): a fake upstream VM side for fastfwd's host side,
and a fake upstream host for fastfwd's VM side."""

import os
import time

import pytest

from lab.nsocket import socket_in
from lab.pytest_support import root_marks
from lab.tunnel import Tunnel
from tests.e2e.helpers import wait_for
from tests import packets

pytestmark = root_marks()

PORT = 2511
HOST_TUN_IP = "192.168.251.2"


def recv(sock, timeout_s=5.0):
    sock.settimeout(timeout_s)
    return sock.recvfrom(65536)


def read_control(sock):
    """One upstream control message: the header datagram, then the body.

    IP packets before the header (the host kernel's IPv6 chatter on its TUN)
    are skipped."""
    header, src = recv(sock)
    while header[0] >> 4 in (4, 6):
        header, src = recv(sock)
    assert len(header) == 3 and header[0] == 0x01, header
    length = header[1] << 8 | header[2]
    chunks = []
    while sum(map(len, chunks)) < length:
        chunk, _ = recv(sock)
        chunks.append(chunk)
    return b"".join(chunks), chunks


@pytest.fixture
def host_only(lab, tmp_path):
    pairs = [f"iptables 172.{20 + i}.0.0+172.{100 + i}.0.0" for i in range(60)]
    t = Tunnel(lab, tmp_path / "t", lines=["iptables 172.18.0.0+172.19.0.0", *pairs])
    t.start_host()
    assert wait_for(lambda: os.path.exists(t.host_socket)), t.logs()
    yield t
    t.stop()


def test_host_side_serves_an_upstream_vm_side(lab, host_only):
    vm = socket_in(lab.vm_ns)
    try:
        vm.bind(("0.0.0.0", 0))
        vm.sendto(b"\x00", (str(lab.host_ip), PORT))  # the upstream heartbeat

        body, chunks = read_control(vm)
        commands = body.decode().split(",")
        assert commands[0] == "connect 172.18.0.0 172.19.0.0"
        assert len(commands) == 61
        assert (
            all(len(c) <= 1400 for c in chunks) and len(chunks) == 2
        )  # split at the MTU
        assert all(c.count(" ") == 2 for c in commands)  # well formed, single spaces

        # A ping from the host to a container reaches the VM side as a raw
        # IPv4 packet; the reply it sends back reaches ping.
        target = str(lab.containers[0].ip)
        # Several echoes: the first may race the workers learning the peer.
        ping = lab.popen(
            lab.host_ns,
            "ping",
            "-c",
            "4",
            "-i",
            "0.5",
            "-W",
            "5",
            target,
            stdout=-1,
            text=True,
        )
        while True:
            data, src = recv(vm)
            parsed = packets.parse_icmp(data)
            if parsed and parsed[2] == 8:
                break
        assert src == (str(lab.host_ip), PORT)
        assert parsed[:2] == (HOST_TUN_IP, target)
        vm.sendto(packets.echo_reply_to(data), (str(lab.host_ip), PORT))
        assert ping.wait(10) == 0, ping.stdout.read()
    finally:
        vm.close()


def test_restarted_host_sends_before_any_heartbeat(lab, host_only):
    vm = socket_in(lab.vm_ns)
    try:
        vm.bind(("0.0.0.0", 0))
        vm.sendto(b"\x00", (str(lab.host_ip), PORT))
        read_control(vm)
        assert wait_for(lambda: host_only.status("host")["peer"])
        host_only.stop_host()
        host_only.start_host()
        read_control(vm)  # pushed to the remembered peer, unasked
        lab.popen(
            lab.host_ns,
            "ping",
            "-c",
            "3",
            "-i",
            "0.3",
            "-W",
            "1",
            str(lab.containers[0].ip),
            stdout=-1,
        )
        while True:
            data, _ = recv(vm)  # no heartbeat was sent since the restart
            if packets.parse_icmp(data):
                break
    finally:
        vm.close()


@pytest.fixture
def fake_host(lab):
    sock = socket_in(lab.host_ns)
    sock.bind((str(lab.host_ip), PORT))
    yield sock
    sock.close()


def test_vm_side_serves_an_upstream_host(lab, tmp_path, fake_host):
    t = Tunnel(lab, tmp_path / "t")
    t.start_vm()
    try:
        beat, vm_addr = recv(fake_host, 10)
        assert beat == b"\x00"
        b1, b2 = lab.bridges
        body = (
            f"connect {b1.subnet.network_address} {b2.subnet.network_address}".encode()
        )
        fake_host.sendto(bytes([1, len(body) >> 8, len(body) & 0xFF]), vm_addr)
        for i in range(0, len(body), 8):  # the body split over several datagrams
            fake_host.sendto(body[i : i + 8], vm_addr)

        def pair_rules():
            text = lab.iptables(lab.vm_ns, "-S")
            return [
                line for line in text.splitlines()
                if f"-i {b1.name} -o {b2.name}" in line or f"-i {b2.name} -o {b1.name}" in line
            ]  # fmt: skip

        # Both rules (the two inserts are not one step: wait for both).
        assert wait_for(lambda: len(pair_rules()) == 2), (pair_rules(), t.logs())

        # A raw packet from the host reaches the container; its reply comes back.
        target = str(lab.containers[0].ip)
        fake_host.sendto(packets.icmp_echo(HOST_TUN_IP, target, 77, 1), vm_addr)
        while True:
            data, src = recv(fake_host)
            parsed = packets.parse_icmp(data)
            if parsed and parsed[2] == 0:
                break
        assert src == vm_addr
        assert parsed == (target, HOST_TUN_IP, 0, 77, 1)

        # With nothing sent for 5 s the VM side sends another heartbeat (the
        # kernel's own IPv6 chatter on the TUN counts as traffic too).
        last = time.monotonic()
        while True:
            data, _ = recv(fake_host, 10)
            if data == b"\x00":
                break
            if data[0] >> 4 in (4, 6):  # traffic; a hello (0x03) is not
                last = time.monotonic()
        assert 4.0 < time.monotonic() - last < 7.5
    finally:
        t.stop()


def test_vm_side_answers_a_host_hello_only_when_asked(lab, tmp_path, fake_host):
    from fastfwd import frames

    t = Tunnel(lab, tmp_path / "t")
    t.start_vm()

    def hellos_within(seconds):
        got, end = [], time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                data, _ = recv(fake_host, left)
            except TimeoutError:
                break
            if data[:1] == bytes([frames.HELLO]):
                got.append(time.monotonic())
        return got

    try:
        while True:  # the hello with its networks: the next one is 5 s away
            data, vm_addr = recv(fake_host, 10)
            hello = frames.decode_hello(data)
            if hello and len(hello.networks) == len(lab.bridges):
                break
        plain = frames.encode_hello(frames.Hello(1, frames.CAP_OFFLOAD, 1400))
        ask = frames.encode_hello(
            frames.Hello(1, frames.CAP_OFFLOAD | frames.HELLO_ASK, 1400)
        )
        time.sleep(1.2)  # long after its own hello
        fake_host.sendto(plain, vm_addr)  # still an answer: not answered
        assert hellos_within(1.5) == [], t.logs()
        sent = time.monotonic()
        fake_host.sendto(ask, vm_addr)
        fake_host.sendto(ask, vm_addr)  # a second ask at once: one answer
        answers = hellos_within(1.0)
        assert len(answers) == 1 and answers[0] - sent < 0.5, t.logs()
        assert wait_for(lambda: t.status("vm")["framing"] == "offload"), t.logs()
    finally:
        t.stop()


def test_vm_side_waits_for_an_unresolvable_host_and_connects_when_it_resolves(
    lab, tmp_path, fake_host
):
    t = Tunnel(lab, tmp_path / "t", vm_args=["-host", "late-host.test"])
    t.start_vm()
    try:
        time.sleep(2.5)
        assert t.vm_proc.poll() is None, t.logs()  # alive, retrying
        assert t.status("vm")["host"] is None
        # The name appears (e.g. the host's entry was added): in-place append,
        # so the file `ip netns exec` bind-mounted sees it.
        with open(f"/etc/netns/{lab.vm_ns}/hosts", "a") as f:
            f.write(f"{lab.host_ip} late-host.test\n")
        beat, _ = recv(fake_host, 15)
        assert beat == b"\x00"
        assert t.status("vm")["host"] == f"{lab.host_ip}:{PORT}"
    finally:
        t.stop()


def test_a_push_over_64k_goes_out_as_several_well_formed_bodies(lab, tmp_path):
    pairs = [
        f"iptables 10.{i // 256}.{i % 256}.0+10.200.{i % 256}.0" for i in range(3000)
    ]
    t = Tunnel(lab, tmp_path / "t", lines=pairs)
    t.start_host()
    assert wait_for(lambda: os.path.exists(t.host_socket)), t.logs()
    vm = socket_in(lab.vm_ns)
    try:
        vm.bind(("0.0.0.0", 0))
        vm.sendto(b"\x00", (str(lab.host_ip), PORT))
        commands = []
        while len(commands) < 3000:
            body, _ = read_control(vm)
            assert len(body) <= 0xFFFF
            commands += body.decode().split(",")
        assert len(commands) == 3000
        assert all(c.startswith("connect 10.") and c.count(" ") == 2 for c in commands)
    finally:
        vm.close()
        t.stop()
