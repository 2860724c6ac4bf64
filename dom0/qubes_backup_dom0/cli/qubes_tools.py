"""Qubes OS' own tools, for what they still do better than we can: restoring backups in Qubes' own format.

Installed under /usr/local (docs/INSTALL.md), our qvm-backup-restore comes first on PATH and Qubes' own stays
at /usr/bin/qvm-backup-restore (package qubes-core-admin-client).  Given a backup in Qubes' format
(header.QubesFormatBackup) we say so in one line and exec Qubes' tool with the same arguments.
"""

from __future__ import annotations

import os
import sys

from qubes_backup_dom0.errors import UsageError
from qubes_backup_dom0.format.header import QubesFormatBackup

QUBES_RESTORE = "/usr/bin/qvm-backup-restore"
ENV_QUBES_RESTORE = "QUBES_BACKUP_QUBES_RESTORE"  # override, for tests
ENV_HANDED_OVER = "QUBES_BACKUP_HANDED_OVER"  # set for Qubes' tool: never hand over twice (no loops)
OURS_ONLY = frozenset(("-y", "--yes", "--debug"))  # options Qubes' qvm-backup-restore does not have


def qubes_restore_tool() -> str | None:
    """Qubes' own qvm-backup-restore if it is installed and is not this very program."""
    tool = os.environ.get(ENV_QUBES_RESTORE) or QUBES_RESTORE
    if os.environ.get(ENV_HANDED_OVER) or not os.path.isfile(tool) or not os.access(tool, os.X_OK):
        return None
    if os.path.realpath(tool) == os.path.realpath(sys.argv[0]):
        return None
    return tool


def run_qubes_restore(exc: QubesFormatBackup, argv: list[str]) -> int:
    """Exec Qubes' own qvm-backup-restore with ``argv`` (no return), or raise a one-line UsageError."""
    tool = qubes_restore_tool()
    if tool is None:
        raise UsageError(f"{exc}: restore it with Qubes' own qvm-backup-restore ({QUBES_RESTORE}, package "
                         "qubes-core-admin-client)")  # fmt: skip
    args = [a for a in argv if a not in OURS_ONLY]
    print(f"qvm-backup-restore: {exc}; running Qubes' own {tool} for it", file=sys.stderr, flush=True)
    sys.stdout.flush()
    try:
        os.execve(tool, [tool, *args], {**os.environ, ENV_HANDED_OVER: "1"})
    except OSError as e:
        raise UsageError(f"{exc}, and Qubes' own {tool} does not start: {e.strerror or e}") from None
    return 1  # not reached
