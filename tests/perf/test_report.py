"""The perf harness's bookkeeping: CPU accounting, medians and the report."""

import os
import subprocess
import sys

from perf import measure, report, run


def test_usage_tells_a_busy_process_from_an_idle_one():
    spin = "import time\nt = time.time()\nwhile time.time() - t < 3: pass"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    try:
        usage = measure.Usage({"host": [busy.pid], "vm": [idle.pid]})
        subprocess.run(["sleep", "0.5"], check=True)
        out = usage.finish()
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
    (b,) = out["host"]["processes"].values()
    (i,) = out["vm"]["processes"].values()
    assert b["user_pct"] > 30 > i["user_pct"] + i["system_pct"]
    assert out["host"]["cpu_pct"] >= b["user_pct"]
    assert out["host"]["pss_mb"] > 1
    split = out["machine"]
    assert set(split) >= {"user_pct", "system_pct", "softirq_pct", "idle_pct"}
    assert 0 < sum(split.values()) <= 100.5


def test_two_processes_of_one_name_are_both_kept():
    usage = measure.Usage({"host": [os.getpid(), os.getppid()]})
    usage.procs["host"] = [usage.procs["host"][0]] * 2  # same name twice
    names = list(usage.finish()["host"]["processes"])
    assert len(names) == 2 and names[1] == names[0] + "#2"


def _result(up, host_procs):
    return {
        "tcp1_up": {"gbit_s": up},
        "load": {
            "host": {"cpu_pct": 50.0, "pss_mb": 60.0, "processes": host_procs},
            "machine": {"user_pct": 20.0, "system_pct": 50.0, "softirq_pct": 15.0,
                        "idle_pct": 15.0},
        },
    }  # fmt: skip


def test_rounds_combine_to_medians_per_process():
    rounds = [
        _result(up, {"fastfwd-reader0": {"user_pct": u, "system_pct": 40.0}})
        for up, u in ((6.0, 8.0), (7.0, 12.0), (9.0, 10.0))
    ]
    med = run.combine(rounds)
    assert med["tcp1_up"]["gbit_s"] == 7.0
    assert med["load"]["host"]["processes"]["fastfwd-reader0"]["user_pct"] == 10.0


def test_cpu_table_lists_working_processes_and_the_machine():
    doc = {
        "results": {
            "fastfwd-offload-w1": _result(
                7.0,
                {
                    "fastfwd-reader0": {"user_pct": 8.2, "system_pct": 41.0},
                    "fastfwd-control": {"user_pct": 0.1, "system_pct": 0.1},
                },
            ),
            "direct": {"tcp1_up": {"gbit_s": 15.0}},
        }
    }
    text = report.cpu_table(doc)
    assert "host:fastfwd-reader0 8+41" in text
    assert "control" not in text and "direct" not in text
    assert "20/50/15/15" in text


def test_plots_take_worker_counts_and_leave_other_variants_out(tmp_path):
    doc = {
        "results": {
            "direct": {"tcp1_up": {"gbit_s": 15.0}},
            "fastfwd-offload-w1": {"tcp1_up": {"gbit_s": 8.0}},
            "fastfwd-offload-w1-unsteered": {"tcp1_up": {"gbit_s": 7.0}},
            "fastfwd-offload-w2": {"tcp1_up": {"gbit_s": 7.5}},
        }
    }
    written = report.plots(doc, str(tmp_path / "r"))
    assert sorted(written) == ["r-modes.png", "r-workers.png"]
    assert all(os.path.getsize(tmp_path / name) > 0 for name in written)


def test_table_columns_line_up_with_a_long_path_name():
    doc = {
        "results": {
            "direct": {"tcp1_up": {"gbit_s": 15.0}},
            "fastfwd-offload-w1-unsteered": {"tcp1_up": {"gbit_s": 7.0}},
        }
    }
    lines = report.table(doc).splitlines()
    assert len(lines[2]) == len(lines[3]), lines  # the rows line up
    # Each figure ends where its column's heading does.
    head_end = lines[0].index("TCP 1 up") + len("TCP 1 up")
    assert lines[3].index("7.00") + len("7.00") == head_end - 14
    assert lines[2].index("15.00") + len("15.00") == head_end - 14
    assert lines[3].split()[:3] == ["fastfwd-offload-w1-unsteered", "7.00", "0.47"]
