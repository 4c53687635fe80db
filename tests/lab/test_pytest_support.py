"""When lab tests skip, and that they never skip in CI (no root needed)."""

from __future__ import annotations

import os

import pytest

from lab import pytest_support


@pytest.fixture(autouse=True)
def fresh_probe():
    pytest_support._probe.cache_clear()
    yield
    pytest_support._probe.cache_clear()


def test_skip_reason_says_how_to_enable_when_not_root(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = pytest_support.skip_reason()
    assert reason is not None and "run the tests as root" in reason


def test_skip_reason_never_skips_in_ci_even_when_not_root(monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert pytest_support.skip_reason() is None


def test_root_marks_carry_root_marker():
    assert [m.name for m in pytest_support.root_marks()] == ["root", "skipif"]
