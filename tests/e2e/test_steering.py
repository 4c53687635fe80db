"""CPU steering in the lab: writers pinned, RPS of their TUN queues set to
the other CPUs, both gone or kept as they should be."""

import os
import signal

from fastfwd import steering
from lab.pytest_support import root_marks
from lab.tunnel import Tunnel
from tests.e2e.helpers import answers, pid_of, wait_for

pytestmark = root_marks()

WORKERS = 2


def rps(lab, ns, queue):
    """The RPS CPU set of a queue of the lab's TUN in ``ns``, as a number."""
    path = f"/sys/class/net/fastfwd0/queues/rx-{queue}/rps_cpus"
    text = lab.run(ns, "cat", path).stdout.strip()
    return int(text.replace(",", ""), 16)


def mask(cpus):
    return sum(1 << c for c in cpus)


def affinity(tunnel, side, name):
    return sorted(os.sched_getaffinity(pid_of(tunnel, side, name)))


def test_writers_are_pinned_and_the_kernel_works_on_the_other_cpus(lab, tmp_path):
    cpus = steering.usable_cpus()  # the sides inherit this process's CPUs
    t = Tunnel(lab, tmp_path / "t", workers=WORKERS)
    try:
        t.start()
        for side, ns in (("host", lab.host_ns), ("vm", lab.vm_ns)):
            want = steering.plan(side, WORKERS, cpus)
            for q in range(WORKERS):
                if len(cpus) < 2:
                    assert want == {} and rps(lab, ns, q) == 0
                    assert affinity(t, side, f"writer{q}") == cpus
                    continue
                cpu, others = want[q]
                assert affinity(t, side, f"writer{q}") == [cpu], t.logs()
                procs = {p["name"]: p for p in t.status(side)["processes"]}
                assert procs[f"writer{q}"]["cpus"] == [cpu]  # as status shows it
                assert rps(lab, ns, q) == mask(others)
                assert affinity(t, side, f"reader{q}") == cpus  # readers roam
        if len(cpus) >= 2:
            # The VM side's first writer is not where the host's is.
            assert affinity(t, "vm", "writer0") != affinity(t, "host", "writer0")
            # A restarted writer is pinned again.
            old = pid_of(t, "vm", "writer0")
            os.kill(old, signal.SIGKILL)
            assert wait_for(lambda: pid_of(t, "vm", "writer0") != old), t.logs()
            assert affinity(t, "vm", "writer0") == [steering.plan("vm", 1, cpus)[0][0]]
        assert wait_for(lambda: answers(lab, lab.containers[0].ip)), t.logs()
    finally:
        t.stop()
    gone = lab.run(lab.host_ns, "ip", "link", "show", "fastfwd0", check=False)
    assert gone.returncode != 0  # the device, and its RPS setting, are gone


def test_steering_off_leaves_cpus_and_rps_alone(lab, tmp_path):
    cpus = steering.usable_cpus()
    off = ["--steering", "off"]
    t = Tunnel(lab, tmp_path / "t", vm_args=off, host_args=off)
    try:
        t.start()
        for side, ns in (("host", lab.host_ns), ("vm", lab.vm_ns)):
            assert affinity(t, side, "writer0") == cpus
            assert rps(lab, ns, 0) == 0
        with open(t.host_log, encoding="utf-8") as f:
            assert "steering off reason=switched off" in f.read()
        assert wait_for(lambda: answers(lab, lab.containers[0].ip)), t.logs()
    finally:
        t.stop()
