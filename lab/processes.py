"""Stopping the processes a lab started, by PID only.

A lab starts every long-lived process in its own session
(`start_new_session=True`), so the process is the leader of its own process
group and the group id equals its PID. That lets teardown reach the
children a process forked (a shell's pipeline, iperf3's workers) without
ever naming anything by pattern, and never touches the test runner's own
group.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0


def stop_process(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> int | None:
    """Stop `proc` and the process group it leads; return its exit status.

    Sends SIGTERM to the PID, waits up to `grace_s`, then SIGKILLs it, and
    finally SIGKILLs whatever is left of its process group. Safe to call on
    a process that has already exited. Closes the pipes the lab opened.
    """
    # once reaped, the PID may belong to someone else: only look it up while
    # it is still ours (running, or a zombie we have not waited for)
    pgid = _own_group(proc.pid) if proc.returncode is None else None
    if proc.poll() is None:
        _signal_pid(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning(
                "process ignored SIGTERM pid=%d grace_s=%.1f", proc.pid, grace_s
            )
            _signal_pid(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace_s)
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already empty
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode


def kill_pid(pid: int, grace_s: float = STOP_GRACE_S) -> None:
    """Terminate a process that is not our child: SIGTERM, wait, SIGKILL.

    Used for processes found inside a lab namespace that the lab did not
    track. It is not our child, so it is polled rather than waited for.
    """
    if not _signal_pid(pid, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _is_alive(pid):
            return
        time.sleep(0.05)
    _signal_pid(pid, signal.SIGKILL)


def _own_group(pid: int) -> int | None:
    """The group `pid` leads, or None when it leads none (or shares ours)."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return None
    if pgid != pid or pgid == os.getpgrp():
        return None
    return pgid


def _signal_pid(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # a zombie ("Z") has exited; its parent will reap it
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
