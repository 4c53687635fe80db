"""The tunnel end to end in the lab: ping and TCP through real fastfwd
process trees, against Docker 28's firewall."""

import signal
import time

import pytest

from lab import tcpcheck
from lab.pytest_support import root_marks

pytestmark = root_marks()

TRANSFER_BYTES = 50 * 1024 * 1024
TUNNEL_HOST_IP = "192.168.251.2"


def ping(lab, ns, ip, count=3):
    return lab.run(
        ns, "ping", "-c", str(count), "-i", "0.2", "-W", "2", str(ip), check=False
    )


def transfer(
    lab,
    server_ns,
    client_ns,
    host,
    direction,
    nbytes=TRANSFER_BYTES,
    port=5601,
    seed="t",
):
    """A checksummed TCP transfer; ``direction`` is "send" (client to server)
    or "recv" (server to client)."""
    stream = ["--bytes", str(nbytes), "--seed", seed, "--timeout", "120"]
    mode = "recv" if direction == "send" else "send"
    server = lab.popen(
        server_ns,
        *tcpcheck.argv("serve", "--port", str(port), "--mode", mode, *stream),
        stdout=-1,
        text=True,
    )
    client = lab.run(
        client_ns,
        *tcpcheck.argv(direction, "--host", str(host), "--port", str(port), *stream),
        check=False,
        timeout=150,
    )
    out, _ = server.communicate(timeout=30)
    return tcpcheck.parse(client.stdout), tcpcheck.parse(out)


def test_host_pings_both_containers_on_two_bridges(lab, tunnel):
    for container in lab.containers:
        res = ping(lab, lab.host_ns, container.ip)
        assert res.returncode == 0, res.stdout + res.stderr
    host = tunnel.status("host")
    assert sorted(host["routes"]) == sorted(str(b.subnet) for b in lab.bridges)


def test_tcp_transfer_host_to_container_arrives_intact(lab, tunnel):
    c1 = lab.containers[0]
    client, server = transfer(lab, c1.ns, lab.host_ns, c1.ip, "send")
    assert client["ok"] and server["ok"], (client, server)
    assert server["bytes"] == TRANSFER_BYTES
    assert server["sha256"] == tcpcheck.digest(TRANSFER_BYTES, "t")


def test_tcp_transfer_container_to_host_arrives_intact(lab, tunnel):
    c2 = lab.containers[1]
    # The container opens the connection to the host's tunnel address and
    # receives the stream: container -> host request, host -> container data.
    client, server = transfer(lab, lab.host_ns, c2.ns, TUNNEL_HOST_IP, "recv")
    assert client["ok"] and server["ok"], (client, server)
    # And the other way: the container sends, the host receives.
    client, server = transfer(
        lab, lab.host_ns, c2.ns, TUNNEL_HOST_IP, "send", port=5602
    )
    assert client["ok"] and server["ok"], (client, server)
    assert server["sha256"] == tcpcheck.digest(TRANSFER_BYTES, "t")


def test_container_reaches_the_host_tunnel_address(lab, tunnel):
    res = ping(lab, lab.containers[0].ns, TUNNEL_HOST_IP)
    assert res.returncode == 0, res.stdout


def _pair_rules(lab, b1, b2):
    rules = [
        line for line in lab.iptables(lab.vm_ns, "-S").splitlines() if "fastfwd" in line
    ]
    return [r for r in rules if b1.name in r and b2.name in r]


