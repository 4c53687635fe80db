"""Teardown of live labs when the process ends without reaching `__exit__`.

Covers a plain `build()` without `teardown()`, `sys.exit`, and SIGTERM (a
CI runner cancelling a job, `timeout`, a perf harness being stopped): the
handler tears the labs down, then lets the signal end the process as it
would have. SIGINT already raises KeyboardInterrupt, which `with` blocks
handle. SIGKILL cannot
be covered; a later run's prefix differs, so it cannot collide with the
leftovers, which `ip netns list` shows by their `ff` prefix.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from typing import Protocol

log = logging.getLogger(__name__)


class _Lab(Protocol):
    def teardown(self) -> None: ...


_lock = threading.RLock()  # the SIGTERM handler may run while the main thread holds it
_live: dict[int, _Lab] = {}  # id(lab) -> lab, in build order
_owner_pid = os.getpid()
_atexit_registered = False
_previous_sigterm: object = None
_sigterm_installed = False


def register(lab: _Lab) -> None:
    """Make sure `lab` is torn down at exit or SIGTERM until `release`d."""
    global _atexit_registered
    with _lock:
        _live[id(lab)] = lab
        if not _atexit_registered:
            atexit.register(teardown_all)
            _atexit_registered = True
    _install_sigterm()


def release(lab: _Lab) -> None:
    """Forget `lab` (it has been torn down); restore SIGTERM when none left."""
    with _lock:
        _live.pop(id(lab), None)
        empty = not _live
    if empty:
        _restore_sigterm()


def teardown_all() -> None:
    """Tear down every live lab, newest first; log failures, raise none."""
    if os.getpid() != _owner_pid:
        return  # a forked child inherited the registry; the labs are not its own
    with _lock:
        labs = list(_live.values())
    for lab in reversed(labs):
        try:
            lab.teardown()
        except Exception:
            log.exception("lab teardown failed at exit")


def _install_sigterm() -> None:
    global _previous_sigterm, _sigterm_installed
    if threading.current_thread() is not threading.main_thread():
        return  # LIMIT: only the main thread may set handlers; atexit still covers
    with _lock:
        if _sigterm_installed:
            return
        _previous_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
        _sigterm_installed = True


def _restore_sigterm() -> None:
    global _sigterm_installed
    if threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        if (
            not _sigterm_installed
            or signal.getsignal(signal.SIGTERM) is not _on_sigterm
        ):
            return  # someone installed their own handler after ours; keep theirs
        signal.signal(signal.SIGTERM, _previous_sigterm or signal.SIG_DFL)
        _sigterm_installed = False


def _on_sigterm(signum, frame) -> None:
    log.info("lab teardown on signal signum=%d", signum)
    previous = _previous_sigterm
    teardown_all()
    _restore_sigterm()
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        # End the process the way SIGTERM would have. Not SystemExit: pytest
        # reports that as one failed test and carries on with the session.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
