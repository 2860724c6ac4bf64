"""qvm-backup-restore: restore VMs from a backup, verifying every byte before it is used.

Also ``--list`` (what one backup holds: authenticated, needs the passphrase), ``--list-backups`` (which
backups a directory holds: read from their headers, NOT authenticated) and ``--json`` (one JSON document on
stdout: docs/JSON.md).  Compatible with Qubes' own qvm-backup-restore (README: the option table).
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from collections.abc import Callable

from qubes_backup_dom0.cli import report, settings
from qubes_backup_dom0.cli.common import (
    ArgumentParser,
    check_text_arg,
    confirm,
    emit_json,
    human,
    raise_interrupt,
    run_cli,
    table,
    warn,
)
from qubes_backup_dom0.cli.listing import list_backups
from qubes_backup_dom0.cli.passphrase import read_passphrase
from qubes_backup_dom0.cli.progress import Progress
from qubes_backup_dom0.cli.qubes_tools import run_qubes_restore
from qubes_backup_dom0.errors import BackupError, UsageError
from qubes_backup_dom0.format.header import QubesFormatBackup
from qubes_backup_dom0.format.naming import name_time_mismatch
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import stall_timeout
from qubes_backup_dom0.restore.machine import Restore, RestoreOptions, RestorePlan
from qubes_backup_dom0.restore.plan import home_user

# Qubes' options that do not apply here: the reason is the error a user sees.
UNSUPPORTED = {
    "compression_filter": "-Z/--compression-filter: the compression is the one the backup's authenticated "
    "header names; it cannot be overridden",
    "paranoid_mode": "--paranoid-mode/--plan-b is not needed and not supported: the backup's tar is parsed by "
    "the agent (in the backup VM, or confined for a dom0 file), dom0 parses nothing before its MAC verified",
    "location_is_service": "--location-is-service is not supported: give a command as LOCATION instead",
}


def parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="qvm-backup-restore",
        description="Restore VMs from a qubes-backup backup; every chunk is verified before it is decrypted. "
        "With -p the restore starts without asking, as Qubes' own tool does.",
    )
    p.add_argument("-d", "--dest-vm", "--from-vm", dest="source_vm", metavar="VM",
                   help="the backup VM holding the backup (default: LOCATION is a file in dom0)")  # fmt: skip
    p.add_argument("-p", "--passphrase-file", metavar="FILE",
                   help="read the passphrase from FILE ('-': stdin); then no confirmation is asked")  # fmt: skip
    p.add_argument("-x", "--exclude", metavar="VM", action="append", default=[], help="do not restore VM")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--verify-only", action="store_true", help="verify the backup, restore nothing")
    what.add_argument("--list", action="store_true",
                      help="show what the backup holds (id, time, VMs, sizes; -v: files)")  # fmt: skip
    what.add_argument("--list-backups", action="store_true",
                      help="LOCATION is a directory: show the backups in it with the id and time their headers "
                      "claim (NOT authenticated; no passphrase)")  # fmt: skip
    p.add_argument("--skip-broken", action="store_true", help="skip VMs whose template or netvm is missing")
    p.add_argument("--ignore-missing", action="store_true",
                   help="restore VMs with a missing template/netvm using the system default")  # fmt: skip
    p.add_argument("--skip-conflicting", action="store_true", help="skip VMs that already exist")
    p.add_argument("--rename-conflicting", action="store_true", help="restore existing VMs under a new name")
    p.add_argument("--skip-dom0-home", action="store_true", help="do not restore dom0's home directory")
    p.add_argument("--ignore-username-mismatch", action="store_true",
                   help="restore a dom0 home backed up from another user name (into a new directory)")  # fmt: skip
    p.add_argument("--backup-id", metavar="ID", type=backup_id_arg,
                   help="restore only the backup with this id (qvm-backup prints it); refuse any other")  # fmt: skip
    p.add_argument("--restore-devices", action="store_true",
                   help="also restore the backup's device assignments (PCI, USB, block; with their options) "
                   "without asking")  # fmt: skip
    p.add_argument("--restore-risky-settings", action="store_true",
                   help="also restore the backup's other settings that grant power (autostart, provides_network, "
                   "guivm, audiovm, kernelopts, virt_mode, GUI/qemu features, tags, wider firewall rules ...) "
                   "without asking; tags a qrexec policy trusts are never restored")  # fmt: skip
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print only errors and the result")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="also list every file of the backup")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout (docs/JSON.md)")
    p.add_argument("--ignore-size-limit", action="store_true",
                   help="accepted for Qubes' compatibility; no effect (sizes are the authenticated manifest's, "
                   "enforced exactly)")  # fmt: skip
    p.add_argument("--auto-close", action="store_true", help="accepted for Qubes' compatibility; no effect")
    p.add_argument("-Z", "--compression-filter", metavar="PROG", help=argparse.SUPPRESS)
    p.add_argument("--paranoid-mode", "--plan-b", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--location-is-service", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("location", metavar="LOCATION",
                   help="backup file (in the backup VM with -d) or command; --list-backups: a directory")  # fmt: skip
    p.add_argument("vms", metavar="VM", nargs="*", help="VMs to restore (default: all)")
    return p


def backup_id_arg(value: str) -> str:
    """``--backup-id``: 32 hex digits (case-insensitive), normalised to lowercase."""
    if re.fullmatch(r"[0-9a-fA-F]{32}", value) is None:
        raise argparse.ArgumentTypeError("a backup id is 32 hexadecimal digits, as qvm-backup printed it")
    return value.lower()


def summary(plan: RestorePlan, verbose: bool = False, actions: bool = True) -> str:
    h, m = plan.header, plan.manifest
    lines = [f"Backup {h.backup_id.hex()} made {h.created} ({h.compression}, {len(m.archives)} archive(s))"]
    heads = ["VM", "class", "template", "netvm", "size", "data"] + (["action"] if actions else [])
    rows = []
    for v in plan.vms:
        data = human(v.archive.data) if v.archive is not None else "-"
        rows.append([v.name, v.klass, v.template or "-", v.netvm or "-", human(v.size), data]
                    + ([v.action] if actions else []))  # fmt: skip
    home = next((a for a in m.archives if a.kind == "home"), None)
    if home is not None:
        action = f"restore to ~/{plan.home_target}" if plan.home is not None else "skip"
        rows.insert(0, [f"dom0 home ({home_user(m) or '?'})", "-", "-", "-", human(home.size), human(home.data)]
                    + ([action] if actions else []))  # fmt: skip
    lines.append(table(heads, rows))
    if verbose:
        for a in m.archives:
            who = "dom0 home" if a.kind == "home" else a.vm
            lines += [f"  {who}: {f.path} ({f.type}, {human(f.size)}, {human(f.data)} data)" for f in a.files]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args_list = sys.argv[1:] if argv is None else argv
    if "--json" in args_list:
        p.json_command = "restore"
    args = p.parse_intermixed_args(args_list)
    command = report.restore_command(args.verify_only, args.list, args.list_backups)
    return run_cli(lambda: _run_or_hand_over(args, args_list), args.debug, command if args.json else None)


def _run_or_hand_over(args: argparse.Namespace, argv: list[str]) -> int:
    """A backup in Qubes OS' own format goes to Qubes' own qvm-backup-restore (qubes_tools.py)."""
    try:
        return _run(args)
    except QubesFormatBackup as exc:
        if args.json or args.list:
            raise
        return run_qubes_restore(exc, argv)


def _check_args(args: argparse.Namespace) -> None:
    check_text_arg(args.location, "LOCATION")
    for option, reason in UNSUPPORTED.items():
        if getattr(args, option):
            raise UsageError(reason)
    if args.source_vm is not None:
        check_text_arg(args.source_vm, "the backup VM name")
    stall_timeout()  # a bad QUBES_BACKUP_TIMEOUT is a usage error before anything is asked


def check_source_vm(system: System, vm: str | None) -> str | None:
    """The backup VM exists (asked of qubesd) before anything else happens; ``-d dom0`` means a dom0 file,
    as in Qubes."""
    if vm is None or vm == "dom0":
        return None
    if vm not in Qubes(system).vm_list():
        raise UsageError(f"no such VM: {vm} (the backup VM given with -d)")
    return vm


def _run(args: argparse.Namespace) -> int:
    _check_args(args)
    system = System.from_env()
    source_vm = check_source_vm(system, args.source_vm)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    if args.list_backups:
        return _list_backups(system, args, source_vm)
    options = RestoreOptions(
        vms=tuple(args.vms), exclude=tuple(args.exclude), verify_only=args.verify_only or args.list,
        skip_broken=args.skip_broken, ignore_missing=args.ignore_missing,
        skip_conflicting=args.skip_conflicting, rename_conflicting=args.rename_conflicting,
        skip_dom0_home=args.skip_dom0_home, ignore_username_mismatch=args.ignore_username_mismatch,
        backup_id=args.backup_id, restore_devices=args.restore_devices,
        restore_risky_settings=args.restore_risky_settings,
    )  # fmt: skip
    signal.signal(signal.SIGTERM, raise_interrupt)
    job = Restore(system, args.location, b"", source_vm=source_vm, options=options)
    try:
        # Everything that can be found out without the passphrase first: the VM (above), the location, the
        # agent, whether it is a backup at all (its header, still unauthenticated).
        job.connect()
        job.passphrase = read_passphrase(args.passphrase_file, confirm=False, system_path=system.dom0_path)
        job.open()
        if not job.confined:
            log("note: the process reading the backup runs unconfined (bubblewrap not found or QUBES_SIM_SANDBOX=0)")
        plan = job.plan()
        if args.list:
            return _show_list(args, plan)
        return _restore(args, system, job, plan, log)
    finally:
        job.close()


def _show_list(args: argparse.Namespace, plan: RestorePlan) -> int:
    mismatch = name_time_mismatch(args.location, plan.header.created)
    if args.json:
        emit_json(report.list_document(plan, mismatch))
        return 0
    if mismatch is not None:
        warn(mismatch)
    print(summary(plan, verbose=args.verbose, actions=False))
    return 0


Log = Callable[..., None]


def _restore(args: argparse.Namespace, system: System, job: Restore, plan: RestorePlan, log: Log) -> int:
    log(summary(plan, verbose=args.verbose))
    for line in [*settings.plan_lines(plan), *settings.leftover_lines(job.leftovers)]:
        log(line)
    mismatch = name_time_mismatch(args.location, plan.header.created)
    if mismatch is not None:  # shown even with -q: it may mean an older backup under a newer name
        warn(mismatch)
    if plan.errors:
        raise BackupError(plan.errors[0])
    if plan.home is not None and home_user(plan.manifest) not in (None, system.user):
        warn(f"the dom0 home is user {home_user(plan.manifest)}'s (this system's user is {system.user}); "
             "restoring it as asked (--ignore-username-mismatch)")  # fmt: skip
    verb = "verify" if args.verify_only else "restore"
    # As Qubes' own tool: a passphrase given with -p means "go ahead"; "no" is not a failure (exit 0).
    unattended = args.yes or args.passphrase_file is not None
    if not confirm(f"Do you want to {verb} the VMs above?", unattended):
        log("Restore cancelled.")
        if args.json:
            emit_json(report.cancelled_document(report.restore_command(args.verify_only, False, False)))
        return 0
    if not unattended:  # the user is at a terminal: settings that grant power are theirs to choose
        settings.ask(plan)
    dropped = settings.dropped_lines(plan)  # (none when verifying: nothing is restored)
    bar = Progress(plan.data, verb, enabled=None if not args.quiet else False)
    job.progress = bar
    start = time.monotonic()
    try:
        job.run()
    finally:
        bar.close()
    elapsed = max(time.monotonic() - start, 1e-9)
    for line in job.cleaned:
        log(line)
    # One line per setting not restored, even with -q (the restored VMs differ from the backup's); after the
    # restore, as its account: a failed restore is one error line and nothing else.
    for warning in dropped + job.warnings:
        warn(warning)
    if args.json:
        emit_json(report.restore_document(job, plan, elapsed, mismatch, dropped))
        return 0
    rate = f"{human(plan.data)} in {elapsed:.1f} s ({human(int(plan.data / elapsed))}/s)"
    which = f"backup {plan.header.backup_id.hex()}, created {plan.header.created}"
    if args.verify_only:
        print(f"Backup verified ({which}): {report.what(plan.wanted)}, {rate}; nothing was written")
    else:
        done = report.restored_text(job)
        print(f"Restored {done} from {which}; {rate}")
        if job.home_restored_to is not None:
            print(f"dom0 home restored to {report.home_shown(system, job)}")
    return 0


def _list_backups(system: System, args: argparse.Namespace, source_vm: str | None) -> int:
    found = list_backups(system, args.location, source_vm)
    where = f"{source_vm}:{args.location}" if source_vm else args.location
    if args.json:
        emit_json(report.backups_document(where, found))
        return 0
    print(f"Backups in {where}: {len(found)} (ids and times as their headers claim them: NOT authenticated; "
          "--list or --verify-only of one backup verifies it)")  # fmt: skip
    rows = []
    for f in found:
        note = f.problem or ("name and time disagree" if f.name_mismatch else "")
        rows.append([f.name, f.backup_id or "-", f.created or "-", f.compression or "-", note])
    print(table(["file", "backup id (unverified)", "created (unverified)", "compression", "note"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
