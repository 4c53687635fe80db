"""The process tree: privileges, crashes and restarts, in the lab."""

import json
import os
import signal
import sys
import time

from lab.pytest_support import root_marks
from lab.tunnel import Tunnel
from tests.e2e.helpers import pid_of, wait_for

pytestmark = root_marks()


def ping(lab, ip):
    return (
        lab.run(
            lab.host_ns, "ping", "-c", "2", "-i", "0.2", "-W", "2", str(ip), check=False
        ).returncode
        == 0
    )


def test_without_cap_net_admin_run_fails_in_one_line_and_leaves_nothing(lab, tmp_path):
    conf = tmp_path / "host.conf"
    conf.write_text(
        f"host {lab.host_ip}\nroute 172.18.0.0/16\nsocket {tmp_path}/h.sock\nstate {tmp_path}/s\n"
    )
    before = lab.snapshot(lab.host_ns)
    res = lab.run(
        lab.host_ns, "setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--",
        sys.executable, "-m", "fastfwd", "run", "-c", str(conf),
        check=False, cwd=os.getcwd(), timeout=60,
    )  # fmt: skip
    assert res.returncode == 3, res.stderr
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert "CAP_NET_ADMIN" in res.stderr and "Traceback" not in res.stderr
    assert lab.snapshot(lab.host_ns) == before


def fastfwd_in(lab, ns, *argv):
    """Run one ``fastfwd`` command in ``ns`` to its end (it is expected to
    fail at set-up) and return the completed process."""
    return lab.run(
        ns, sys.executable, "-m", "fastfwd", *argv,
        check=False, cwd=os.getcwd(), timeout=60,
    )  # fmt: skip


def test_busy_port_is_one_clear_line(lab, tmp_path):
    from lab.nsocket import socket_in

    blocker = socket_in(lab.host_ns)
    blocker.bind((str(lab.host_ip), 2511))
    try:
        t = Tunnel(lab, tmp_path / "t")
        res = fastfwd_in(lab, lab.host_ns, "run", "-c", t.config)
    finally:
        blocker.close()
    assert res.returncode == 3
    assert "cannot listen on UDP" in res.stderr and "in use" in res.stderr
    assert "fastfwd0" not in lab.run(lab.host_ns, "ip", "link").stdout




def test_killed_worker_is_restarted_and_forwarding_resumes(lab, tunnel):
    for side, name in (("host", "writer0"), ("vm", "reader0")):
        old = pid_of(tunnel, side, name)
        os.kill(old, signal.SIGKILL)
        assert wait_for(lambda: pid_of(tunnel, side, name) != old), tunnel.logs()
        entry = next(p for p in tunnel.status(side)["processes"] if p["name"] == name)
        assert entry["restarts"] == 1
    assert wait_for(lambda: ping(lab, lab.containers[0].ip)), tunnel.logs()


def test_killed_control_process_is_restarted_without_losing_routes(lab, tunnel):
    old = pid_of(tunnel, "host", "control")
    before = tunnel.status("host")
    assert before["framing"] == "offload", before
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: pid_of(tunnel, "host", "control") != old, 20), tunnel.logs()
    after = tunnel.status("host")
    # The same peer in the same framing: nothing changed on the wire.
    for key in ("routes", "peer", "framing"):
        assert after[key] == before[key], (key, tunnel.logs())
    assert ping(lab, lab.containers[1].ip), tunnel.logs()
    with open(tunnel.host_log, encoding="utf-8") as f:
        assert "framing=compat" not in f.read(), tunnel.logs()


def test_a_hello_that_lapsed_does_not_come_back_with_a_control_restart(lab, tmp_path):
    t = Tunnel(lab, tmp_path / "t")
    t.start()
    try:
        assert t.status("host")["framing"] == "offload"
        t.stop_vm(signal.SIGKILL)  # silent from now on
        assert wait_for(lambda: t.status("host")["framing"] == "compat", 25), t.logs()
        with open(t.state, encoding="utf-8") as f:
            assert json.load(f)["hello"] is None
        old = pid_of(t, "host", "control")
        os.kill(old, signal.SIGKILL)
        assert wait_for(lambda: pid_of(t, "host", "control") != old, 20), t.logs()
        status = t.status("host")
        assert (status["framing"], status["peer_mtu"]) == ("compat", None), t.logs()
    finally:
        t.stop()


def test_a_state_file_edited_by_hand_does_not_stop_the_host(lab, tmp_path):
    t = Tunnel(lab, tmp_path / "t")
    os.makedirs(os.path.dirname(t.state), exist_ok=True)
    with open(t.state, "w", encoding="utf-8") as f:
        # Valid JSON, nonsense values: a port out of range, an infinite cap.
        f.write('{"peer": ["198.18.0.2", 70000], "hello": {"caps": 1e999, '
                '"mtu": 1400, "ports": [70000], "networks": []}}')  # fmt: skip
    t.start()
    try:
        assert wait_for(lambda: t.status("host")["framing"] == "offload"), t.logs()
        assert ping(lab, lab.containers[0].ip), t.logs()
        with open(t.state, encoding="utf-8") as f:
            assert json.load(f)["peer"][1] != 70000
    finally:
        t.stop()
    with open(t.host_log, encoding="utf-8") as f:
        assert "state file ignored" in f.read()


