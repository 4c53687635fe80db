"""Tables and plots from a perf result document (see :mod:`perf.run`)."""

import os
import re

COLUMNS = [
    ("tcp1_up", "gbit_s", "TCP 1 up"),
    ("tcp1_down", "gbit_s", "TCP 1 down"),
    ("tcp4_up", "gbit_s", "TCP 4 up"),
    ("tcp4_down", "gbit_s", "TCP 4 down"),
]


def _get(result, *keys):
    for k in keys:
        if not isinstance(result, dict) or k not in result:
            return None
        result = result[k]
    return result


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(doc):
    """A text table: every throughput with its ratio to direct and OpenVPN."""
    res = doc["results"]
    direct, ovpn = res.get("direct", {}), res.get("openvpn", {})
    lines = []
    w = max([22, *(len(n) + 1 for n in res)])
    head = f"{'path':{w}}" + "".join(f"{label:>24}" for _, _, label in COLUMNS)
    head += f"{'UDP kpps (loss)':>18}{'ping p50/p99 idle':>20}{'p50/p99 load':>16}{'CPU% h/v':>12}{'PSS MB h/v':>12}{'idle CPU%':>10}"
    lines.append(head)
    lines.append(
        f"{'':{w}}" + "".join(f"{'Gbit/s  ×direct ×ovpn':>24}" for _ in COLUMNS)
    )
    for name, r in res.items():
        row = f"{name:{w}}"
        for key, field, _ in COLUMNS:
            v = _get(r, key, field)
            d, o = _get(direct, key, field), _get(ovpn, key, field)
            rd = v / d if v and d else None
            ro = v / o if v and o else None
            row += f"{_fmt(v, '.2f'):>10} {_fmt(rd, '.2f'):>6} {_fmt(ro, '.2f'):>6}"
        kpps, loss = _get(r, "udp", "rx_kpps"), _get(r, "udp", "loss_pct")
        row += f"{_fmt(kpps, '.0f'):>10} ({_fmt(loss, '.0f')}%)"
        row += f"{_fmt(_get(r, 'ping_idle', 'p50_ms'), '.2f'):>12}/{_fmt(_get(r, 'ping_idle', 'p99_ms'), '.2f'):<7}"
        row += f"{_fmt(_get(r, 'ping_load', 'p50_ms'), '.2f'):>8}/{_fmt(_get(r, 'ping_load', 'p99_ms'), '.2f'):<7}"
        row += f"{_fmt(_get(r, 'load', 'host', 'cpu_pct'), '.0f'):>6}/{_fmt(_get(r, 'load', 'vm', 'cpu_pct'), '.0f'):<5}"
        row += f"{_fmt(_get(r, 'load', 'host', 'pss_mb'), '.0f'):>6}/{_fmt(_get(r, 'load', 'vm', 'pss_mb'), '.0f'):<5}"
        idle = [_get(r, "idle", s, "cpu_pct") for s in ("host", "vm")]
        row += (
            f"{_fmt(max((i for i in idle if i is not None), default=None), '.2f'):>10}"
        )
        lines.append(row)
    return "\n".join(lines)


def cpu_table(doc):
    """Per path, where the CPU went during TCP 1 up: each process's user
    and system time (percent of one core) and the machine's split (percent
    of all cores)."""
    lines = []
    w = max([22, *(len(n) + 1 for n in doc["results"])])
    for name, r in doc["results"].items():
        load = _get(r, "load")
        if not isinstance(load, dict):
            continue
        procs = []
        for side in ("host", "vm", "access"):
            for proc, v in (_get(load, side, "processes") or {}).items():
                user, system = _get(v, "user_pct"), _get(v, "system_pct")
                if user is None or system is None or user + system < 0.5:
                    continue  # idle helpers (control processes) left out
                procs.append(f"{side}:{proc} {user:.0f}+{system:.0f}")
        m = _get(load, "machine") or {}
        kinds = ("user", "system", "softirq", "idle")
        split = "/".join(_fmt(m.get(f"{k}_pct"), ".0f") for k in kinds)
        lines.append(f"{name:{w}} machine {split:>12}   " + ", ".join(procs))
    return "\n".join(lines)


def markdown(doc, text_table):
    env = doc["environment"]
    out = [
        f"# perf run {env['date']} — commit {env['commit']}{' (dirty)' if env['dirty'] else ''}",
        "",
        f"kernel {env['kernel']}, {env['cpus']} CPUs, Python {env['python']}, {env['iperf3']}, {env['openvpn']}, {env['socat']}",
        f"settings: {doc['settings']}",
        "",
        "Throughput in Gbit/s with its ratio to the direct kernel path (×direct) and to",
        "OpenVPN cleartext (×ovpn); up = host → container, down = container → host;",
        "UDP: packets received per second of an unlimited 1200-byte stream; CPU% and",
        "PSS per side during TCP 1 up; idle CPU% of the busier side with no traffic.",
        "",
        "```",
        text_table,
        "```",
        "",
    ]
    cpu = cpu_table(doc)
    if cpu:
        out += [
            "CPU during TCP 1 up: the machine's user/system/softirq/idle in percent",
            "of all cores, then each working process's user+system time in percent",
            "of one core (processes under 0.5 % left out).",
            "",
            "```",
            cpu,
            "```",
            "",
        ]
    return "\n".join(out)


def plots(doc, base):
    """PNG plots: throughput against mode, and against worker count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    res = doc["results"]
    written = []
    names = list(res)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.4
    for i, (key, label) in enumerate(
        (("tcp1_up", "host → container"), ("tcp1_down", "container → host"))
    ):
        values = [_get(res[n], key, "gbit_s") or 0 for n in names]
        ax.bar(
            [x + (i - 0.5) * width for x in range(len(names))],
            values,
            width,
            label=label,
        )
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("Gbit/s (iperf3, 1 TCP stream)")
    ax.set_title("Throughput by path and mode")
    ax.legend()
    fig.tight_layout()
    path = base + "-modes.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(os.path.basename(path))

    workers = sorted(
        (int(m.group(1)), n)
        for n in names
        if (m := re.fullmatch(r"fastfwd-offload-w(\d+)", n))
    )
    if len(workers) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (
            ("tcp1_up", "1 stream up"),
            ("tcp4_up", "4 streams up"),
            ("tcp1_down", "1 stream down"),
        ):
            ax.plot(
                [w for w, _ in workers],
                [_get(res[n], key, "gbit_s") or 0 for _, n in workers],
                marker="o",
                label=label,
            )
        ax.set_xlabel("workers")
        ax.set_ylabel("Gbit/s")
        ax.set_title("fastfwd offload: throughput against workers")
        ax.legend()
        fig.tight_layout()
        path = base + "-workers.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(os.path.basename(path))
    return written
