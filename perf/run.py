"""The perf harness: ``python -m perf.run`` (as root).

Builds the lab and measures, interleaved in rounds, every path of
:mod:`perf.paths` with the same iperf3 and ping runs; prints a table with
each figure beside its ratio to the direct kernel path and to OpenVPN, and
writes JSON, a Markdown table and PNG plots to ``perf/results/``, named
after the time and the commit measured.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

from lab import Lab
from perf import measure, paths, report

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def measure_path(lab, path, args, workdir, progress):
    c1 = lab.containers[0]
    path.start(lab, workdir)
    cns = path.client_ns(lab)
    out = {}
    try:
        usage = measure.Usage(path.pids())
        time.sleep(args.idle_seconds)
        out["idle"] = usage.finish()
        out["ping_idle"] = measure.ping(lab, c1.ip, client_ns=cns)
        usage = measure.Usage(path.pids())
        out["tcp1_up"] = measure.tcp(lab, c1.ns, c1.ip, args.seconds, client_ns=cns)
        out["load"] = usage.finish()
        progress(f"tcp1 up {out['tcp1_up']['gbit_s']:.2f}")
        out["tcp1_down"] = measure.tcp(
            lab, c1.ns, c1.ip, args.seconds, reverse=True, client_ns=cns
        )
        progress(f"down {out['tcp1_down']['gbit_s']:.2f}")
        if not args.quick:
            out["tcp4_up"] = measure.tcp(
                lab, c1.ns, c1.ip, args.seconds, streams=4, client_ns=cns
            )
            out["tcp4_down"] = measure.tcp(
                lab, c1.ns, c1.ip, args.seconds, streams=4, reverse=True,
                client_ns=cns,
            )  # fmt: skip
            progress(
                f"tcp4 {out['tcp4_up']['gbit_s']:.2f}/{out['tcp4_down']['gbit_s']:.2f}"
            )
            out["udp"] = measure.udp(lab, c1.ns, c1.ip, args.seconds, client_ns=cns)
            progress(f"udp {out['udp']['rx_kpps']:.0f} kpps")
            out["ping_load"] = measure.ping_under_load(
                lab, c1.ns, c1.ip, args.seconds, client_ns=cns
            )
    finally:
        path.stop(lab)
    return out


def combine(runs):
    """The median of every numeric leaf over the rounds."""
    if not runs:
        return {}
    first = runs[0]
    if isinstance(first, dict):
        return {
            k: combine([r[k] for r in runs if isinstance(r, dict) and k in r])
            for k in first
        }
    values = [r for r in runs if isinstance(r, (int, float))]
    return statistics.median(values) if values else None


def environment():
    def git(*a):
        try:
            return subprocess.run(
                ["git", *a],
                capture_output=True,
                text=True,
                cwd=os.path.dirname(RESULTS),
            ).stdout.strip()
        except OSError:
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "kernel": platform.release(),
        "cpus": psutil.cpu_count(),
        "python": platform.python_version(),
        "openvpn": _version(["openvpn", "--version"]),
        "socat": _version(["socat", "-V"], line=1),
        "iperf3": _version(["iperf3", "--version"]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
    }


def _version(argv, line=0):
    try:
        out = subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()
        return out[line].strip() if len(out) > line else ""
    except OSError:
        return ""


def docker_engine():
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m perf.run", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--seconds", type=int, default=4, help="length of each iperf3 run (default 4)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds over all paths, interleaved (default 2)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="largest worker count to measure (default: usable CPUs)",
    )
    p.add_argument(
        "--only", help="comma-separated path names (e.g. direct,fastfwd-offload-w1)"
    )
    p.add_argument("--quick", action="store_true", help="1-stream TCP only")
    p.add_argument("--idle-seconds", type=float, default=3.0)
    p.add_argument("--out", default=RESULTS, help="results folder")
    args = p.parse_args(argv)

    if docker_engine():
        print(
            "perf: a Docker engine is present, but measuring in real containers is not implemented yet; using the lab"
        )
    else:
        print("perf: no Docker engine here; measuring in the lab (network namespaces)")
    max_workers = args.workers or len(psutil.Process().cpu_affinity())
    todo = paths.all_paths(max_workers)
    if args.only:
        wanted = set(args.only.split(","))
        todo = [x for x in todo if x.name in wanted]
    env = environment()
    results = {x.name: [] for x in todo}
    started = time.monotonic()
    with (
        Lab(bridges=1, containers_per_bridge=1, remote=True) as lab,
        tempfile.TemporaryDirectory(prefix="fastfwd-perf-") as work,
    ):
        total = args.rounds * len(todo)
        done = 0
        for rnd in range(args.rounds):
            for path in todo:
                done += 1
                head = f"[{done}/{total} {time.monotonic() - started:5.0f}s] round {rnd + 1} {path.name}:"
                print(head, end=" ", flush=True)
                try:
                    results[path.name].append(
                        measure_path(
                            lab,
                            path,
                            args,
                            work,
                            lambda s: print(s, end=" ", flush=True),
                        )
                    )
                    print("ok", flush=True)
                except Exception as exc:
                    print(f"FAILED: {exc}", flush=True)
    combined = {name: combine(runs) for name, runs in results.items()}
    doc = {
        "environment": env,
        "settings": vars(args),
        "paths": {x.name: {"kind": x.kind} for x in todo},
        "results": combined,
        "rounds": results,
    }
    table = report.table(doc)
    print()
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(args.out, f"{stamp}-{env['commit']}")
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(report.markdown(doc, table))
    plots = report.plots(doc, base)
    print(f"\nwrote {base}.json, {base}.md" + "".join(f", {x}" for x in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
