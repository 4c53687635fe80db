"""Expose, tokens and the accessor, end to end in the lab: a remote machine
(namespace) reaches exposed containers through the host, with fastfwd's
accessor and with a peer that speaks the upstream accessor's bytes; and
fastfwd's accessor against a fake upstream host."""

import os
import sys
import time

import pytest

from lab import Lab
from lab.nsocket import socket_in
from lab.pytest_support import root_marks
from lab.tunnel import Tunnel
from tests import packets
from tests.e2e.helpers import answers, pid_of, wait_for
from tests.e2e.test_tunnel import transfer

pytestmark = root_marks()

EXPOSE_PORT = 2512
TOKEN = "tok-3f9a1c77e2"
ACCESSOR_IP = "192.168.251.5"
HOST_TUN_IP = "192.168.251.2"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def lab():
    with Lab(bridges=2, containers_per_bridge=1, remote=True) as lab:
        yield lab


def expose_lines(lab, *extra):
    return [
        "route 172.18.0.0/16 expose",
        "route 172.19.0.0/16",
        f"expose {lab.host_remote_ip}:{EXPOSE_PORT}",
        f"token {TOKEN} {ACCESSOR_IP}",
        *extra,
    ]


def make_tunnel(lab, tmp_path, offload="on", extra=()):
    t = Tunnel(
        lab, tmp_path / "tunnel", routes=[], lines=expose_lines(lab, *extra),
        vm_args=["--offload", offload],
    )  # fmt: skip
    t.start()
    return t


def logged_in(t):
    """The accessor's status once it is logged in and its session applied."""

    def applied():
        st = t.status("access")
        return st if st["logged_in"] and st["address"] and st["routes"] else None

    return wait_for(applied, 15.0)


def counters(t, side="host", name="writer0"):
    for p in t.status(side)["processes"]:
        if p["name"] == name:
            return p["counters"]
    raise AssertionError(f"no {name}")


@pytest.mark.parametrize("offload", ["on", "off"])
def test_accessor_reaches_exposed_networks_only(lab, tmp_path, offload):
    t = make_tunnel(lab, tmp_path, offload)
    try:
        t.start_accessor(TOKEN, EXPOSE_PORT)
        assert logged_in(t), t.logs()
        acc = t.status("access")
        assert acc["address"] == f"{ACCESSOR_IP}/24"
        assert acc["routes"] == ["172.18.0.0/16"]
        c1, c2 = lab.containers
        assert answers(lab, c1.ip, lab.remote_ns), t.logs()
        # Not exposed: no route on the accessor, and packets sent anyway
        # (a route added by hand) are dropped and counted at the host.
        assert not answers(lab, c2.ip, lab.remote_ns)
        lab.run(lab.remote_ns, "ip", "route", "add", "172.19.0.0/16", "dev", "fastfwd-acc")
        before = counters(t)["drops_acl"]
        assert not answers(lab, c2.ip, lab.remote_ns)
        assert counters(t)["drops_acl"] > before
        # A real TCP transfer each way; from an offload VM side the host
        # cuts super-packets for the accessor.
        for direction in ("send", "recv"):
            client, server = transfer(
                lab, c1.ns, lab.remote_ns, c1.ip, direction, nbytes=20 * 1024 * 1024
            )
            assert client["ok"] and server["ok"], (client, server, t.logs())
            assert client["sha256"] == server["sha256"]
            assert server.get("peer", ACCESSOR_IP) in (ACCESSOR_IP, str(c1.ip))
        w = counters(t)
        assert w["to_accessors"] > 10_000 and w["from_accessors"] > 10_000
        host = t.status("host")
        assert [s["ip"] for s in host["expose"]["sessions"]] == [ACCESSOR_IP]
        assert TOKEN not in str(host) + str(t.status("access"))
    finally:
        t.stop()
    logs = t.logs()
    assert TOKEN not in logs, "a token appeared whole in a log"
    # The accessor removed its routes; its device went with it.
    assert "fastfwd-acc" not in lab.run(lab.remote_ns, "ip", "link").stdout


