import logging
import os

from fastfwd import steering


def test_each_writer_gets_a_cpu_and_the_kernel_the_others():
    assert steering.plan("host", 1, [0, 1]) == {0: (0, [1])}
    # The VM side counts from the last CPU: two sides on one machine do not
    # pin their writers together.
    assert steering.plan("vm", 1, [0, 1]) == {0: (1, [0])}
    assert steering.plan("access", 1, [0, 1]) == {0: (1, [0])}
    assert steering.plan("host", 2, [2, 5, 7]) == {0: (2, [5, 7]), 1: (5, [2, 7])}
    assert steering.plan("vm", 3, [0, 1]) == {0: (1, [0]), 1: (0, [1]), 2: (1, [0])}


def test_one_cpu_is_nothing_to_steer():
    assert steering.plan("host", 2, [3]) == {}


def test_cpu_masks_in_the_sysfs_form():
    assert steering.cpu_mask([0]) == "1"
    assert steering.cpu_mask([1]) == "2"
    assert steering.cpu_mask([0, 1, 2, 3]) == "f"
    assert steering.cpu_mask([33]) == "2,00000000"
    assert steering.cpu_mask([0, 32, 64]) == "1,00000001,00000001"


def test_only_writers_whose_queue_took_rps_are_pinned(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(steering, "SYSFS_NET", str(tmp_path))
    q0 = tmp_path / "tun9" / "queues" / "rx-0"
    q0.mkdir(parents=True)
    (q0 / "rps_cpus").write_text("0\n")  # queue 1 has no RPS file
    with caplog.at_level(logging.INFO):
        pinned = steering.apply("host", "tun9", 2, cpus=[0, 1])
    assert pinned == {0: 0}
    assert (q0 / "rps_cpus").read_text() == "2\n"
    assert "steering off queue=1" in caplog.text


def test_one_cpu_sets_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(steering, "SYSFS_NET", str(tmp_path))
    with caplog.at_level(logging.INFO):
        assert steering.apply("vm", "tun9", 1, cpus=[0]) == {}
    assert "one usable CPU" in caplog.text
    assert os.listdir(tmp_path) == []


def test_a_refused_pin_is_reported_not_raised(caplog):
    with caplog.at_level(logging.WARNING):
        assert steering.pin(os.getpid(), 1 << 20) is False  # no such CPU
    assert "not pinned" in caplog.text
    assert steering.usable_cpus() == sorted(os.sched_getaffinity(0))
