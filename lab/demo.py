"""The main job, shown end to end: ``python -m lab.demo`` (as root).

Builds the lab (a host, a VM with two docker networks and a container on
each, Docker 28's firewall), starts ``fastfwd run`` in the host namespace and
``fastfwd connect`` in the VM namespace, then, from the host namespace and
by the containers' IPs: pings, moves data over TCP with iperf3 in both
directions, and prints what it measured. Everything is torn down at the end,
also on failure or Ctrl-C.
"""

import argparse
import json
import re
import sys
import tempfile
import time

from lab import Lab
from lab.tunnel import Tunnel

IPERF_PORT = 5201


def ping_stats(lab, ns, ip, count):
    res = lab.run(
        ns,
        "ping",
        "-c",
        str(count),
        "-i",
        "0.2",
        "-W",
        "2",
        str(ip),
        check=False,
        timeout=60,
    )
    loss = re.search(r"([\d.]+)% packet loss", res.stdout)
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/", res.stdout)
    return {
        "ok": res.returncode == 0,
        "loss_pct": float(loss.group(1)) if loss else 100.0,
        "rtt_ms_min": float(rtt.group(1)) if rtt else None,
        "rtt_ms_avg": float(rtt.group(2)) if rtt else None,
        "rtt_ms_max": float(rtt.group(3)) if rtt else None,
    }


def iperf(lab, server_ns, client_ns, target, megabytes, reverse):
    server = lab.popen(
        server_ns, "iperf3", "-s", "-1", "-p", str(IPERF_PORT), stdout=-3, stderr=-3
    )
    try:
        argv = [
            "iperf3",
            "-c",
            str(target),
            "-p",
            str(IPERF_PORT),
            "-n",
            f"{megabytes}M",
            "-J",
            "--connect-timeout",
            "3000",
        ]
        if reverse:
            argv.append("-R")
        for _ in range(50):  # the server needs a moment to listen
            res = lab.run(client_ns, *argv, check=False, timeout=120)
            # iperf3 -J may exit 0 and report the failure in the JSON only.
            data = (
                json.loads(res.stdout) if res.stdout.strip() else {"error": res.stderr}
            )
            if "Connection refused" not in str(data.get("error", "")):
                break
            time.sleep(0.1)
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        end = data["end"]
        return {
            "bytes": int(end["sum_sent"]["bytes"]),
            "seconds": round(end["sum_received"]["seconds"], 2),
            "gbit_s": round(end["sum_received"]["bits_per_second"] / 1e9, 3),
            "retransmits": end.get("sum_sent", {}).get("retransmits"),
        }
    finally:
        lab.stop(server)


def run_demo(megabytes, out):
    results = {}
    with (
        Lab(bridges=2, containers_per_bridge=1) as lab,
        tempfile.TemporaryDirectory(prefix="fastfwd-demo-") as work,
    ):
        c1, c2 = lab.containers
        say(
            out,
            f"lab {lab.prefix}: host ns {lab.host_ns}, vm ns {lab.vm_ns}, containers {c1.ip} ({c1.bridge.name}) and {c2.ip} ({c2.bridge.name})",
        )
        tunnel = Tunnel(lab, work)
        try:
            tunnel.start()
            host = tunnel.status("host")
            say(
                out,
                f"tunnel up: host {host['address']} peer {host['peer']}, routes {', '.join(host['routes'])}",
            )

            for c in (c1, c2):
                p = ping_stats(lab, lab.host_ns, c.ip, 10)
                results[f"ping_{c.name}"] = p
                say(
                    out,
                    f"ping host -> {c.ip}: loss {p['loss_pct']}%, rtt avg {p['rtt_ms_avg']} ms (min {p['rtt_ms_min']}, max {p['rtt_ms_max']})",
                )
                if not p["ok"]:
                    raise RuntimeError(f"{c.ip} did not answer through the tunnel")

            up = iperf(lab, c1.ns, lab.host_ns, c1.ip, megabytes, reverse=False)
            results["tcp_host_to_container"] = up
            say(
                out,
                f"TCP host -> {c1.ip}: {up['bytes'] / 2**20:.0f} MiB in {up['seconds']} s = {up['gbit_s']} Gbit/s",
            )
            down = iperf(lab, c1.ns, lab.host_ns, c1.ip, megabytes, reverse=True)
            results["tcp_container_to_host"] = down
            say(
                out,
                f"TCP {c1.ip} -> host: {down['bytes'] / 2**20:.0f} MiB in {down['seconds']} s = {down['gbit_s']} Gbit/s",
            )

            status = tunnel.status("host")
            results["host_processes"] = status["processes"]
            say(out, "host side processes:")
            for proc in status["processes"]:
                if proc["name"] == "control":
                    continue  # it forwards nothing
                c = proc.get("counters", {})
                say(
                    out,
                    f"  {proc['name']:8} pid {proc['pid']:>7}  pkts in {c.get('pkts_in', 0):>9}  out {c.get('pkts_out', 0):>9}  cpu {proc.get('cpu_s')} s",
                )
        except BaseException:
            print(tunnel.logs(), file=sys.stderr)
            raise
        finally:
            tunnel.stop()
    say(out, "lab torn down")
    return results


def say(out, line):
    print(line, file=out, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m lab.demo", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--megabytes", type=int, default=200, help="MiB moved each way (default 200)"
    )
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    results = run_demo(args.megabytes, sys.stdout)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
