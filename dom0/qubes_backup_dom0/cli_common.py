"""What both command lines share: one-line errors, exit codes, tables, confirmation."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence

from .errors import BackupError, UsageError
from .text import printable


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table; cells may come from a backup, so control characters are neutralised."""
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "-+-".join("-" * w for w in widths)
    out = [" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    out += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def confirm(question: str, assume_yes: bool) -> bool:
    """Ask; anything but y/yes is no, and so is Ctrl-D (end of input) at the prompt."""
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        raise BackupError("confirmation needed but there is no terminal: add -y")
    try:
        answer = input(f"{question} [y/N] ").strip().lower()
    except EOFError:
        print(file=sys.stderr)  # the prompt's line was not ended by the user
        return False
    return answer in ("y", "yes")


def check_text_arg(value: str, what: str) -> str:
    """A command-line argument that is sent to a VM or into a backup must be valid UTF-8 (usage error)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid UTF-8 text") from None
    return value


def raise_interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: end like Ctrl-C, so the same clean-up runs (no partial backup, dom0 unchanged)."""
    raise KeyboardInterrupt


def run_cli(body: Callable[[], int], debug: bool) -> int:
    """Run a command body: BackupError -> one line on stderr and its exit code; Ctrl-C -> 130."""
    try:
        return body()
    except BackupError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog()}: error: {printable(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog()}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"{prog()}: internal error: {type(e).__name__}: {printable(str(e))} (run with --debug for details)",
              file=sys.stderr)  # fmt: skip
        return 1


def prog() -> str:
    import os

    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "qubes-backup"
