"""Errors a user sees as one line.  Anything else escaping to the CLI is a bug (shown with --debug)."""

from __future__ import annotations


class BackupError(Exception):
    """A failure with a one-line, user-facing explanation (what failed, where, what to do)."""

    exit_code = 1


class UsageError(BackupError):
    """Bad command-line input."""

    exit_code = 2


class VerificationError(BackupError):
    """The backup failed authentication or structural checks: it was tampered with or damaged."""

    exit_code = 3


class Cancelled(BackupError):
    """The user or the API caller cancelled."""

    exit_code = 130
