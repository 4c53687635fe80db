"""Docker 28's rule set, built without running anything (no root needed)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from lab import Bridge, Container, Lab, LabError
from lab.firewall import FILTER_CHAINS, docker_rules
from lab.netns import check_ifname


def topology():
    b1 = Bridge("ffab12-b1", IPv4Network("172.18.0.0/16"), IPv4Address("172.18.0.1"))
    b2 = Bridge("ffab12-b2", IPv4Network("172.19.0.0/16"), IPv4Address("172.19.0.1"))
    c1 = Container("c1", "ffab12-c1", IPv4Address("172.18.0.2"), b1, "ffab12-p1")
    c2 = Container("c2", "ffab12-c2", IPv4Address("172.19.0.2"), b2, "ffab12-p2")
    return [b1, b2], [c1, c2]


def as_lines(rules):
    return [" ".join(r) for r in rules]


def test_docker_rules_set_forward_policy_drop_before_anything_else():
    lines = as_lines(docker_rules(*topology()))
    assert lines[0] == "-t filter -P FORWARD DROP"
    for chain in FILTER_CHAINS:
        assert f"-t filter -N {chain}" in lines


def test_docker_rules_jump_docker_user_before_docker_forward():
    lines = as_lines(docker_rules(*topology()))
    user = lines.index("-t filter -A FORWARD -j DOCKER-USER")
    assert user < lines.index("-t filter -A FORWARD -j DOCKER-FORWARD")
    assert not [line for line in lines if "-A DOCKER-USER" in line]


def test_docker_rules_order_docker_forward_like_docker_28():
    lines = as_lines(docker_rules(*topology()))
    forward = [line for line in lines if "-A DOCKER-FORWARD" in line]
    assert forward == [
        "-t filter -A DOCKER-FORWARD -j DOCKER-CT",
        "-t filter -A DOCKER-FORWARD -j DOCKER-ISOLATION-STAGE-1",
        "-t filter -A DOCKER-FORWARD -j DOCKER-BRIDGE",
        "-t filter -A DOCKER-FORWARD -i ffab12-b1 -j ACCEPT",
        "-t filter -A DOCKER-FORWARD -i ffab12-b2 -j ACCEPT",
    ]


def test_docker_rules_isolate_bridges_and_guard_containers():
    lines = as_lines(docker_rules(*topology()))
    for br, subnet in (("ffab12-b1", "172.18.0.0/16"), ("ffab12-b2", "172.19.0.0/16")):
        assert (
            f"-t filter -A DOCKER-CT -o {br} -m conntrack --ctstate "
            "RELATED,ESTABLISHED -j ACCEPT"
        ) in lines
        assert f"-t filter -A DOCKER-BRIDGE -o {br} -j DOCKER" in lines
        assert f"-t filter -A DOCKER ! -i {br} -o {br} -j DROP" in lines
        assert (
            f"-t filter -A DOCKER-ISOLATION-STAGE-1 -i {br} ! -o {br} "
            "-j DOCKER-ISOLATION-STAGE-2"
        ) in lines
        assert f"-t filter -A DOCKER-ISOLATION-STAGE-2 -o {br} -j DROP" in lines
        assert f"-t nat -A POSTROUTING -s {subnet} ! -o {br} -j MASQUERADE" in lines
    assert "-t raw -A PREROUTING -d 172.18.0.2/32 ! -i ffab12-b1 -j DROP" in lines
    assert "-t raw -A PREROUTING -d 172.19.0.2/32 ! -i ffab12-b2 -j DROP" in lines


def test_lab_plans_docker_addresses_without_building():
    plan = Lab(bridges=2, containers_per_bridge=2, prefix="ffab12")
    assert [str(c.ip) for c in plan.containers] == [
        "172.18.0.2", "172.18.0.3", "172.19.0.2", "172.19.0.3",
    ]  # fmt: skip
    assert [c.bridge.name for c in plan.containers] == ["ffab12-b1"] * 2 + [
        "ffab12-b2"
    ] * 2
    assert plan.namespaces[:2] == ["ffab12-host", "ffab12-vm"]


def test_lab_rejects_overlapping_subnets_and_bad_prefix():
    with pytest.raises(ValueError, match="overlaps"):
        Lab(subnets=["10.0.0.0/16", "10.0.1.0/24"], prefix="ffab12")
    with pytest.raises(ValueError, match="prefix"):
        Lab(prefix="much-too-long")
    with pytest.raises(ValueError, match="too small"):
        Lab(subnets=["10.9.0.0/30"], containers_per_bridge=2, prefix="ffab12")


def test_check_ifname_rejects_names_over_15_characters():
    assert check_ifname("ffab12-p12345") == "ffab12-p12345"
    with pytest.raises(LabError, match="15"):
        check_ifname("ffab12-p123456789")
