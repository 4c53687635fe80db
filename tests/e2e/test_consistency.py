"""What the VM side holds follows what the host wants: after lost
datagrams, removed lines and restarts; and routes that follow the docker
networks the VM side sees."""

import os
import time

from lab.nsocket import socket_in
from lab.pytest_support import root_marks
from lab.tunnel import Tunnel
from tests.e2e.helpers import fastfwd_routes as host_routes
from tests.e2e.helpers import answers, wait_for
from tests.e2e.test_interop import read_control

pytestmark = root_marks()


def pair_rules(lab):
    b1, b2 = lab.bridges
    text = lab.iptables(lab.vm_ns, "-S")
    return [
        line
        for line in text.splitlines()
        if f"-i {b1.name} -o {b2.name}" in line or f"-i {b2.name} -o {b1.name}" in line
    ]


def pair_line(lab, sign="+"):
    b1, b2 = lab.bridges
    return f"iptables {b1.subnet.network_address}{sign}{b2.subnet.network_address}"


def test_removed_iptables_line_disconnects_the_pair(lab, tmp_path):
    t = Tunnel(lab, tmp_path / "t", lines=[pair_line(lab)])
    base = open(t.config).read()
    t.start()
    try:
        assert wait_for(lambda: len(pair_rules(lab)) == 2), t.logs()
        with open(t.config, "w") as f:
            f.write(base.replace(pair_line(lab) + "\n", ""))
        assert wait_for(lambda: pair_rules(lab) == []), t.logs()
    finally:
        t.stop()


def test_a_lost_control_push_is_repaired_by_the_next_hello(lab, tmp_path):
    t = Tunnel(lab, tmp_path / "t")
    t.start()
    # Drop the host's control headers (3-byte datagrams, 31-byte IP packets).
    drop = [
        "INPUT",
        "-p",
        "udp",
        "--sport",
        "2511",
        "-m",
        "length",
        "--length",
        "31",
        "-j",
        "DROP",
    ]
    try:
        lab.iptables(lab.vm_ns, "-I", *drop)
        with open(t.config, "a") as f:
            f.write(pair_line(lab) + "\n")
        time.sleep(1.5)
        assert pair_rules(lab) == []  # the push was lost
        lab.iptables(lab.vm_ns, "-D", *drop)
        # The VM side's next hello carries a digest that differs: re-pushed.
        assert wait_for(lambda: len(pair_rules(lab)) == 2, timeout_s=12), t.logs()
    finally:
        t.stop()


def test_restarted_vm_side_gets_every_pair_again(lab, tmp_path):
    t = Tunnel(lab, tmp_path / "t")
    t.start()
    try:
        assert t.config_lines(pair_line(lab))["ok"]  # added at run time, not at start
        assert wait_for(lambda: len(pair_rules(lab)) == 2)
        old = t.status("host")["peer"]
        t.stop_vm()
        assert pair_rules(lab) == []
        t.start_vm()
        assert wait_for(lambda: t.status("host")["peer"] != old, 20)
        assert wait_for(lambda: len(pair_rules(lab)) == 2), t.logs()
    finally:
        t.stop()


def test_upstream_vm_side_gets_a_disconnect_for_a_removed_line(lab, tmp_path):
    t = Tunnel(lab, tmp_path / "t", lines=[pair_line(lab)])
    base = open(t.config).read()
    t.start_host()
    assert wait_for(lambda: os.path.exists(t.host_socket))
    vm = socket_in(lab.vm_ns)
    try:
        vm.bind(("0.0.0.0", 0))
        vm.sendto(b"\x00", (str(lab.host_ip), 2511))
        body, _ = read_control(vm)
        assert body.decode().startswith("connect ")
        with open(t.config, "w") as f:
            f.write(base.replace(pair_line(lab) + "\n", ""))
        body, _ = read_control(vm)
        b1, b2 = lab.bridges
        assert (
            body.decode()
            == f"disconnect {b1.subnet.network_address} {b2.subnet.network_address}"
        )
    finally:
        vm.close()
        t.stop()


def test_routes_follow_the_docker_networks_of_the_vm(lab, tmp_path):
    t = Tunnel(lab, tmp_path / "t", routes=[], lines=["docker-routes on"])
    t.start()
    new = f"{lab.prefix}-bx"
    try:
        assert wait_for(
            lambda: host_routes(lab) == sorted(str(b.subnet) for b in lab.bridges)
        ), t.logs()
        assert answers(lab, str(lab.containers[1].ip))
        # a docker network appears in the VM, then goes away
        lab.run(lab.vm_ns, "ip", "link", "add", new, "type", "bridge")
        lab.run(lab.vm_ns, "ip", "addr", "add", "172.30.0.1/16", "dev", new)
        assert wait_for(lambda: "172.30.0.0/16" in host_routes(lab)), t.logs()
        lab.run(lab.vm_ns, "ip", "link", "del", new)
        assert wait_for(lambda: "172.30.0.0/16" not in host_routes(lab)), t.logs()
        # turned off: only route lines count
        with open(t.config, "a") as f:
            f.write("docker-routes off\n")
        assert wait_for(lambda: host_routes(lab) == []), t.logs()
    finally:
        t.stop()
