"""Characters that must never come from a backup into a path, a journal line or dom0's terminal.

Control characters (C0, DEL, C1 such as the 8-bit CSI), line and paragraph separators and bidi overrides
can forge lines (a restore journal, a summary table) or rewrite what the terminal shows.  Paths in a
backup may not contain them, and everything printed from a backup goes through ``frames.safe_text``.
"""

from __future__ import annotations

import re

UNSAFE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def has_unsafe_chars(text: str) -> bool:
    return UNSAFE_RE.search(text) is not None


def printable(text: str) -> str:
    """``text`` with every unsafe character shown as ``?``: for tables and one-line errors on dom0's terminal."""
    return UNSAFE_RE.sub("?", text)
