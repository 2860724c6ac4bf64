"""Session fixtures of the tamper suite and the case count printed at the end of ``pytest -q``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import OrderGuard, World, build_world

_PREFIX = "tamper/"


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Built once: the small simulated system and two real backups of it (64 KiB chunks, cheap KDF)."""
    return build_world(tmp_path_factory.mktemp("tamper"))


@pytest.fixture
def guard(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[OrderGuard]:
    """Proof of order for in-process restores: checked after every case that uses it."""
    g = OrderGuard(monkeypatch)
    g.trust_file(world.target.qubes_xml)
    yield g
    g.check()


@pytest.fixture(autouse=True)
def _short_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stalls are detected after 2 s (QUBES_BACKUP_TIMEOUT) instead of the default 300 s."""
    monkeypatch.setenv("QUBES_BACKUP_TIMEOUT", "2")


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

