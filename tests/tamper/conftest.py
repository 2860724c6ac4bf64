"""Session fixtures of the tamper suite and the case count printed at the end of ``pytest -q``."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .harness import BIN, OrderGuard, World, build_world

_PREFIX = "tamper/"


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Built once: the small simulated system and two real backups of it (64 KiB chunks, cheap KDF)."""
    return build_world(tmp_path_factory.mktemp("tamper"))


@pytest.fixture
def guard(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[OrderGuard]:
    """Proof of order for in-process restores: checked after every case that uses it."""
    g = OrderGuard(monkeypatch)  # nothing trusted: dom0 parses no qubes.xml but a verified manifest's
    yield g
    g.check()


@pytest.fixture(autouse=True)
def _short_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stalls are detected after 2 s (QUBES_BACKUP_TIMEOUT) instead of the default 300 s.  The simulated
    import service (``#!/usr/bin/env python3``, one process per volume) finds the venv's interpreter first:
    through a pyenv shim every import would cost a few hundred ms of shim start-up."""
    monkeypatch.setenv("QUBES_BACKUP_TIMEOUT", "2")
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    stats = terminalreporter.stats
    counts = {
        outcome: sum(1 for r in stats.get(outcome, []) if _PREFIX in getattr(r, "nodeid", "").replace("\\", "/"))
        for outcome in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
    }
    total = sum(counts.values())
    if total:
        detail = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        terminalreporter.write_line(f"tamper suite: {total} cases ({detail})")