def test_killed_vm_side_leaves_rules_that_the_next_start_purges(lab, tmp_path):
    t = Tunnel(lab, tmp_path / "t")
    t.start()
    try:
        # SIGKILL: nothing runs to clean up, the rules stay behind.
        old_peer = t.status("host")["peer"]
        t.stop_vm(signal.SIGKILL)
        stale = lab.iptables(lab.vm_ns, "-S")
        assert "fastfwd:fastfwd0" in stale
        assert wait_for(
            lambda: "fastfwd0" not in lab.run(lab.vm_ns, "ip", "link").stdout
        ), "TUN survived its processes"
        t.start_vm()
        t.wait_ready()
        # The host moves to the new VM side once the old one fell silent.
        assert wait_for(lambda: t.status("host")["peer"] != old_peer, 20), t.logs()
        rules = [
            line
            for line in lab.iptables(lab.vm_ns, "-S").splitlines()
            if "fastfwd:fastfwd0" in line
        ]
        assert len(rules) == 2, rules  # one set, not two
        assert ping(lab, lab.containers[0].ip)
    finally:
        t.stop()
    assert "fastfwd" not in lab.iptables(lab.vm_ns, "-S")


def test_a_second_instance_on_the_same_device_is_refused(lab, tunnel, tmp_path):
    conf = tmp_path / "second.conf"
    conf.write_text(
        f"host {lab.host_ip}\nport 2600\nsocket {tmp_path}/2.sock\nstate {tmp_path}/2.state\n"
    )
    routes = tunnel.status("host")["routes"]
    res = fastfwd_in(lab, lab.host_ns, "run", "-c", conf)
    assert res.returncode == 3, res.stderr
    assert "exists and is in use" in res.stderr
    res = fastfwd_in(
        lab, lab.vm_ns, "connect", "-host", lab.host_ip, "--socket", f"{tmp_path}/v2.sock"
    )
    assert res.returncode == 3, res.stderr
    # The running pair is untouched.
    time.sleep(2.5)
    assert tunnel.status("host")["routes"] == routes
    assert "fastfwd:fastfwd0" in lab.iptables(lab.vm_ns, "-S")
    assert ping(lab, lab.containers[0].ip)


def test_a_second_instance_on_the_same_control_socket_is_refused(lab, tunnel, tmp_path):
    conf = tmp_path / "second.conf"
    conf.write_text(
        f"host {lab.host_ip}\nport 2600\nsocket {tunnel.host_socket}\n"
        f"state {tmp_path}/2.state\naddr 192.168.250.2/24\n"
    )
    res = fastfwd_in(lab, lab.host_ns, "run", "-c", conf, "--dev", "ffsecond0")
    assert res.returncode == 3, res.stderr
    assert "in use by a running fastfwd" in res.stderr
    assert "ffsecond0" not in lab.run(lab.host_ns, "ip", "link").stdout
    assert tunnel.status("host")["peer"]  # the first one is still reachable
    res = fastfwd_in(lab, lab.vm_ns, "connect", "-host", lab.host_ip,
                     "--socket", tunnel.vm_socket, "--dev", "ffsecond0")  # fmt: skip
    assert res.returncode == 3 and "in use" in res.stderr, res.stderr
    assert tunnel.status("vm")["host"]


def test_control_process_killed_twice_in_a_row_is_still_restarted(lab, tunnel):
    def control():
        return pid_of(tunnel, "host", "control")

    first = control()
    os.kill(first, signal.SIGKILL)
    second = wait_for(lambda: (p := control()) != first and p, 20)
    # Kill the replacement at once, before it can settle.
    os.kill(second, signal.SIGKILL)
    third = wait_for(lambda: (p := control()) not in (first, second) and p, 30)
    assert third, tunnel.logs()
    assert (
        next(p for p in tunnel.status("host")["processes"] if p["name"] == "control")[
            "restarts"
        ]
        == 2
    )
    assert wait_for(lambda: ping(lab, lab.containers[0].ip)), tunnel.logs()


def test_restarted_control_keeps_the_last_good_configuration(lab, tunnel):
    routes = tunnel.status("host")["routes"]
    with open(tunnel.config, "a") as f:
        f.write("route not-valid\n")
    time.sleep(0.6)
    old = pid_of(tunnel, "host", "control")
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: pid_of(tunnel, "host", "control") != old, 20), tunnel.logs()
    assert tunnel.status("host")["routes"] == routes
    assert "last applied one used" in tunnel.logs()


def test_sighup_during_start_up_does_not_kill_anything(lab, tmp_path):
    t = Tunnel(lab, tmp_path / "t")
    proc = t.start_host()
    time.sleep(0.3)
    proc.send_signal(signal.SIGHUP)
    try:
        t.start_vm()
        t.wait_ready()
        assert proc.poll() is None
    finally:
        t.stop()
