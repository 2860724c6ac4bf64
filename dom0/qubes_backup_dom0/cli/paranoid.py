"""``qvm-backup-restore --paranoid-mode`` (``--plan-b``): the command-line side of restore/paranoid.py.

The same dialogue as a normal restore (the plan table, the question, the progress bar, the result line,
``--json``), for a backup made on a machine that may have been compromised: it is parsed in a DisposableVM
and dom0 takes only the plan's names, classes, labels, templates, allow-listed settings and volume data.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from qubes_backup_dom0.cli import report, settings
from qubes_backup_dom0.cli.common import confirm, emit_json, human, table, warn
from qubes_backup_dom0.cli.passphrase import read_passphrase
from qubes_backup_dom0.cli.progress import run_with_progress
from qubes_backup_dom0.errors import BackupError, UsageError
from qubes_backup_dom0.format.naming import name_time_mismatch
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.restore.paranoid import ParanoidRestore
from qubes_backup_dom0.restore.paranoid_plan import NOT_RESTORED, ParanoidPlan
from qubes_backup_dom0.restore.plan import RestoreOptions

Log = Callable[..., None]


def summary(plan: ParanoidPlan, disposable: str, actions: bool = True) -> str:
    info = plan.info
    lines = [f"Backup {info.backup_id.hex()} made {info.created} ({info.compression}, {len(plan.vms)} VM(s)), "
             f"verified and parsed in {disposable} (paranoid mode)"]  # fmt: skip
    heads = ["VM", "class", "label", "template", "netvm", "size", "data"] + (["action"] if actions else [])
    rows = []
    for a in plan.vms:
        template = a.template or ("(default)" if a.vm.klass in ("AppVM", "DispVM") else "-")
        rows.append([a.name, a.vm.klass, a.label, template if a.restore else (a.vm.template or "-"), a.netvm,
                     human(a.size), human(a.data)] + ([a.action] if actions else []))  # fmt: skip
    if info.home_size:
        rows.insert(0, ["dom0 home", "-", "-", "-", "-", human(info.home_size), "-"]
                    + (["skip: never restored in paranoid mode"] if actions else []))  # fmt: skip
    lines.append(table(heads, rows))
    lines.append(f"Not restored in paranoid mode: {', '.join(NOT_RESTORED)}.")
    return "\n".join(lines)


def _vms(plan: ParanoidPlan, listing: bool) -> list[dict[str, Any]]:
    out = []
    for a in plan.vms:
        vm = a.vm
        entry: dict[str, Any] = {
            "name": vm.name, "class": vm.klass, "label": a.label, "template": a.template or vm.template,
            "netvm": None if vm.netvm_none else "(default)",
            "default_dispvm": None if vm.default_dispvm_none else "(default)",
            "properties": {p: vm.property_text(p) for p in vm.properties}, "features": dict(vm.features),
            "volumes": [{"name": v.name, "size": v.size, "data": v.data} for v in vm.volumes],
            "size": a.size, "data": a.data,
        }  # fmt: skip
        if not listing:
            entry |= {"restore": a.restore, "new_name": a.new_name, "action": a.action}
        out.append(entry)
    return out


def document(command: str, job: ParanoidRestore, plan: ParanoidPlan, extra: dict[str, Any]) -> dict[str, Any]:
    """The --json document of a paranoid list, verify or restore (docs/JSON.md, "paranoid mode")."""
    info = plan.info
    disposable = job.disposable.created if job.disposable is not None else None
    return {"version": report.JSON_VERSION, "command": command, "ok": True, "tool": "qubes-backup", "paranoid": True,
            "disposable_vm": disposable,
            "backup": {"id": info.backup_id.hex(), "created": info.created, "compression": info.compression,
                       "chunk_size": info.chunk_size, "archives": len(plan.vms) + (1 if info.home_size else 0),
                       "authenticated": True},
            "vms": _vms(plan, command == "list"),
            "dom0_home": {"size": info.home_size, "restore": False} if info.home_size else None,
            "not_restored": list(NOT_RESTORED), **extra}  # fmt: skip


def run(args: argparse.Namespace, system: System, source_vm: str | None, options: RestoreOptions, log: Log) -> int:
    for option in ("restore_devices", "restore_risky_settings", "use_qubes_restore"):
        if getattr(args, option, False):
            flag = "--" + option.replace("_", "-")
            raise UsageError(f"{flag} does not go with --paranoid-mode, which never restores devices or settings "
                             "that grant power and parses the backup in a DisposableVM")  # fmt: skip
    command = report.restore_command(args.verify_only, args.list, False)
    job = ParanoidRestore(system, args.location, b"", source_vm=source_vm, options=options)
    try:
        job.connect()  # the agent and the DisposableVM start while the passphrase is typed
        assert job.disposable is not None
        disposable = job.disposable.label
        log(f"paranoid mode: the backup is verified and parsed in {disposable} (no network), not in dom0")
        job.passphrase = read_passphrase(args.passphrase_file, confirm=False, system_path=system.dom0_path)
        job.open()
        if not job.confined:
            log("note: the process reading the backup runs unconfined (bubblewrap not found or QUBES_SIM_SANDBOX=0)")
        plan = job.plan()
        assert job.info is not None
        mismatch = name_time_mismatch(args.location, job.info.created)
        if args.list:
            if args.json:
                emit_json(document(command, job, plan, {"warnings": [mismatch] if mismatch else []}))
            else:
                if mismatch is not None:
                    warn(mismatch)
                print(summary(plan, disposable, actions=False))
            return 0
        log(summary(plan, disposable))
        for line in settings.leftover_lines(job.leftovers):
            log(line)
        if mismatch is not None:
            warn(mismatch)
        if plan.errors:
            raise BackupError(plan.errors[0])
        verb = "verify" if args.verify_only else "restore"
        if not confirm(f"Do you want to {verb} the VMs above?", args.yes or args.passphrase_file is not None):
            log("Restore cancelled.")
            if args.json:
                emit_json(report.cancelled_document(command))
            return 0
        elapsed = run_with_progress(job, plan.data, verb, args.quiet, log)
        for warning in job.warnings:
            warn(warning)
        which = f"backup {plan.info.backup_id.hex()}, created {plan.info.created}"
        rate = f"{human(plan.data)} in {elapsed:.1f} s ({human(int(plan.data / elapsed))}/s)"
        if args.json:
            warnings = ([mismatch] if mismatch else []) + list(job.warnings)
            emit_json(document(command, job, plan, {"restored": list(job.restored), "data": plan.data,
                                                    "elapsed_seconds": round(elapsed, 3), "warnings": warnings,
                                                    "cleaned": list(job.cleaned)}))
        elif args.verify_only:
            print(f"Backup verified in {disposable} ({which}): {len(plan.wanted)} VM(s), {rate}; nothing was written")
        else:
            print(f"Restored {', '.join(job.restored) or 'no VM'} from {which} in paranoid mode; {rate}")
        return 0
    finally:
        job.close()
