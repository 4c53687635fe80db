"""Offload mode between two fastfwd sides, and the fallback to the
upstream format: framing negotiated by hello, data intact both ways."""

import time

import pytest

from lab.pytest_support import root_marks
from lab.tunnel import Tunnel
from tests.e2e.helpers import wait_for
from tests.e2e.test_tunnel import TRANSFER_BYTES, TUNNEL_HOST_IP, transfer

pytestmark = root_marks()


def framings(t):
    return {side: t.status(side).get("framing") for side in ("host", "vm")}


def wait_framing(t, want, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if set(framings(t).values()) == {want}:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize(
    "host_offload, vm_offload, want",
    [("on", "on", "offload"), ("off", "on", "compat"), ("on", "off", "compat")],
)
def test_framing_follows_what_both_sides_can_do_and_data_arrives_intact(
    lab, tmp_path, host_offload, vm_offload, want
):
    t = Tunnel(
        lab,
        tmp_path / "t",
        host_args=["--offload", host_offload],
        vm_args=["--offload", vm_offload],
    )
    t.start()
    try:
        assert wait_framing(t, want), (framings(t), t.logs())
        c1 = lab.containers[0]
        client, server = transfer(lab, c1.ns, lab.host_ns, c1.ip, "send")
        assert client["ok"] and server["ok"] and server["bytes"] == TRANSFER_BYTES, (
            client,
            server,
        )
        client, server = transfer(
            lab, lab.host_ns, c1.ns, TUNNEL_HOST_IP, "send", port=5602
        )
        assert client["ok"] and server["ok"], (client, server)
        host = t.status("host")
        reader = next(p for p in host["processes"] if p["name"] == "reader0")
        if want == "offload":
            # Super-packets: far fewer datagrams than 1400-byte packets would need.
            assert reader["counters"]["pkts_out"] < TRANSFER_BYTES / 1400 / 3
            # Both ways as GSO frames: runs of datagrams that fit the veth
            # (MTU 1500), taken whole by the other side.
            for side in ("host", "vm"):
                st = t.status(side)
                assert st["frame_segment_bytes"] == 1500 - 28
                writer = next(p for p in st["processes"] if p["name"] == "writer0")
                assert writer["counters"]["drops_split"] == 0
        else:
            assert t.status("host")["frame_segment_bytes"] == 0
    finally:
        t.stop()


def test_mtu_mismatch_between_the_sides_is_reported(lab, tmp_path):
    t = Tunnel(lab, tmp_path / "t", vm_args=["-mtu", "1300"])
    t.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "mtu mismatch" not in t.logs():
            time.sleep(0.2)
        assert "mtu mismatch" in t.logs()
        assert t.status("host")["peer_mtu"] == 1300
    finally:
        t.stop()


def test_gso_frames_follow_an_underlay_mtu_that_shrinks(lab, tmp_path):
    t = Tunnel(lab, tmp_path / "t")
    t.start()
    try:
        assert wait_framing(t, "offload"), t.logs()
        assert t.status("host")["frame_segment_bytes"] == 1472
        lab.run(lab.host_ns, "ip", "link", "set", lab.host_if, "mtu", "1400")
        lab.run(lab.vm_ns, "ip", "link", "set", lab.vm_if, "mtu", "1400")
        c1 = lab.containers[0]
        for direction in ("send", "recv"):
            client, server = transfer(
                lab, c1.ns, lab.host_ns, c1.ip, direction, nbytes=10 * 1024 * 1024
            )
            assert client["ok"] and server["ok"], (client, server, t.logs())
        wait_for(
            lambda: {t.status(s)["frame_segment_bytes"] for s in ("host", "vm")}
            == {1372},
            15.0,
        )
        assert t.status("host")["frame_segment_bytes"] == 1372, t.logs()
        assert t.status("vm")["frame_segment_bytes"] == 1372, t.logs()
    finally:
        t.stop()
