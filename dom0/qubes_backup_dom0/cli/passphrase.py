"""Getting the passphrase the way cryptsetup does: prompt without echo (twice for a new backup), or read it
from a file or standard input (``-p FILE`` / ``-p -``) for scripts.  The API takes it as an argument."""

from __future__ import annotations

import getpass
import sys

from qubes_backup_dom0.errors import BackupError, UsageError

MAX_PASSPHRASE = 1024


def _strip_line(raw: bytes) -> bytes:
    line = raw.split(b"\n", 1)[0]
    return line[:-1] if line.endswith(b"\r") else line


def read_passphrase(source: str | None, *, confirm: bool, system_path=None) -> bytes:
    """The passphrase as UTF-8 bytes (the first line of FILE/stdin, or typed at the terminal)."""
    if source == "-":
        raw = sys.stdin.buffer.readline(MAX_PASSPHRASE + 2)
        phrase = _strip_line(raw)
    elif source is not None:
        path = system_path(source) if system_path else source
        try:
            with open(path, "rb") as f:
                phrase = _strip_line(f.read(MAX_PASSPHRASE + 2))
        except OSError as e:
            raise UsageError(f"cannot read the passphrase file {source}: {e.strerror}") from None
    else:
        if not sys.stdin.isatty():
            raise UsageError("no terminal to ask for the passphrase: use -p FILE or -p -")
        try:
            typed = getpass.getpass("Enter passphrase: ")
            if confirm and getpass.getpass("Verify passphrase: ") != typed:
                raise UsageError("passphrases do not match")
        except EOFError:  # Ctrl-D at the prompt
            raise BackupError("aborted: no passphrase entered") from None
        phrase = typed.encode("utf-8")
    if not phrase:
        raise UsageError("the passphrase is empty")
    if len(phrase) > MAX_PASSPHRASE:
        raise UsageError(f"the passphrase is longer than {MAX_PASSPHRASE} bytes")
    return phrase
