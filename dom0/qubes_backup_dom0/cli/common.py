"""What both command lines share: one-line errors, exit codes, tables, confirmation."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TextIO

from qubes_backup_dom0.errors import BackupError, UsageError
from qubes_backup_dom0.text import printable


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
    """Ask on stderr (stdout may carry a JSON document); anything but y/yes is no, so is Ctrl-D."""
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        raise BackupError("confirmation needed but there is no terminal: add -y")
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:  # Ctrl-D: the prompt's line was not ended by the user
        print(file=sys.stderr)
        return False
    return line.strip().lower() in ("y", "yes")


def warn(text: str) -> None:
    """One warning line on stderr, ``PROG: warning: TEXT`` (text that may come from a backup made printable)."""
    print(f"{prog()}: warning: {printable(text)}", file=sys.stderr)


def check_text_arg(value: str, what: str) -> str:
    """A command-line argument that is sent to a VM or into a backup must be valid UTF-8 (usage error)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid UTF-8 text") from None
    return value


class _ClosedSafe:
    """A text stream whose reader may go away (``qvm-backup … | head -1``, a closed journal pipe): a write that
    finds the pipe closed points the descriptor at /dev/null and the command goes on, so a finished backup is
    not turned into a failure (or an internal error) by a reader that stopped reading.  Everything else is the
    wrapped stream's."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def _closed(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._closed()
            self._stream.flush()  # what was buffered goes to /dev/null

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def guard_output() -> None:
    """Both commands, first thing: stdout and stderr survive a reader that closed them (``_ClosedSafe``)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _ClosedSafe):
            try:
                stream.fileno()
            except (OSError, ValueError, AttributeError):  # not a real file (a test's capture): leave it
                continue
            setattr(sys, name, _ClosedSafe(stream))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory() -> None:
    """Both commands, at start: glibc keeps freed blocks of up to 32 MiB for reuse.

    By default, glibc maps each allocation over 128 KiB afresh and returns it to the kernel when freed: the
    kernel then zeroes and faults in every page again, for each 256 KiB object and its plaintext.  A 20 GiB
    snapshot restore took 1.1 million page faults this way, all paid on the threads that verify.

    With these settings, allocations up to 32 MiB come from the heap, and up to 256 MiB of free memory at
    its top is kept.  The bounds on what is in flight (the request window, the write-ahead queue, the backup's
    chunks) still bound the memory in use.  This does nothing where mallopt is missing (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 256 << 20)


def raise_interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: end like Ctrl-C, so the same clean-up runs (no partial backup, dom0 unchanged)."""
    raise KeyboardInterrupt


def emit_json(document: Mapping[str, object]) -> None:
    """The one JSON document of ``--json`` on stdout (docs/JSON.md)."""
    sys.stdout.write(json.dumps(document, indent=None, sort_keys=False) + "\n")
    sys.stdout.flush()


def run_cli(body: Callable[[], int], debug: bool, json_command: str | None = None) -> int:
    """Run a command body: BackupError -> one line on stderr and its exit code; Ctrl-C -> 130.

    ``json_command`` (``--json``): an error is also the JSON document on stdout, with the same exit code.
    """
    try:
        return body()
    except BackupError as e:
        if debug:
            traceback.print_exc()
        return _fail(printable(str(e)), e.exit_code, json_command)
    except MemoryError:  # the environment (a dom0 short of memory), not a bug: one line, as for the KDF
        if debug:
            traceback.print_exc()
        return _fail("not enough memory to continue: free some memory and try again", 1, json_command)
    except KeyboardInterrupt:
        print(f"{prog()}: interrupted", file=sys.stderr)
        if json_command is not None:
            emit_json(error_document(json_command, "interrupted", 130))
        return 130
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        if isinstance(e, RuntimeError) and "can't start new thread" in str(e):  # the system refused a thread
            return _fail("not enough memory to start a thread: free some memory and try again", 1, json_command)
        if type(e).__name__ == "ZstdError" and "Allocation error" in str(e):  # zstd's own out-of-memory
            return _fail("not enough memory to continue: free some memory and try again", 1, json_command)
        text = f"internal error: {type(e).__name__}: {printable(str(e))} (run with --debug for details)"
        print(f"{prog()}: {text}", file=sys.stderr)
        if json_command is not None:
            emit_json(error_document(json_command, text, 1))
        return 1


def _fail(message: str, code: int, json_command: str | None) -> int:
    print(f"{prog()}: error: {message}", file=sys.stderr)
    if json_command is not None:
        emit_json(error_document(json_command, message, code))
    return code


def error_document(command: str, message: str, code: int) -> dict[str, object]:
    return {"version": 1, "command": command, "ok": False, "error": message, "exit_code": code}


class _Version(argparse.Action):
    """``--version``: one line on stdout, never wrapped (argparse's own wraps a long path), exit 0."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> NoReturn:
        import os

        import qubes_backup_dom0

        where = os.path.dirname(os.path.dirname(os.path.realpath(qubes_backup_dom0.__file__)))
        print(f"{parser.prog} (qubes-backup) {qubes_backup_dom0.__version__} from {where}")
        parser.exit(0)


def add_version(p: argparse.ArgumentParser) -> None:
    """``--version``: which tool ran (qubes-backup's, not Qubes' own of the same name in /usr/bin), its version
    and where its code is (the package: /usr/lib/qubes-backup/dom0; a hand install; a source tree)."""
    p.add_argument("--version", action=_Version, nargs=0, default=argparse.SUPPRESS,
                   help="say which qvm-backup/qvm-backup-restore this is, its version, and exit")  # fmt: skip


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error under ``--json`` is also a JSON document on stdout (exit code 2)."""

    json_command: str | None = None

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        if self.json_command is not None:
            emit_json(error_document(self.json_command, printable(message), 2))
        sys.exit(2)


def prog() -> str:
    import os

    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "qubes-backup"
