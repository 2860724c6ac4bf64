"""Running dom0's ``lvm`` command (QUBES_LVM in the simulation): one bounded call, one clear error."""

from __future__ import annotations

import os
import subprocess

from qubes_backup_protocol.frames import safe_text

from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.qubes.system import System

LVM_TIMEOUT = 300.0


def run_lvm(system: System, args: list[str], what: str) -> str:
    """Run ``QUBES_LVM ARGS``; stdout on success (warnings on stderr are fine), one clear error otherwise."""
    argv = system.lvm_argv + args
    env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=LVM_TIMEOUT)
    except OSError as exc:
        raise BackupError(f"{what}: cannot run {argv[0]}: {exc.strerror or exc}") from None
    except subprocess.TimeoutExpired:
        raise BackupError(f"{what}: {argv[0]} {args[0]} did not finish in {LVM_TIMEOUT:g} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
        reason = safe_text(lines[-1].strip()) if lines else f"exit status {proc.returncode}"
        raise BackupError(f"{what}: lvm {args[0]} failed: {reason}")
    return proc.stdout.decode("utf-8", "replace")
