"""The Python API: what a GUI (or a script) calls instead of the command lines.

The passphrase is an argument, progress comes through a callback ``(done_bytes, total_bytes)``, and both
operations can be cancelled from another thread (``threading.Event`` for a backup, ``Restore.cancel()``
for a restore).  A failed or cancelled operation raises a :class:`~.errors.BackupError` and leaves nothing
that looks like a complete backup, and dom0 as it was.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qubes_backup_dom0.backup.pipeline import write_backup
from qubes_backup_dom0.backup.plan import BackupOptions, BackupPlan, ProgressCallback, plan_backup
from qubes_backup_dom0.backup.targets import AgentTarget, LocalTarget, backup_file_name, backup_instant, check_location
from qubes_backup_dom0.errors import BackupError, Cancelled, UsageError, VerificationError
from qubes_backup_dom0.format.header import Header, format_created
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import Transport, make_transport

if TYPE_CHECKING:
    from qubes_backup_dom0.restore.machine import Restore, RestoreOptions, RestorePlan, State
    from qubes_backup_dom0.restore.paranoid import ParanoidRestore

_RESTORE_NAMES = ("Restore", "RestoreOptions", "RestorePlan", "State")


def __getattr__(name: str) -> object:
    """The restore side is imported on first use: a backup's start-up does not pay for it (~25 ms)."""
    if name in _RESTORE_NAMES:
        from qubes_backup_dom0.restore import machine as restore

        return getattr(restore, name)
    if name == "ParanoidRestore":  # a backup from a compromised machine, parsed in a DisposableVM
        from qubes_backup_dom0.restore.paranoid import ParanoidRestore

        return ParanoidRestore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "BackupError", "BackupOptions", "BackupPlan", "BackupResult", "Cancelled", "ParanoidRestore", "Restore",
    "RestoreOptions", "RestorePlan", "State", "System", "UsageError", "VerificationError", "plan_backup", "run_backup",
]  # fmt: skip


@dataclass(frozen=True)
class BackupResult:
    """What a finished backup is: dom0's own account (never the backup VM's words)."""

    location: str  # where the backup is, as the user would name it (``vm:/path/name`` or a dom0 path)
    header: Header
    plan: BackupPlan
    size: int = 0  # bytes of the backup stream dom0 wrote
    warnings: list[str] = field(default_factory=list)  # e.g. a backup_timestamp that could not be recorded

    @property
    def backup_id(self) -> str:
        """The backup's id (32 hex digits): pin it at restore time (``--backup-id``) to refuse any other."""
        return self.header.backup_id.hex()

    @property
    def created(self) -> str:
        """The authenticated creation time, ``YYYY-MM-DDTHH:MM:SSZ`` (UTC); the file name carries the same."""
        return self.header.created


def run_backup(
    system: System,
    location: str,
    passphrase: bytes,
    *,
    plan: BackupPlan | None = None,
    vms: Iterable[str] = (),
    exclude: Iterable[str] = (),
    dest_vm: str | None = None,
    options: BackupOptions = BackupOptions(),  # noqa: B008 - frozen dataclass
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    transport: Transport | None = None,
) -> BackupResult:
    """Back up ``plan`` (or the VMs selected by ``vms``/``exclude``) to LOCATION, in ``dest_vm`` or dom0."""
    if not passphrase:
        raise UsageError("the passphrase is empty")
    check_location(location)
    plan = plan or plan_backup(system, vms, exclude)
    try:
        return _run_planned(system, location, passphrase, plan, dest_vm, options, progress, cancel, transport)
    finally:
        plan.close()  # the volumes held since planning (snapshots) are released whatever happened


def _run_planned(
    system: System,
    location: str,
    passphrase: bytes,
    plan: BackupPlan,
    dest_vm: str | None,
    options: BackupOptions,
    progress: ProgressCallback | None,
    cancel: threading.Event | None,
    transport: Transport | None,
) -> BackupResult:
    # One instant for the file name and the authenticated creation time: a restore can then tell when a
    # file's name does not belong to the backup inside it (naming.name_time_mismatch).
    now = backup_instant(system)
    name = backup_file_name(now)
    target: LocalTarget | AgentTarget
    if dest_vm:
        target = AgentTarget(transport or make_transport(system), dest_vm, location, name)
    else:
        target = LocalTarget(system, location, name)
    started = int(time.time())
    try:
        header = write_backup(plan, passphrase, target, options, progress=progress, cancel=cancel,
                              created=format_created(now))  # fmt: skip
        where = target.commit()
    except BaseException:
        target.abort()
        raise
    return BackupResult(where, header, plan, target.sent, plan.record_backup_timestamps(started))
