"""Errors a user sees as one line.  Anything else escaping to the CLI is a bug (shown with --debug)."""

from __future__ import annotations

import os
import sys


class BackupError(Exception):
    """A failure with a one-line, user-facing explanation (what failed, where, what to do)."""

    exit_code = 1


class UsageError(BackupError):
    """Bad command-line input."""

    exit_code = 2


class NeedsRoot(BackupError):
    """Run as a user where a real dom0 needs root (LVM snapshots, writing VM volumes): say so in one line."""

    def __init__(self, why: str) -> None:
        tool = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
        command = f"sudo {tool} ..." if tool.startswith("qvm-backup") else "sudo ..."
        super().__init__(f"{why}: run as root ({command})")


class VerificationError(BackupError):
    """The backup failed authentication or structural checks: it was tampered with or damaged."""

    exit_code = 3


class Cancelled(BackupError):
    """The user or the API caller cancelled."""

    exit_code = 130
