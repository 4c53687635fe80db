"""Single measurements in the lab: iperf3 TCP and UDP, ping RTT, and the
CPU and memory the path's processes use meanwhile."""

import json
import re
import statistics
import subprocess
import time

import psutil

IPERF_PORT = 5201


def _iperf(lab, server_ns, client_ns, argv, timeout_s):
    server = lab.popen(
        server_ns,
        "iperf3",
        "-s",
        "-1",
        "-p",
        str(IPERF_PORT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            res = lab.run(
                client_ns,
                "iperf3",
                "-p",
                str(IPERF_PORT),
                "-J",
                "--connect-timeout",
                "2000",
                *argv,
                check=False,
                timeout=timeout_s,
            )
            data = (
                json.loads(res.stdout)
                if res.stdout.strip()
                else {"error": res.stderr.strip()}
            )
            # iperf3 -J may exit 0 and report the failure in the JSON only.
            if "Connection refused" not in str(data.get("error", "")):
                break
            time.sleep(0.05)
        if "error" in data:
            raise RuntimeError(f"iperf3 {' '.join(argv)}: {data['error']}")
        return data
    finally:
        lab.stop(server)


def tcp(lab, target_ns, target_ip, seconds, streams=1, reverse=False, client_ns=None):
    """Throughput in Gbit/s of an iperf3 TCP run host -> container (or back);
    ``client_ns`` replaces the host namespace (an accessor's machine)."""
    argv = ["-c", str(target_ip), "-t", str(seconds), "-P", str(streams)]
    if reverse:
        argv.append("-R")
    data = _iperf(lab, target_ns, client_ns or lab.host_ns, argv, seconds + 30)
    end = data["end"]
    return {
        "gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
        "retransmits": end.get("sum_sent", {}).get("retransmits"),
    }


def udp(lab, target_ns, target_ip, seconds, length=1200, client_ns=None):
    """Packet rate that arrives, and the loss, of an unlimited UDP stream."""
    argv = [
        "-c",
        str(target_ip),
        "-u",
        "-b",
        "0",
        "-l",
        str(length),
        "-t",
        str(seconds),
    ]
    data = _iperf(lab, target_ns, client_ns or lab.host_ns, argv, seconds + 30)
    s = data["end"]["sum"]
    received = s["packets"] - s["lost_packets"]
    return {
        "rx_kpps": received / s["seconds"] / 1e3,
        "loss_pct": s["lost_percent"],
        "gbit_s": received * length * 8 / s["seconds"] / 1e9,
    }


def ping(lab, target_ip, count=100, interval_s=0.01, client_ns=None):
    """RTT percentiles (ms) of ``count`` echoes from the host namespace."""
    res = lab.run(
        client_ns or lab.host_ns,
        "ping",
        "-c",
        str(count),
        "-i",
        str(interval_s),
        "-W",
        "1",
        str(target_ip),
        check=False,
        timeout=count * interval_s + 30,
    )
    rtts = sorted(float(m) for m in re.findall(r"time=([\d.]+) ms", res.stdout))
    if not rtts:
        return {"p50_ms": None, "p99_ms": None, "loss_pct": 100.0}
    return {
        "p50_ms": statistics.median(rtts),
        "p99_ms": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))],
        "loss_pct": 100.0 * (count - len(rtts)) / count,
    }


def ping_under_load(lab, target_ns, target_ip, seconds, client_ns=None):
    """RTT while one TCP stream fills the path host -> container."""
    server = lab.popen(
        target_ns,
        "iperf3",
        "-s",
        "-1",
        "-p",
        str(IPERF_PORT + 1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    client = lab.popen(
        client_ns or lab.host_ns,
        "iperf3",
        "-c",
        str(target_ip),
        "-p",
        str(IPERF_PORT + 1),
        "-t",
        str(seconds + 1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        return ping(
            lab, target_ip, count=int(seconds / 0.02), interval_s=0.02,
            client_ns=client_ns,
        )  # fmt: skip
    finally:
        lab.stop(client)
        lab.stop(server)


class Usage:
    """CPU (percent of one core) and memory of a set of processes over a
    span, per side and per process (user and system time apart), with the
    machine's split of its CPU time over the same span."""

    def __init__(self, pids_by_side):
        self.procs = {}
        for side, pids in pids_by_side.items():
            for pid in pids:
                try:
                    p = psutil.Process(pid)
                    self.procs.setdefault(side, []).append((p, p.cpu_times()))
                except psutil.Error:
                    pass
        self.machine = psutil.cpu_times()
        self.started = time.monotonic()

    def finish(self):
        elapsed = time.monotonic() - self.started
        out = {}
        for side, entries in self.procs.items():
            cpu = pss = 0.0
            each = {}
            for p, before in entries:
                try:
                    now, name, mem = p.cpu_times(), p.name(), _pss(p)
                except psutil.Error:
                    continue
                user, system = now.user - before.user, now.system - before.system
                cpu += user + system
                pss += mem
                key, i = name, 2
                while key in each:  # two processes of one name (socat, openvpn)
                    key, i = f"{name}#{i}", i + 1
                each[key] = {
                    "user_pct": 100.0 * user / elapsed,
                    "system_pct": 100.0 * system / elapsed,
                    "pss_mb": mem / 1e6,
                }
            out[side] = {
                "cpu_pct": 100.0 * cpu / elapsed,
                "pss_mb": pss / 1e6,
                "processes": each,
            }
        out["machine"] = machine_split(self.machine, psutil.cpu_times())
        return out


def machine_split(before, after):
    """Where the machine's CPU time went between two ``psutil.cpu_times()``:
    percent of all cores in user, system, softirq and idle."""
    fields = [f for f in ("user", "system", "softirq", "idle") if hasattr(after, f)]
    spent = {f: getattr(after, f) - getattr(before, f) for f in fields}
    # guest time is counted in user time already
    counted = [f for f in after._fields if not f.startswith("guest")]
    total = sum(getattr(after, f) - getattr(before, f) for f in counted) or 1.0
    return {f"{f}_pct": 100.0 * v / total for f, v in spent.items()}


def _pss(p):
    try:
        return p.memory_full_info().pss
    except (psutil.AccessDenied, AttributeError):
        return p.memory_info().rss
