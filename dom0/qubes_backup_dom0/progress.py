"""A progress bar with bytes, rate and ETA on a terminal; silent otherwise."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool | None = None) -> None:
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm  # only for a terminal: ~20 ms of imports a script or a GUI never needs

            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                             leave=True)  # fmt: skip
        self._last = 0

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            return
        if total != self._bar.total:
            self._bar.total = total
        self._bar.update(done - self._last)
        self._last = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