def test_pong_answers_at_the_host_only_when_on(lab, tmp_path):
    t = make_tunnel(lab, tmp_path)
    try:
        t.start_accessor(TOKEN, EXPOSE_PORT)
        assert logged_in(t), t.logs()
        assert not answers(lab, HOST_TUN_IP, lab.remote_ns)
        with open(t.config, "a", encoding="utf-8") as f:
            f.write("pong on\n")
        assert wait_for(lambda: answers(lab, HOST_TUN_IP, lab.remote_ns), 10.0)
        assert counters(t)["pongs"] >= 1
        # What `fastfwd status` prints on both ends.
        status = [sys.executable, "-m", "fastfwd", "status", "--socket"]
        acc = lab.run(lab.remote_ns, *status, t.access_socket, cwd=ROOT).stdout
        assert "logged_in       True" in acc and "192.168.251.5/24" in acc
        host = lab.run(lab.host_ns, *status, t.host_socket, cwd=ROOT).stdout
        assert f"expose          {lab.host_remote_ip}:{EXPOSE_PORT} sessions 1" in host
        assert f"accessor        {ACCESSOR_IP} from {lab.remote_ip}:" in host
        assert "accessor pkts   to_accessors " in host and "pongs " in host
        assert TOKEN not in host
    finally:
        t.stop()