def test_iptables_pair_opens_and_closes_two_bridges(lab, tunnel):
    c1, c2 = lab.containers
    b1, b2 = c1.bridge, c2.bridge
    a, b = b1.subnet.network_address, b2.subnet.network_address
    assert ping(lab, c1.ns, c2.ip, count=1).returncode != 0  # Docker isolates them

    for _ in range(3):  # the same command pushed again must not duplicate rules
        assert tunnel.config_lines(f"iptables {a}+{b}")["ok"]
    deadline = time.monotonic() + 10
    while len(_pair_rules(lab, b1, b2)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # let every push land
    rules = _pair_rules(lab, b1, b2)
    assert len(rules) == 2, rules
    assert any(f"-i {b1.name} -o {b2.name}" in r for r in rules)
    assert any(f"-i {b2.name} -o {b1.name}" in r for r in rules)
    assert ping(lab, c1.ns, c2.ip).returncode == 0
    assert ping(lab, c2.ns, c1.ip).returncode == 0

    assert tunnel.config_lines(f"iptables {a}-{b}")["ok"]
    deadline = time.monotonic() + 10
    while _pair_rules(lab, b1, b2) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _pair_rules(lab, b1, b2) == []
    assert ping(lab, c1.ns, c2.ip, count=1).returncode != 0


def test_host_follows_a_restarted_vm_side(lab, tunnel):
    before = tunnel.status("host")["peer"]
    tunnel.stop_vm()
    tunnel.start_vm()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        peer = tunnel.status("host")["peer"]
        if (
            peer != before
            and ping(lab, lab.host_ns, lab.containers[0].ip, count=1).returncode == 0
        ):
            break
        time.sleep(0.5)
    assert tunnel.status("host")["peer"] != before
    assert ping(lab, lab.host_ns, lab.containers[0].ip).returncode == 0


def test_restarted_host_sends_to_the_remembered_peer_at_once(lab, tunnel):
    peer = tunnel.status("host")["peer"]
    tunnel.stop_host()
    tunnel.start_host()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            status = tunnel.status("host")
            break
        except OSError:
            time.sleep(0.1)
    # Before any heartbeat could arrive, the host already knows where to send.
    assert status["peer"] == peer
    assert ping(lab, lab.host_ns, lab.containers[0].ip).returncode == 0


def test_vm_side_keeps_listening_through_a_host_down_for_seconds(lab, tunnel):
    """Heartbeats to a host that is down come back as ICMP port unreachable;
    the VM side must still hear the host when it returns."""
    tunnel.stop_host()
    time.sleep(7)  # more than a heartbeat interval: at least one goes unanswered
    tunnel.start_host()
    tunnel.wait_ready()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if ping(lab, lab.host_ns, lab.containers[0].ip, count=1).returncode == 0:
            break
        time.sleep(0.5)
    assert ping(lab, lab.host_ns, lab.containers[0].ip).returncode == 0, tunnel.logs()
    vm = tunnel.status("vm")
    writer = next(p for p in vm["processes"] if p["name"] == "writer0")
    assert writer["counters"]["pkts_out"] > 0


@pytest.mark.parametrize("side", ["host", "vm"])
def test_sigterm_leaves_no_route_rule_or_device_behind(lab, tmp_path, side):
    from lab.tunnel import Tunnel

    before = {ns: lab.snapshot(ns) for ns in (lab.host_ns, lab.vm_ns)}
    t = Tunnel(
        lab,
        tmp_path / "t",
        lines=[
            f"iptables {lab.bridges[0].subnet.network_address}+{lab.bridges[1].subnet.network_address}"
        ],
    )
    t.start()
    try:
        during = {ns: lab.snapshot(ns) for ns in (lab.host_ns, lab.vm_ns)}
        assert during != before  # the tunnel did change both namespaces
        assert "-i fastfwd0" in during[lab.vm_ns]["iptables"]["raw"]
        first, second = (
            (t.stop_host, t.stop_vm) if side == "host" else (t.stop_vm, t.stop_host)
        )
        codes = [first(signal.SIGTERM), second(signal.SIGTERM)]
    finally:
        t.stop()
    after = {ns: lab.snapshot(ns) for ns in (lab.host_ns, lab.vm_ns)}
    assert after == before, t.logs()
    assert all(code == 0 for code in codes if code is not None), (codes, t.logs())
