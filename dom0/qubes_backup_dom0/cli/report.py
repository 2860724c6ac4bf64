"""What the commands report: the JSON documents of ``--json`` (schema: docs/JSON.md) and shared summary text.

Every document has ``command`` and ``ok``; a failure is ``{"command", "ok": false, "error", "exit_code"}``
(cli_common.error_document).  Sizes are integers in bytes; times are the backup's ``YYYY-MM-DDTHH:MM:SSZ``.
Strings from a backup are JSON strings (control characters escaped by the encoder), never interpreted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from qubes_backup_dom0.format import manifest as manifest_mod

if TYPE_CHECKING:  # qvm-backup imports this module: it must not pay for the restore side's imports
    from qubes_backup_dom0.cli.listing import Listed
    from qubes_backup_dom0.qubes.system import System
    from qubes_backup_dom0.restore.machine import Restore, RestorePlan

JSON_VERSION = 1


def restore_command(verify_only: bool, listing: bool, list_backups: bool) -> str:
    if list_backups:
        return "list-backups"
    if listing:
        return "list"
    return "verify" if verify_only else "restore"


def what(archives: Sequence[manifest_mod.ArchiveEntry]) -> str:
    """``3 VMs and dom0 home`` / ``1 VM`` / ``dom0 home``: dom0's home is not counted as a VM."""
    vms = sum(1 for a in archives if a.kind == "vm")
    home = any(a.kind == "home" for a in archives)
    parts = [f"{vms} VM" + ("" if vms == 1 else "s")] if vms or not home else []
    if home:
        parts.append("dom0 home")
    return " and ".join(parts)


def restored_text(job: Restore) -> str:
    names = ", ".join(job.restored)
    if job.home_restored_to is not None:
        return f"{names} and dom0 home" if names else "dom0 home"
    return names or "no VM"


def home_shown(system: System, job: Restore) -> str:
    """Where dom0's home was restored, as a path inside dom0 (in simulation: not the host path)."""
    assert job.home_restored_to is not None
    return str("/" / job.home_restored_to.relative_to(system.dom0_root))


def _backup(plan: RestorePlan) -> dict[str, Any]:
    h = plan.header
    return {"id": h.backup_id.hex(), "created": h.created, "compression": h.compression,
            "chunk_size": h.chunk_size, "archives": len(plan.manifest.archives), "authenticated": True}  # fmt: skip


def _files(archive: manifest_mod.ArchiveEntry) -> list[dict[str, Any]]:
    return [{"path": f.path, "type": f.type, "size": f.size, "data": f.data} for f in archive.files]


def _vms(plan: RestorePlan, files: bool) -> list[dict[str, Any]]:
    """Each VM of the backup; for a restore or verify also what happens to it (``files``: a listing)."""
    out = []
    for v in plan.vms:
        entry: dict[str, Any] = {
            "name": v.name, "class": v.klass, "template": v.template, "netvm": v.netvm, "size": v.size,
            "data": v.archive.data if v.archive is not None else 0,
        }  # fmt: skip
        if not files:
            entry |= {"restore": v.restore, "new_name": v.new_name, "action": v.action}
            if v.restore:
                from qubes_backup_dom0.cli import settings

                entry["settings"] = settings.to_json(plan, v.name)
        if files and v.archive is not None:
            entry["files"] = _files(v.archive)
        out.append(entry)
    return out


def _home(plan: RestorePlan, files: bool) -> dict[str, Any] | None:
    home = next((a for a in plan.manifest.archives if a.kind == "home"), None)
    if home is None:
        return None
    from qubes_backup_dom0.restore.plan import home_user

    entry: dict[str, Any] = {"user": home_user(plan.manifest), "size": home.size, "data": home.data}
    if files:
        entry["files"] = _files(home)
    else:
        entry["restore"] = plan.home is not None
    return entry


def list_document(plan: RestorePlan, name_mismatch: str | None) -> dict[str, Any]:
    return {"version": JSON_VERSION, "command": "list", "ok": True, "backup": _backup(plan),
            "vms": _vms(plan, files=True), "dom0_home": _home(plan, files=True),
            "size": sum(a.size for a in plan.manifest.archives), "data": sum(a.data for a in plan.manifest.archives),
            "warnings": [name_mismatch] if name_mismatch else []}  # fmt: skip


def restore_document(job: Restore, plan: RestorePlan, elapsed: float, name_mismatch: str | None,
                     dropped: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    from qubes_backup_dom0.cli import settings

    verify = job.options.verify_only
    home = _home(plan, files=False)
    if home is not None and job.home_restored_to is not None:
        home["restored_to"] = home_shown(job.system, job)
    warnings = ([name_mismatch] if name_mismatch else []) + list(dropped) + list(job.warnings)
    not_restored = [s for s in settings.to_json(plan) if not s["restore"]]
    return {"version": JSON_VERSION, "command": "verify" if verify else "restore", "ok": True,
            "backup": _backup(plan), "vms": _vms(plan, files=False), "dom0_home": home,
            "restored": [] if verify else list(job.restored), "data": plan.data,
            "elapsed_seconds": round(elapsed, 3), "warnings": warnings, "dropped": not_restored,
            "cleaned": list(job.cleaned)}  # fmt: skip


def cancelled_document(command: str) -> dict[str, Any]:
    return {"version": JSON_VERSION, "command": command, "ok": True, "cancelled": True}


def backups_document(where: str, found: Sequence[Listed]) -> dict[str, Any]:
    return {"version": JSON_VERSION, "command": "list-backups", "ok": True, "location": where,
            "authenticated": False,
            "backups": [{"name": f.name, "id": f.backup_id, "created": f.created, "compression": f.compression,
                         "problem": f.problem, "name_time_mismatch": f.name_mismatch} for f in found]}  # fmt: skip


def backup_document(result: Any, elapsed: float, dest_vm: str | None, home_user_name: str) -> dict[str, Any]:
    """qvm-backup --json (``result``: api.BackupResult)."""
    plan = result.plan
    vms = [{"name": a.vm, "class": a.klass, "size": a.size, "data": a.data} for a in plan.archives
           if a.kind == "vm"]  # fmt: skip
    home = next(({"user": home_user_name, "size": a.size, "data": a.data} for a in plan.archives
                 if a.kind == "home"), None)  # fmt: skip
    return {"version": JSON_VERSION, "command": "backup", "ok": True, "location": result.location,
            "dest_vm": dest_vm, "backup": {"id": result.backup_id, "created": result.created,
                                           "compression": result.header.compression,
                                           "chunk_size": result.header.chunk_size},
            "vms": vms, "dom0_home": home, "size": plan.size, "data": plan.data, "sent": result.size,
            "elapsed_seconds": round(elapsed, 3), "warnings": list(result.warnings)}  # fmt: skip


