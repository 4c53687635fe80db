"""CPU steering: each writer on a CPU of its own, and the kernel's work on
what it writes into TUN on the other CPUs.

A writer's ``write()`` into a TUN queue does not return until the kernel has
taken the packet on as if it had arrived on a network card: forwarding it to
a container, or running the TCP receive path of the local stack, with the
ACKs and the next transmissions that follow. Without steering all of that
runs on the writer's CPU, inside its system call, so the writer, the busiest
process of its direction, also carries the heaviest kernel work.

Steering pins writer ``k`` to one CPU and sets receive packet steering
(RPS, ``/sys/class/net/DEV/queues/rx-k/rps_cpus``) of queue ``k`` to the
other CPUs: the writer only copies, and the kernel's processing continues
in parallel on another CPU. The host side counts CPUs from the first, the VM
side and the accessor from the last, so that two sides on one machine (the
lab) pin their first writers to different CPUs.

Nothing here outlives the process tree: the RPS setting belongs to the TUN
device, which goes when the side stops, and the affinity to the process.
"""

import logging
import os

log = logging.getLogger(__name__)

SYSFS_NET = "/sys/class/net"


def usable_cpus():
    """The CPUs this process may run on, in order."""
    return sorted(os.sched_getaffinity(0))


def plan(side, queues, cpus):
    """Queue -> (writer CPU, CPUs for the kernel's work), or {} when there
    is nothing to steer (fewer than two CPUs)."""
    cpus = sorted(cpus)
    n = len(cpus)
    if n < 2:
        return {}
    out = {}
    for q in range(queues):
        cpu = cpus[q % n] if side == "host" else cpus[(n - 1 - q) % n]
        out[q] = (cpu, [c for c in cpus if c != cpu])
    return out


def cpu_mask(cpus):
    """The sysfs form of a CPU set: hex words of 32 CPUs, highest first,
    separated by commas (``"2"``, ``"ffffffff,00000001"``)."""
    value = 0
    for c in cpus:
        value |= 1 << c
    words = []
    while True:
        words.append(value & 0xFFFFFFFF)
        value >>= 32
        if not value:
            break
    words.reverse()
    return ",".join([f"{words[0]:x}"] + [f"{w:08x}" for w in words[1:]])


def rps_path(dev, queue):
    return os.path.join(SYSFS_NET, dev, "queues", f"rx-{queue}", "rps_cpus")


def set_rps(dev, queue, cpus):
    """Write the RPS CPU set of one TUN queue; raises OSError."""
    with open(rps_path(dev, queue), "w", encoding="ascii") as f:
        f.write(cpu_mask(cpus) + "\n")


def apply(side, dev, queues, cpus=None):
    """Set RPS for every queue of ``dev``; returns queue -> writer CPU for
    the queues whose RPS took (only those writers get pinned: a pinned
    writer without RPS would keep the kernel's work on its own CPU)."""
    steering = plan(side, queues, usable_cpus() if cpus is None else cpus)
    if not steering:
        log.info("steering off reason=one usable CPU")
        return {}
    pinned = {}
    for q, (cpu, others) in steering.items():
        try:
            set_rps(dev, q, others)
        except OSError as exc:
            log.warning(
                "steering off queue=%d reason=%s (%s)",
                q, exc.strerror or exc, rps_path(dev, q),
            )  # fmt: skip
            continue
        pinned[q] = cpu
        log.info("steering queue=%d writer_cpu=%d kernel_cpus=%s", q, cpu, others)
    return pinned


def pin(pid, cpu):
    """Run process ``pid`` on ``cpu`` only (threads it starts later follow);
    False (logged) if refused."""
    try:
        os.sched_setaffinity(pid, {cpu})
    except OSError as exc:
        log.warning("not pinned pid=%d cpu=%d reason=%s", pid, cpu, exc.strerror or exc)
        return False
    return True