def test_reloads_follow_tokens_exposed_routes_and_the_port(lab, tmp_path):
    t = make_tunnel(lab, tmp_path)
    try:
        t.start_accessor(TOKEN, EXPOSE_PORT)
        assert logged_in(t), t.logs()
        c1, c2 = lab.containers
        # A network newly exposed reaches the accessor: it is asked to log
        # in again and gets the new list.
        t.config_lines("route 172.19.0.0/16 expose")
        assert wait_for(
            lambda: t.status("access")["routes"] == ["172.18.0.0/16", "172.19.0.0/16"], 10.0
        ), t.logs()
        assert wait_for(lambda: answers(lab, c2.ip, lab.remote_ns), 10.0)
        # Removing the token ends the session within 5 s.
        lines = [x for x in open(t.config, encoding="utf-8") if not x.startswith("token")]
        with open(t.config + ".new", "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.rename(t.config + ".new", t.config)
        start = time.monotonic()
        assert wait_for(lambda: not t.status("host")["expose"]["sessions"], 5.0)
        assert time.monotonic() - start < 5.0
        assert not answers(lab, c1.ip, lab.remote_ns)
        assert wait_for(lambda: not t.status("access")["logged_in"], 5.0)
        assert t.status("host")["expose"]["refused_logins"] >= 1
        # The token back: the next packet is answered 0x02, the accessor
        # logs in again and traffic flows.
        with open(t.config, "a", encoding="utf-8") as f:
            f.write(f"token {TOKEN} {ACCESSOR_IP}\n")
        assert wait_for(lambda: answers(lab, c1.ip, lab.remote_ns), 15.0), t.logs()
        # Moving the port closes the old one.
        t.config_lines(f"expose {lab.host_remote_ip}:{EXPOSE_PORT + 1}")
        assert wait_for(
            lambda: t.status("host")["expose"]["listen"]
            == f"{lab.host_remote_ip}:{EXPOSE_PORT + 1}",
            5.0,
        )
        ss = lab.run(lab.host_ns, "ss", "-uln").stdout
        assert f":{EXPOSE_PORT + 1} " in ss and f":{EXPOSE_PORT} " not in ss
    finally:
        t.stop()
    assert TOKEN not in t.logs()


def test_upstream_accessor_bytes(lab, tmp_path):
    """A peer that speaks exactly the upstream accessor's datagrams."""
    t = make_tunnel(lab, tmp_path, extra=["pong on"])
    expose = (str(lab.host_remote_ip), EXPOSE_PORT)
    sock = socket_in(lab.remote_ns)
    other = socket_in(lab.remote_ns)
    try:
        sock.settimeout(3.0)
        sock.sendto(b"\x00" + TOKEN.encode(), expose)
        assert sock.recvfrom(2000)[0] == b"\x02"
        sock.sendto(b"\x01wrong-token", expose)
        with pytest.raises(TimeoutError):
            sock.recvfrom(2000)  # an unknown token gets no answer
        sock.sendto(b"\x01" + TOKEN.encode(), expose)
        answer = sock.recvfrom(2000)[0]
        assert answer == (
            b"\x01addr 192.168.251.5/24,peer 192.168.251.2,mtu 1400,route 172.18.0.0/16"
        )
        c1, c2 = lab.containers

        def ping_reply(dst, src=ACCESSOR_IP, seq=1):
            sock.sendto(packets.icmp_echo(src, str(dst), 0x77, seq), expose)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                try:
                    data = sock.recvfrom(65536)[0]
                except TimeoutError:
                    return None
                got = packets.parse_icmp(data)
                if got and got[2] == 0 and got[4] == seq:
                    return got
            return None

        assert ping_reply(c1.ip, seq=1) == (str(c1.ip), ACCESSOR_IP, 0, 0x77, 1)
        assert ping_reply(HOST_TUN_IP, seq=2) == (HOST_TUN_IP, ACCESSOR_IP, 0, 0x77, 2)
        before = counters(t)["drops_acl"]
        assert ping_reply(c2.ip, seq=3) is None  # not exposed
        assert ping_reply(c1.ip, src="192.168.251.9", seq=4) is None  # not its IP
        assert counters(t)["drops_acl"] >= before + 2
        # Another address without a session is told to log in.
        other.settimeout(3.0)
        other.sendto(packets.icmp_echo(ACCESSOR_IP, str(c1.ip), 1, 1), expose)
        assert other.recvfrom(2000)[0] == b"\x02"
    finally:
        sock.close()
        other.close()
        t.stop()


def test_accessor_against_an_upstream_host(lab, tmp_path):
    """fastfwd's accessor logging in to a peer that speaks the upstream
    host's expose bytes: address, MTU, routes, -exclude and 0x02."""
    host = socket_in(lab.host_ns)
    host.bind((str(lab.host_remote_ip), EXPOSE_PORT))
    host.settimeout(5.0)
    t = Tunnel(lab, tmp_path / "tunnel")
    try:
        t.start_accessor(TOKEN, EXPOSE_PORT, "-exclude", "10.98.0.0/16")
        data, acc = host.recvfrom(2000)
        assert data == b"\x00" + TOKEN.encode()
        host.sendto(b"\x02", acc)
        data, acc = host.recvfrom(2000)
        assert data == b"\x01" + TOKEN.encode()
        host.sendto(
            b"\x01addr 192.168.251.7/24,peer 192.168.251.2,mtu 1300,"
            b"route 10.99.0.0/16,route 10.98.0.0/16,route 169.254.0.0/16,route 224.0.0.0/4",
            acc,
        )
        st = logged_in(t)
        assert st, t.logs()
        assert st["address"] == "192.168.251.7/24" and st["mtu"] == 1300
        assert st["routes"] == ["10.99.0.0/16"] and st["excluded"] == ["10.98.0.0/16"]
        link = lab.run(lab.remote_ns, "ip", "-o", "addr", "show", "dev", "fastfwd-acc").stdout
        assert "192.168.251.7/24" in link
        assert "mtu 1300" in lab.run(lab.remote_ns, "ip", "link", "show", "fastfwd-acc").stdout
        # Traffic for an exposed network goes to the host as bare IP packets.
        lab.run(lab.remote_ns, "ping", "-c1", "-W1", "10.99.0.9", check=False)
        while True:
            data, _ = host.recvfrom(65536)
            got = packets.parse_icmp(data)
            if got:
                break
        assert got[:3] == ("192.168.251.7", "10.99.0.9", 8)
        # 0x02 (the host restarted): a new login follows.
        host.sendto(b"\x02", acc)
        while True:
            data, _ = host.recvfrom(2000)
            if data[:1] == b"\x01":
                break
        assert data == b"\x01" + TOKEN.encode()
        # An address no device should take is refused, routes and all.
        host.sendto(b"\x01addr 127.0.0.5/8,peer 127.0.0.2,mtu 1400,route 10.97.0.0/16", acc)
        assert wait_for(lambda: t.status("access")["address"] is None, 5.0)
        assert t.status("access")["routes"] == []
        addrs = lab.run(lab.remote_ns, "ip", "addr").stdout
        assert "127.0.0.5" not in addrs and "192.168.251.7" not in addrs
    finally:
        host.close()
        t.stop()
    assert "10.99.0.0" not in lab.run(lab.remote_ns, "ip", "route").stdout
    assert TOKEN not in t.logs()


def test_sessions_survive_crashed_workers_and_control(lab, tmp_path):
    """A restarted writer gets the expose socket and the sessions again; a
    restarted control process binds the port again, and the accessor, told
    0x02 at its next packet, logs in again by itself."""
    t = make_tunnel(lab, tmp_path)
    try:
        t.start_accessor(TOKEN, EXPOSE_PORT)
        assert logged_in(t), t.logs()
        c1 = lab.containers[0]
        assert answers(lab, c1.ip, lab.remote_ns)
        for name in ("writer0", "control"):
            pid = pid_of(t, "host", name)
            os.kill(pid, 9)
            assert wait_for(lambda: pid_of(t, "host", name) != pid, 15.0), t.logs()
            assert wait_for(lambda: answers(lab, c1.ip, lab.remote_ns), 15.0), (name, t.logs())
        assert t.status("host")["expose"]["listen"] == f"{lab.host_remote_ip}:{EXPOSE_PORT}"
        assert t.status("access")["relogin_requests"] >= 1
    finally:
        t.stop()


def test_accessor_started_before_the_expose_port_logs_in_when_it_opens(lab, tmp_path):
    """Logins sent to a closed port come back as ICMP port unreachable; the
    accessor keeps trying and logs in once the port opens. Removing the
    port tells it so."""
    t = Tunnel(lab, tmp_path / "tunnel", routes=["172.18.0.0/16"])
    t.start()
    try:
        t.start_accessor(TOKEN, EXPOSE_PORT)
        time.sleep(3)  # a few logins into the closed port
        assert not t.status("access")["logged_in"]
        t.config_lines(
            "route 172.18.0.0/16 expose",
            f"expose {lab.host_remote_ip}:{EXPOSE_PORT}",
            f"token {TOKEN} {ACCESSOR_IP}",
        )
        assert logged_in(t), t.logs()
        assert wait_for(lambda: answers(lab, lab.containers[0].ip, lab.remote_ns), 10.0)
        lines = [x for x in open(t.config, encoding="utf-8") if not x.startswith("expose")]
        with open(t.config, "w", encoding="utf-8") as f:
            f.writelines(lines)
        assert wait_for(lambda: not t.status("access")["logged_in"], 10.0), t.logs()
    finally:
        t.stop()


def test_config_lines_with_tokens_on_a_tunnel_network_of_its_own(lab, tmp_path):
    """Token lines given with `fastfwd config` are checked against the
    running tunnel network, not the default one."""
    t = Tunnel(
        lab, tmp_path / "tunnel", lines=["addr 10.77.0.1/24"],
        vm_args=["-addr", "10.77.0.1/24"],
    )  # fmt: skip
    t.start()
    try:
        reply = t.config_lines("token bob-token-1 10.77.0.9")
        assert reply["ok"], reply
        reply = t.config_lines("token eve-token-1 192.168.251.9")
        assert not reply["ok"] and reply["code"] == "invalid_config", reply
        assert "outside the tunnel network 10.77.0.0/24" in reply["problems"][0]
    finally:
        t.stop()


def test_accessor_dialling_a_second_address_of_the_host(lab, tmp_path):
    """With ``expose 0.0.0.0:PORT`` every answer leaves from the address the
    accessor dialled, not the host's primary one."""
    second = "198.18.0.9"
    lab.run(lab.host_ns, "ip", "addr", "add", f"{second}/32", "dev", lab.host_remote_if)
    lab.run(lab.remote_ns, "ip", "route", "add", second, "dev", lab.remote_if)
    t = Tunnel(
        lab, tmp_path / "tunnel", routes=[], vm_args=["--offload", "on"],
        lines=["route 172.18.0.0/16 expose", f"expose 0.0.0.0:{EXPOSE_PORT}",
               f"token {TOKEN} {ACCESSOR_IP}", "pong on"],
    )  # fmt: skip
    t.start()
    try:
        t.start_accessor(TOKEN, EXPOSE_PORT, host=second)
        assert logged_in(t), t.logs()
        assert answers(lab, lab.containers[0].ip, lab.remote_ns), t.logs()
        assert answers(lab, HOST_TUN_IP, lab.remote_ns), t.logs()
        client, server = transfer(
            lab, lab.containers[0].ns, lab.remote_ns, lab.containers[0].ip, "recv",
            nbytes=5 * 1024 * 1024,
        )  # fmt: skip
        assert client["ok"] and server["ok"], (client, server)
        acc = next(p for p in t.status("access")["processes"] if p["name"] == "writer0")
        assert acc["counters"]["drops_unknown_src"] == 0
    finally:
        t.stop()
