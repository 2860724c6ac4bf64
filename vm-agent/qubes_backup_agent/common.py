"""Small helpers shared by both services: one-line errors and a quiet exit when dom0 hangs up."""

from __future__ import annotations

import os
import signal
import sys
from typing import BinaryIO

from qubes_backup_protocol import frames

EXIT_OK = 0
EXIT_FAILED = 1


def one_line(text: str) -> str:
    """Printable, single-line, bounded: dom0 shows it to the user as is."""
    line = frames.safe_text(" ".join(text.split()), limit=400)
    return line.encode("utf-8")[: frames.MAX_ERROR_LEN].decode("ascii", "ignore")


def send_error(out: BinaryIO, message: str, damaged: bool = False) -> None:
    """Tell dom0 why we failed (``damaged``: the backup file itself is malformed, a DAMAGED frame); a dom0 that
    already hung up is not an error worth reporting."""
    line = one_line(message)
    print(f"qubes-backup-agent: {line}", file=sys.stderr)
    try:
        ftype = frames.FrameType.DAMAGED if damaged else frames.FrameType.ERROR
        frames.write_frame(out, ftype, "", line.encode("utf-8"))
        out.flush()
    except (BrokenPipeError, ConnectionResetError, ValueError):
        silence(out)


def silence(out: BinaryIO) -> None:
    """After dom0 closed our stdout, point it at /dev/null so the final flush does not raise."""
    try:
        fd = out.fileno()
    except (OSError, ValueError, AttributeError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally`` blocks remove partial files."""

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)
