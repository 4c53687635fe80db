"""The lab builds a Docker 28 VM in namespaces, and removes all of it.

These tests need root; outside CI they skip with a reason when not root.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

import lab.topology
from lab import Lab, LabError, tcpcheck
from lab.netns import NETNS_ETC, list_namespaces
from lab.pytest_support import root_marks

pytestmark = root_marks()

REPO_ROOT = Path(lab.__file__).resolve().parents[1]
TRANSFER_BYTES = 5 * 1024 * 1024


def namespaces_with(prefix: str) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(f"{prefix}-")]


def assert_gone(the_lab: Lab) -> None:
    assert namespaces_with(the_lab.prefix) == []
    assert not (NETNS_ETC / the_lab.vm_ns).exists()
    if NETNS_ETC.is_dir():
        assert [d for d in os.listdir(NETNS_ETC) if d.startswith(the_lab.prefix)] == []


def pid_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ping(the_lab: Lab, ns: str, ip) -> subprocess.CompletedProcess:
    return the_lab.run(ns, "ping", "-c1", "-W1", ip, check=False)


@pytest.fixture(scope="module")
def docker_lab():
    the_lab = Lab(bridges=2, containers_per_bridge=1)
    with the_lab:
        yield the_lab
    assert_gone(the_lab)


# topology


def test_lab_names_carry_prefix_and_fit_ifnamsiz(docker_lab):
    names = [docker_lab.host_if, docker_lab.vm_if]
    names += [b.name for b in docker_lab.bridges] + [
        c.port for c in docker_lab.containers
    ]
    assert all(n.startswith(f"{docker_lab.prefix}-") and len(n) <= 15 for n in names)
    assert all(ns.startswith(f"{docker_lab.prefix}-") for ns in docker_lab.namespaces)
    assert set(docker_lab.namespaces) <= set(list_namespaces())


def test_lab_assigns_docker_like_addresses(docker_lab):
    assert [str(b.subnet) for b in docker_lab.bridges] == [
        "172.18.0.0/16",
        "172.19.0.0/16",
    ]
    assert [str(b.gateway) for b in docker_lab.bridges] == ["172.18.0.1", "172.19.0.1"]
    assert [str(c.ip) for c in docker_lab.containers] == ["172.18.0.2", "172.19.0.2"]
    assert (str(docker_lab.host_ip), str(docker_lab.vm_ip)) == (
        "198.18.0.1",
        "198.18.0.2",
    )
    c1 = docker_lab.containers[0]
    route = docker_lab.run(c1.ns, "ip", "route", "show", "default").stdout
    assert f"via {c1.bridge.gateway} dev eth0" in route


def test_vm_reaches_every_container_by_ping(docker_lab):
    for c in docker_lab.containers:
        assert ping(docker_lab, docker_lab.vm_ns, c.ip).returncode == 0, c


def test_vm_reaches_host_over_underlay(docker_lab):
    assert ping(docker_lab, docker_lab.vm_ns, docker_lab.host_ip).returncode == 0


def test_container_cannot_reach_container_on_other_bridge(docker_lab):
    c1, c2 = docker_lab.containers
    assert ping(docker_lab, c1.ns, c2.ip).returncode != 0
    assert ping(docker_lab, c2.ns, c1.ip).returncode != 0


def test_host_has_no_route_to_containers(docker_lab):
    for c in docker_lab.containers:
        result = ping(docker_lab, docker_lab.host_ns, c.ip)
        assert result.returncode != 0
        assert "unreachable" in result.stderr.lower()


def test_host_docker_internal_resolves_to_host_inside_vm(docker_lab):
    out = docker_lab.run(docker_lab.vm_ns, "getent", "hosts", "host.docker.internal")
    assert out.stdout.split()[0] == str(docker_lab.host_ip)


def test_vm_forwards_ipv4(docker_lab):
    assert docker_lab.snapshot(docker_lab.vm_ns)["ip_forward"] == "1"


# the docker firewall


def test_vm_firewall_has_docker_user_chain_and_forward_drop(docker_lab):
    rules = docker_lab.iptables(docker_lab.vm_ns, "-S").splitlines()
    assert "-P FORWARD DROP" in rules
    assert "-N DOCKER-USER" in rules
    assert rules.index("-A FORWARD -j DOCKER-USER") < rules.index(
        "-A FORWARD -j DOCKER-FORWARD"
    )
    assert docker_lab.iptables(docker_lab.vm_ns, "-S", "DOCKER-USER").splitlines() == [
        "-N DOCKER-USER"
    ]


def test_vm_raw_table_drops_container_traffic_from_other_interfaces(docker_lab):
    rules = docker_lab.iptables(docker_lab.vm_ns, "-t", "raw", "-S").splitlines()
    for c in docker_lab.containers:
        assert f"-A PREROUTING -d {c.ip}/32 ! -i {c.bridge.name} -j DROP" in rules


def test_vm_masquerades_each_bridge(docker_lab):
    rules = docker_lab.iptables(docker_lab.vm_ns, "-t", "nat", "-S").splitlines()
    for b in docker_lab.bridges:
        assert f"-A POSTROUTING -s {b.subnet} ! -o {b.name} -j MASQUERADE" in rules


def test_lab_records_iptables_binary(docker_lab):
    assert docker_lab.tool is not None
    assert os.path.isabs(docker_lab.tool.path)
    assert docker_lab.tool.backend in ("nf_tables", "legacy")


def test_snapshot_sees_a_new_rule_and_nothing_else(docker_lab):
    ns = docker_lab.vm_ns
    before = docker_lab.snapshot(ns)
    assert before == docker_lab.snapshot(ns)
    docker_lab.iptables(ns, "-I", "DOCKER-USER", "-i", "lo", "-j", "ACCEPT")
    try:
        after = docker_lab.snapshot(ns)
    finally:
        docker_lab.iptables(ns, "-D", "DOCKER-USER", "-i", "lo", "-j", "ACCEPT")
    assert after["iptables"]["filter"] != before["iptables"]["filter"]
    assert {k: v for k, v in after.items() if k != "iptables"} == {
        k: v for k, v in before.items() if k != "iptables"
    }
    assert docker_lab.snapshot(ns) == before


def test_lab_refuses_namespaces_it_does_not_own(docker_lab):
    with pytest.raises(LabError):
        docker_lab.run("not-a-lab-namespace", "true")


def test_containers_on_other_bridge_talk_without_docker_firewall():
    with Lab(bridges=2, docker_firewall=False) as plain:
        c1, c2 = plain.containers
        assert ping(plain, c1.ns, c2.ip).returncode == 0
        assert "DOCKER" not in plain.iptables(plain.vm_ns, "-S")


# tcpcheck through the lab


@pytest.mark.parametrize("direction", ["vm-to-container", "container-to-vm"])
def test_tcpcheck_transfers_5mb_with_matching_checksum(docker_lab, direction):
    c = docker_lab.containers[0]
    seed = f"lab-{direction}"
    if direction == "vm-to-container":
        server_args = ["serve", "--port", 5201, "--mode", "recv"]
        client_args = ["send", "--host", c.ip, "--port", 5201]
    else:
        server_args = ["serve", "--port", 5201, "--mode", "send"]
        client_args = ["recv", "--host", c.ip, "--port", 5201]
    stream_args = ["--bytes", TRANSFER_BYTES, "--seed", seed, "--timeout", 30]
    server = docker_lab.popen(
        c.ns, *tcpcheck.argv(*server_args, *stream_args),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    client = docker_lab.run(
        docker_lab.vm_ns, *tcpcheck.argv(*client_args, *stream_args), timeout=60
    )
    server_out, _ = server.communicate(timeout=60)
    docker_lab.stop(server)

    sent = tcpcheck.parse(client.stdout)
    served = tcpcheck.parse(server_out)
    expected = tcpcheck.digest(TRANSFER_BYTES, seed)
    assert sent["ok"] and served["ok"], (sent, served)
    assert sent["bytes"] == served["bytes"] == TRANSFER_BYTES
    assert sent["sha256"] == served["sha256"] == expected
    assert served["peer"] == str(docker_lab.containers[0].bridge.gateway)


def test_tcpcheck_runs_as_module_from_repo_root(docker_lab):
    result = docker_lab.run(
        docker_lab.vm_ns, sys.executable, "-m", "lab.tcpcheck", "digest",
        "--bytes", 10, "--seed", "x", cwd=REPO_ROOT,
    )  # fmt: skip
    assert tcpcheck.parse(result.stdout)["sha256"] == tcpcheck.digest(10, "x")


# teardown


def test_teardown_removes_namespaces_etc_dirs_and_tracked_processes():
    fds_before = set(os.listdir("/proc/self/fd"))
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    the_lab = Lab(bridges=1).build()
    assert (NETNS_ETC / the_lab.vm_ns / "hosts").exists()
    procs = [the_lab.popen(ns, "sleep", "300") for ns in the_lab.namespaces]
    # a child that ignores SIGTERM must still go, within the grace period
    stubborn = the_lab.popen(
        the_lab.vm_ns, "sh", "-c", "trap '' TERM; sleep 300 & wait"
    )
    the_lab.teardown()

    assert_gone(the_lab)
    for proc in [*procs, stubborn]:
        assert proc.returncode is not None
        assert not pid_running(proc.pid)
    children_after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert children_after <= children_before
    assert set(os.listdir("/proc/self/fd")) == fds_before
    the_lab.teardown()  # idempotent


def test_teardown_runs_when_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(bridges=1) as the_lab:
            proc = the_lab.popen(the_lab.containers[0].ns, "sleep", "300")
            raise RuntimeError("boom")
    assert_gone(the_lab)
    assert not pid_running(proc.pid)


def test_teardown_kills_untracked_process_left_in_lab_namespace():
    with Lab(bridges=1) as the_lab:
        out = the_lab.run(
            the_lab.vm_ns, "sh", "-c", "setsid sleep 300 >/dev/null 2>&1 & echo $!"
        )
        stray = int(out.stdout)
        assert pid_running(stray)
    assert_gone(the_lab)
    assert not pid_running(stray)


def test_failed_build_removes_what_it_made(monkeypatch):
    def broken_firewall(*args, **kwargs):
        raise LabError("firewall broke")

    monkeypatch.setattr(lab.topology, "install_docker_firewall", broken_firewall)
    the_lab = Lab(bridges=1)
    with pytest.raises(LabError, match="firewall broke"):
        the_lab.build()
    assert_gone(the_lab)


def test_sigterm_tears_down_lab_built_without_with():
    script = textwrap.dedent(
        """
        import time
        from lab import Lab
        lab = Lab(bridges=1).build()
        proc = lab.popen(lab.vm_ns, "sleep", "300")
        print(lab.prefix, proc.pid, flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        prefix, sleep_pid = child.stdout.readline().split()
        assert namespaces_with(prefix)
        os.kill(child.pid, signal.SIGTERM)
        assert child.wait(timeout=30) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    assert namespaces_with(prefix) == []
    assert not (NETNS_ETC / f"{prefix}-vm").exists()
    assert not pid_running(int(sleep_pid))


def test_two_labs_coexist_with_distinct_prefixes():
    with Lab(bridges=1) as a, Lab(bridges=1) as b:
        assert a.prefix != b.prefix
        for the_lab in (a, b):
            c = the_lab.containers[0]
            assert ping(the_lab, the_lab.vm_ns, c.ip).returncode == 0
    assert_gone(a)
    assert_gone(b)
