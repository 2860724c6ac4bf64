"""Progress a person can trust: a bar on a terminal, plain periodic lines otherwise (a log, a systemd journal).

One unit system everywhere, bar and summaries alike: binary (KiB, MiB, GiB; ``cli_common.human``).  The
counted bytes are data bytes (holes excluded), the unit of the plan's totals, so the end is exactly 100%.
No ETA is shown until ``ETA_AFTER_SECONDS`` and ``ETA_AFTER_FRACTION`` have both passed: the first seconds
(KDF, snapshots, the VM starting) say nothing about the rate.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO

from qubes_backup_dom0.cli.common import human

ETA_AFTER_SECONDS = 3.0
ETA_AFTER_FRACTION = 0.02
LINE_SECONDS = 10.0  # without a terminal: a line at least every this many seconds...
LINE_STEP = 10  # ...and at every 10% step,
LINE_MIN_SECONDS = 1.0  # but never more often than this
BAR_REDRAW = 0.2  # a terminal bar is redrawn at most 5 times a second
BAR_WIDTH = 24


def duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """``progress(done, total)`` callback for backup and restore; ``close()`` ends the display.

    ``enabled``: None = on (a bar on a terminal, lines otherwise), False = nothing (``-q``).
    """

    def __init__(self, total: int, desc: str, enabled: bool | None = None, stream: TextIO | None = None,
                 clock=time.monotonic) -> None:  # fmt: skip
        self.stream = stream or sys.stderr
        self.enabled = enabled is not False
        self.tty = self.enabled and self.stream.isatty()
        self.total = total
        self.desc = desc
        self.done = 0
        self._clock = clock
        self._start = clock()
        self._last_draw = -1e9
        self._last_line = self._start
        self._next_step = LINE_STEP
        self._printed: int | None = None  # ``done`` of the last line/bar drawn
        self._closed = False

    # -- the text ------------------------------------------------------------------------------------
    def percent(self) -> float:
        return 100.0 if self.total <= 0 else min(100.0, 100.0 * self.done / self.total)

    def rate(self, now: float) -> float:
        elapsed = now - self._start
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float) -> str | None:
        """Seconds left as H:MM:SS, or None while it would be a guess."""
        elapsed = now - self._start
        if self.total <= 0 or elapsed < ETA_AFTER_SECONDS or self.done < ETA_AFTER_FRACTION * self.total:
            return None
        rate = self.rate(now)
        return duration((self.total - self.done) / rate) if rate > 0 else None

    def text(self, now: float) -> str:
        parts = [f"{self.percent():3.0f}%", f"{human(self.done)} of {human(self.total)}",
                 f"{human(int(self.rate(now)))}/s"]  # fmt: skip
        eta = self.eta(now)
        if self.done >= self.total:
            parts.append(f"in {duration(now - self._start)}")
        elif eta is not None:
            parts.append(f"ETA {eta}")
        return ", ".join(parts)

    # -- the callback --------------------------------------------------------------------------------
    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if not self.enabled:
            return
        now = self._clock()
        if self.tty:
            if now - self._last_draw >= BAR_REDRAW:
                self._draw_bar(now)
            return
        pct = self.percent()
        step_due = pct >= self._next_step and now - self._last_line >= LINE_MIN_SECONDS
        if step_due or now - self._last_line >= LINE_SECONDS:
            self._line(now)

    def _draw_bar(self, now: float) -> None:
        filled = int(BAR_WIDTH * self.percent() / 100)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        self.stream.write(f"\r{self.desc} [{bar}] {self.text(now)}\x1b[K")
        self.stream.flush()
        self._last_draw = now
        self._printed = self.done

    def _line(self, now: float) -> None:
        self.stream.write(f"{self.desc}: {self.text(now)}\n")
        self.stream.flush()
        self._last_line = now
        self._printed = self.done
        while self._next_step <= self.percent():
            self._next_step += LINE_STEP

    def close(self) -> None:
        """Show the final state (once), and end the bar's line."""
        if self._closed or not self.enabled:
            return
        self._closed = True
        now = self._clock()
        if self.tty:
            if self._printed is not None or self.done:
                self._draw_bar(now)
                self.stream.write("\n")
                self.stream.flush()
        elif self._printed != self.done and (self.done or self._printed is not None):
            self._line(now)


class _Job(Protocol):
    progress: Any
    cleaned: list[str]

    def run(self) -> Any: ...


def run_with_progress(job: _Job, data: int, verb: str, quiet: bool, log: Callable[[str], None]) -> float:
    """Run a restore or verify ``job`` of ``data`` bytes with a progress bar (none with ``quiet``), then log
    the lines of its clean-up; the seconds it took (never 0)."""
    bar = Progress(data, verb, enabled=None if not quiet else False)
    job.progress = bar
    start = time.monotonic()
    try:
        job.run()
    finally:
        bar.close()
    elapsed = max(time.monotonic() - start, 1e-9)
    for line in job.cleaned:
        log(line)
    return elapsed
