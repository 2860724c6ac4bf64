"""Qubes OS' own restore tool, for backups in Qubes' own format: named in one line, run only when asked.

A backup whose first member is a Qubes ``backup-header`` (``QubesFormatBackup``, recognised by the strict
header parser from the *unauthenticated* header: docs/SECURITY.md) is not restored by this program.

- Without ``--use-qubes-restore``: one line names the format and the exact command that restores the backup
  with Qubes' own tool; exit code ``EXIT_QUBES_FORMAT`` (4).  Nothing else runs.
- With ``--use-qubes-restore``: that command runs (Qubes' ``/usr/bin/qvm-backup-restore``, package
  qubes-core-admin-client) as a child process on the user's terminal; then one line (or the ``--json``
  document) says that Qubes' tool ran and how it ended; the exit code is its exit code.

The command is built from the parsed options, never copied from argv, and never carries ``-p`` or ``-y``:
Qubes' tool asks for the passphrase and for confirmation itself.  The switch is decided on bytes no MAC has
verified, and Qubes' tool parses the backup in dom0 before it verifies it and accepts any older Qubes-format
backup made with the same passphrase; a "go ahead without asking" given to this program is not carried over.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from typing import Any

from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.format.header import QubesFormatBackup

QUBES_RESTORE = "/usr/bin/qvm-backup-restore"
ENV_QUBES_RESTORE = "QUBES_BACKUP_QUBES_RESTORE"  # another path for Qubes' tool (tests)
ENV_HANDED_OVER = "QUBES_BACKUP_HANDED_OVER"  # set for Qubes' tool: never hand over twice (no loops)
OPTION = "--use-qubes-restore"
EXIT_QUBES_FORMAT = 4
TOOL_OURS = "qubes-backup"
TOOL_QUBES = "qubes-os"

# Our options that Qubes' qvm-backup-restore has too (qubesadmin/tools/qvm_backup_restore.py, R4.2 and R4.3),
# passed on as given.  Never -p/--passphrase-file, never -y (Qubes' tool has no -y; its -p means "do not ask").
_FLAGS = (
    ("verify_only", "--verify-only"), ("skip_broken", "--skip-broken"), ("ignore_missing", "--ignore-missing"),
    ("skip_conflicting", "--skip-conflicting"), ("rename_conflicting", "--rename-conflicting"),
    ("skip_dom0_home", "--skip-dom0-home"), ("ignore_username_mismatch", "--ignore-username-mismatch"),
    ("ignore_size_limit", "--ignore-size-limit"), ("paranoid_mode", "--paranoid-mode"),
    ("auto_close", "--auto-close"), ("verbose", "--verbose"), ("quiet", "--quiet"),
)  # fmt: skip


class NotRestored(BackupError):
    """A backup in Qubes OS' own format that was not restored: the line names the command that restores it."""

    exit_code = EXIT_QUBES_FORMAT

    def __init__(self, message: str, command: list[str]) -> None:
        super().__init__(message)
        self.command = command


def qubes_command(args: argparse.Namespace, tool: str = QUBES_RESTORE) -> list[str]:
    """Qubes' qvm-backup-restore command line for what the user asked of us (without -p, -y)."""
    argv = [tool]
    if args.source_vm and args.source_vm != "dom0":
        argv += ["-d", args.source_vm]
    for vm in args.exclude:
        argv += ["-x", vm]
    argv += [flag for attr, flag in _FLAGS if getattr(args, attr, False)]
    if getattr(args, "list", False):  # Qubes' tool has no --list: --verify-only shows what the backup holds
        argv.append("--verify-only")
    positional = [args.location, *args.vms]
    if any(p.startswith("-") for p in positional):
        argv.append("--")
    return argv + positional


def qubes_restore_tool() -> str | None:
    """Qubes' own qvm-backup-restore if it is installed and is not this very program."""
    tool = os.environ.get(ENV_QUBES_RESTORE) or QUBES_RESTORE
    if os.environ.get(ENV_HANDED_OVER) or not os.path.isfile(tool) or not os.access(tool, os.X_OK):
        return None
    if os.path.realpath(tool) == os.path.realpath(sys.argv[0]):
        return None
    return tool


def format_line(exc: QubesFormatBackup) -> str:
    return f"this is a backup in Qubes OS' own format (version {exc.version}, as its unauthenticated header says)"


def not_restored(exc: QubesFormatBackup, args: argparse.Namespace) -> NotRestored:
    """The one line for a Qubes-format backup that is not restored: the exact command that restores it."""
    command = qubes_command(args)
    return NotRestored(f"{format_line(exc)}, not restored: restore it with Qubes' own tool: {shlex.join(command)}"
                       f"; or run this command again with {OPTION}", command)  # fmt: skip


def run_qubes_restore(exc: QubesFormatBackup, args: argparse.Namespace) -> tuple[list[str], int]:
    """Run Qubes' own tool for the backup (``--use-qubes-restore``); its command line and exit code."""
    tool = qubes_restore_tool()
    if tool is None:
        command = qubes_command(args)
        raise NotRestored(f"{format_line(exc)}, and Qubes' own {command[0]} is not installed here (package "
                          "qubes-core-admin-client): restore it on a Qubes system with: "
                          f"{shlex.join(command)}", command)  # fmt: skip
    command = qubes_command(args, tool)
    print(f"qvm-backup-restore: {format_line(exc)}: running Qubes' own tool: {shlex.join(command)}",
          file=sys.stderr, flush=True)  # fmt: skip
    sys.stdout.flush()
    # --json: our stdout carries only our document; Qubes' tool talks on stderr (and the terminal).
    stdout = sys.stderr if args.json else None
    try:
        child = subprocess.Popen(command, stdout=stdout, env={**os.environ, ENV_HANDED_OVER: "1"})
    except OSError as e:
        raise NotRestored(f"{format_line(exc)}, and Qubes' own {tool} does not start: {e.strerror or e}",
                          command) from None  # fmt: skip
    # Ctrl-C reaches Qubes' tool from the terminal: we wait for it to end; a SIGTERM to us is passed on.
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    try:
        rc = child.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    return command, (128 - rc if rc < 0 else rc)


def handed_over_document(command_name: str, exc: QubesFormatBackup, command: list[str], rc: int) -> dict[str, Any]:
    return {"version": 1, "command": command_name, "ok": rc == 0, "tool": TOOL_QUBES, "tool_command": command,
            "tool_exit_code": rc, "backup": {"format": TOOL_QUBES, "format_version": exc.version,
                                             "authenticated": False}}  # fmt: skip
