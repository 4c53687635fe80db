"""Deciding whether lab tests can run here, without a conftest.py.

    from lab.pytest_support import requires_root

    @requires_root()
    def test_something(): ...

In CI (environment variable CI set to true, 1 or yes) nothing is ever
skipped: a machine that cannot build the lab fails the tests loudly instead
of passing them silently.
"""

from __future__ import annotations

import functools
import os
import secrets
import subprocess

ENABLE_HINT = "run the tests as root: sudo ./scripts/test"


def in_ci() -> bool:
    """True when the CI environment variable says we run in CI."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_reason() -> str | None:
    """Why lab tests cannot run here, or None when they can (always in CI)."""
    if in_ci():
        return None
    return _probe()


@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    if os.geteuid() != 0:
        return f"needs root for network namespaces and /dev/net/tun; {ENABLE_HINT}"
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as exc:
        return (
            f"cannot open /dev/net/tun ({exc.strerror}); load the tun module "
            "(modprobe tun) or give the container --device /dev/net/tun"
        )
    os.close(fd)

    # the real test: can we create and delete a namespace?
    probe = f"ffprobe{secrets.token_hex(3)}"
    try:
        add = subprocess.run(
            ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run `ip netns add` ({exc}); install iproute2"
    if add.returncode != 0:
        return (
            f"`ip netns add` failed ({add.stderr.strip()}); {ENABLE_HINT} "
            "with CAP_SYS_ADMIN (a container needs --privileged)"
        )
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=10)
    return None


def root_marks() -> list:
    """`[pytest.mark.root, skipif(...)]`, e.g. for a module's `pytestmark`."""
    import pytest  # the lab itself must import without pytest installed

    reason = skip_reason()
    return [
        pytest.mark.root,
        pytest.mark.skipif(reason is not None, reason=reason or ""),
    ]


def requires_root():
    """A decorator: mark a test `root` and skip it when `skip_reason()` says.

    Works on test functions and classes.
    """
    marks = root_marks()

    def apply(obj):
        for mark in marks:
            obj = mark(obj)
        return obj

    return apply
