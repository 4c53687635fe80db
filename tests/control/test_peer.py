import json

from control.peer import PeerTracker

A, B = ("10.0.0.2", 40000), ("10.0.0.3", 40001)


def test_first_heartbeat_sets_the_peer():
    t = PeerTracker()
    assert t.heard(A, 100.0)
    assert t.peer == A


def test_live_peer_is_not_replaced_by_a_stranger():
    t = PeerTracker()
    t.heard(A, 100.0)
    assert not t.heard(B, 101.0)
    t.traffic(104.0)
    assert not t.tick(105.0)
    assert t.peer == A


def test_candidate_takes_over_once_the_peer_is_silent():
    t = PeerTracker()
    t.heard(A, 100.0)
    assert not t.heard(B, 100.5)  # restarted VM side, old one just died
    assert not t.tick(105.0)  # A silent for 5 s: within one interval
    assert not t.heard(B, 105.5)
    assert t.tick(107.0)  # A silent for 7 s, B heard 1.5 s ago
    assert t.peer == B


def test_stale_candidate_is_forgotten():
    t = PeerTracker()
    t.heard(A, 100.0)
    t.heard(B, 100.5)
    t.traffic(110.0)  # A is alive after all
    assert not t.tick(115.0)
    t.traffic(116.0)
    assert not t.tick(121.0)
    assert t.peer == A and t.candidate is None


def test_peer_survives_a_restart_through_the_state_file(tmp_path):
    path = tmp_path / "state"
    t = PeerTracker(str(path))
    t.heard(A, 1.0)
    assert json.loads(path.read_text()) == {"peer": list(A), "hello": None}
    restarted = PeerTracker(str(path))
    assert restarted.load(50.0) == A
    assert not restarted.heard(B, 51.0)  # the restored peer gets its grace
    assert restarted.peer == A


def test_what_the_peer_said_survives_a_restart_and_not_a_new_peer(tmp_path):
    path = tmp_path / "state"
    t = PeerTracker(str(path))
    t.heard(A, 1.0)
    t.info = {"caps": 0x17, "mtu": 1400, "ports": [A[1]], "networks": []}
    t.save()
    restarted = PeerTracker(str(path))
    assert restarted.load(50.0) == A
    assert restarted.info == t.info
    restarted.heard((A[0], A[1] + 1), 50.5)  # the VM side restarted too
    assert restarted.info is None
    assert PeerTracker(str(path)).load(60.0) and json.loads(path.read_text())[
        "hello"
    ] is None


def test_a_peer_heard_in_this_run_is_not_replaced_by_the_state_file(tmp_path):
    path = tmp_path / "state"
    PeerTracker(str(path)).heard(A, 1.0)
    t = PeerTracker(str(path))
    t.heard(B, 2.0)  # heard before the state file was read
    assert t.load(3.0) is None
    assert t.peer == B and t.confirmed


def test_a_stored_peer_that_is_no_address_is_ignored(tmp_path):
    path = tmp_path / "state"
    for peer in (["10.0.0.2", 70000], ["10.0.0.2", 0], ["10.0.0.2", "1"],
                 [167772162, 4000], ["10.0.0.300", 4000], ["10.0.0.2"]):  # fmt: skip
        path.write_text(json.dumps({"peer": peer, "hello": None}))
        t = PeerTracker(str(path))
        assert t.load(1.0) is None and t.peer is None, peer


def test_corrupt_state_file_is_ignored(tmp_path):
    path = tmp_path / "state"
    path.write_text("{not json")
    assert PeerTracker(str(path)).load(1.0) is None


def test_restored_peer_gives_way_at_once_to_a_new_port_on_its_address(tmp_path):
    path = tmp_path / "state"
    PeerTracker(str(path)).heard(A, 1.0)
    t = PeerTracker(str(path))
    t.load(50.0)
    new_port = (A[0], A[1] + 1)
    assert t.heard(new_port, 50.5)  # the VM side restarted with the host
    assert t.peer == new_port


def test_confirmed_peer_does_not_give_way_to_another_port():
    t = PeerTracker()
    t.heard(A, 1.0)
    assert not t.heard((A[0], A[1] + 1), 2.0)
    assert t.peer == A


def test_a_stored_hello_is_taken_only_as_a_peer_could_have_sent_it():
    from control.hostside import _hello_from_info, _hello_info
    from fastfwd import frames

    good = {"caps": 0x17, "mtu": 1400, "ports": [40000], "networks": ["172.18.0.0/16"]}
    hello = _hello_from_info(good)
    assert (hello.caps, hello.mtu, hello.ports, hello.networks) == (
        0x17, 1400, (40000,), ("172.18.0.0/16",)
    )  # fmt: skip
    assert _hello_info(hello) == good
    bad = [
        {**good, "caps": float("inf")},
        {**good, "caps": 1e999},
        {**good, "caps": True},
        {**good, "caps": 1 << 20},
        {**good, "mtu": 100},
        {**good, "mtu": "1400"},
        {**good, "ports": [70000]},
        {**good, "ports": list(range(1, frames.MAX_HELLO_PORTS + 2))},
        {**good, "ports": "40000"},
        {**good, "networks": ["not a network"]},
        {**good, "networks": [f"10.{i // 256}.{i % 256}.0/24" for i in range(2000)]},
        {k: v for k, v in good.items() if k != "mtu"},
        ["caps", 1],
        None,
    ]
    for info in bad:
        assert _hello_from_info(info) is None, info
