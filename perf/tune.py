"""``fastfwd tune``: short probes of each mode and worker count, then a
recommendation that can be appended to the configuration.

The probes run in a lab built for the purpose (network namespaces on this
machine, with Docker's firewall), because a live pair has no load generator
on its far side; the lab has the CPU count and kernel of the machine the
host side runs on, which is what the choice depends on.
"""

import datetime
import statistics
import tempfile

import psutil

from lab import Lab
from perf import measure, paths


def probe(seconds, max_workers, out):
    """Measure every candidate; returns ``[(path, up, down), ...]`` in Gbit/s."""
    candidates = [paths.Fastfwd(False, 1)] + [
        paths.Fastfwd(True, w) for w in range(1, max_workers + 1)
    ]
    candidates.append(paths.Fastfwd(True, 1, steering=False))
    results = []
    with (
        Lab(bridges=1, containers_per_bridge=1) as lab,
        tempfile.TemporaryDirectory(prefix="fastfwd-tune-") as work,
    ):
        c1 = lab.containers[0]
        for cand in candidates:
            print(f"tune: probing {cand.name} ...", end=" ", file=out, flush=True)
            cand.start(lab, work)
            try:
                up = measure.tcp(lab, c1.ns, c1.ip, seconds)["gbit_s"]
                down = measure.tcp(lab, c1.ns, c1.ip, seconds, reverse=True)["gbit_s"]
            finally:
                cand.stop(lab)
            print(f"up {up:.2f} Gbit/s, down {down:.2f} Gbit/s", file=out, flush=True)
            results.append((cand, up, down))
    return results


def recommend(results):
    """The candidate with the best mean of both directions; ties go to fewer
    workers (less memory, fewer processes), then to steering on."""
    best = max(
        results,
        key=lambda r: (
            round(statistics.mean(r[1:]), 1), -r[0].workers, r[0].steering
        ),
    )  # fmt: skip
    return best[0]


def config_lines(choice):
    stamp = datetime.date.today().isoformat()
    return [
        f"# fastfwd tune {stamp}",
        f"workers {choice.workers}",
        f"offload {'on' if choice.offload else 'off'}",
        f"steering {'on' if choice.steering else 'off'}",
    ]


def run(seconds, max_workers, write, out):
    max_workers = max_workers or len(psutil.Process().cpu_affinity())
    results = probe(seconds, max_workers, out)
    choice = recommend(results)
    lines = config_lines(choice)
    print(f"tune: recommended {choice.name}:", file=out)
    for line in lines[1:]:
        print(f"  {line}", file=out)
    if write:
        with open(write, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(
            f"tune: appended to {write} (takes effect when the host side restarts)",
            file=out,
        )
    return choice
