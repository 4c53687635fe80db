"""The process tree: privileges, crashes and restarts, in the lab."""

import os
import signal
import subprocess
import sys
import time

from lab.pytest_support import root_marks
from lab.tunnel import Tunnel

pytestmark = root_marks()


def wait_for(predicate, timeout_s=15.0, step_s=0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(step_s)
    return None


def ping(lab, ip):
    return lab.run(lab.host_ns, "ping", "-c", "2", "-i", "0.2", "-W", "2", str(ip), check=False).returncode == 0


def test_without_cap_net_admin_run_fails_in_one_line_and_leaves_nothing(lab, tmp_path):
    conf = tmp_path / "host.conf"
    conf.write_text(f"host {lab.host_ip}\nroute 172.18.0.0/16\nsocket {tmp_path}/h.sock\nstate {tmp_path}/s\n")
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


def test_busy_port_is_one_clear_line(lab, tmp_path):
    from lab.nsocket import socket_in

    blocker = socket_in(lab.host_ns)
    blocker.bind((str(lab.host_ip), 2511))
    try:
        t = Tunnel(lab, tmp_path / "t")
        res = lab.run(lab.host_ns, sys.executable, "-m", "fastfwd", "run", "-c", t.config, check=False, cwd=os.getcwd())
    finally:
        blocker.close()
    assert res.returncode == 3
    assert "cannot listen on UDP" in res.stderr and "in use" in res.stderr
    assert "fastfwd0" not in lab.run(lab.host_ns, "ip", "link").stdout


def _pid(tunnel, side, name):
    return next(p["pid"] for p in tunnel.status(side)["processes"] if p["name"] == name)


def test_killed_worker_is_restarted_and_forwarding_resumes(lab, tunnel):
    for side, name in (("host", "writer0"), ("vm", "reader0")):
        old = _pid(tunnel, side, name)
        os.kill(old, signal.SIGKILL)
        assert wait_for(lambda: _pid(tunnel, side, name) != old), tunnel.logs()
        entry = next(p for p in tunnel.status(side)["processes"] if p["name"] == name)
        assert entry["restarts"] == 1
    assert wait_for(lambda: ping(lab, lab.containers[0].ip)), tunnel.logs()


def test_killed_control_process_is_restarted_without_losing_routes(lab, tunnel):
    old = _pid(tunnel, "host", "control")
    routes = tunnel.status("host")["routes"]
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: _pid(tunnel, "host", "control") != old, 20), tunnel.logs()
    assert tunnel.status("host")["routes"] == routes
    assert tunnel.status("host")["peer"]
    assert ping(lab, lab.containers[1].ip)


def test_killed_vm_side_leaves_rules_that_the_next_start_purges(lab, tmp_path):
    t = Tunnel(lab, tmp_path / "t")
    t.start()
    try:
        # SIGKILL: nothing runs to clean up, the rules stay behind.
        old_peer = t.status("host")["peer"]
        t.stop_vm(signal.SIGKILL)
        stale = lab.iptables(lab.vm_ns, "-S")
        assert "fastfwd:fastfwd0" in stale
        assert wait_for(lambda: "fastfwd0" not in lab.run(lab.vm_ns, "ip", "link").stdout), "TUN survived its processes"
        t.start_vm()
        t.wait_ready()
        # The host moves to the new VM side once the old one fell silent.
        assert wait_for(lambda: t.status("host")["peer"] != old_peer, 20), t.logs()
        rules = [line for line in lab.iptables(lab.vm_ns, "-S").splitlines() if "fastfwd:fastfwd0" in line]
        assert len(rules) == 2, rules  # one set, not two
        assert ping(lab, lab.containers[0].ip)
    finally:
        t.stop()
    assert "fastfwd" not in lab.iptables(lab.vm_ns, "-S")
