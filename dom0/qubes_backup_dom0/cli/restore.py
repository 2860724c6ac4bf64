"""qvm-backup-restore: restore VMs from a backup, verifying every byte before it is used.

Also ``--list`` (what one backup holds: authenticated, needs the passphrase), ``--list-backups`` (which
backups a directory holds: read from their headers, NOT authenticated) and ``--json`` (one JSON document on
stdout: docs/JSON.md).  Compatible with Qubes' own qvm-backup-restore (README: the option table).
"""

from __future__ import annotations

import argparse
import re
import shlex
import signal
import sys
from collections.abc import Callable

from qubes_backup_protocol import names

from qubes_backup_dom0.cli import paranoid, qubes_tools, report, settings
from qubes_backup_dom0.cli import repo as repo_cli
from qubes_backup_dom0.cli.common import (
    ArgumentParser,
    add_version,
    check_text_arg,
    confirm,
    emit_json,
    error_document,
    guard_output,
    human,
    prog,
    raise_interrupt,
    reuse_freed_memory,
    run_cli,
    table,
    warn,
)
from qubes_backup_dom0.cli.listing import Listed, list_backups, newest
from qubes_backup_dom0.cli.passphrase import read_passphrase
from qubes_backup_dom0.cli.progress import run_with_progress
from qubes_backup_dom0.errors import BackupError, UsageError
from qubes_backup_dom0.format.header import QubesFormatBackup
from qubes_backup_dom0.format.naming import name_time_mismatch
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import stall_timeout
from qubes_backup_dom0.restore.machine import Restore, RestoreOptions, RestorePlan
from qubes_backup_dom0.restore.plan import home_user
from qubes_backup_dom0.text import printable

# Qubes' options that do not apply here: the reason is the error a user sees.
UNSUPPORTED = {
    "compression_filter": "-Z/--compression-filter: the compression is the one the backup's authenticated "
    "header names; it cannot be overridden",
    "location_is_service": "--location-is-service is not supported: give a command as LOCATION instead",
}


def parser(repo: bool = False) -> ArgumentParser:
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
    p.add_argument("--latest", action="store_true",
                   help="LOCATION is a directory: use its newest backup (by the time its header claims; verified "
                   "as it is read)")  # fmt: skip
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
    p.add_argument(qubes_tools.OPTION, action="store_true",
                   help="a backup in Qubes OS' own format: run Qubes' own qvm-backup-restore for it (it asks for the "
                   "passphrase and for confirmation itself: -p and -y are not passed on); without this option "
                   f"such a backup is only named, with the command that restores it (exit code "
                   f"{qubes_tools.EXIT_QUBES_FORMAT})")  # fmt: skip
    p.add_argument("--ignore-size-limit", action="store_true",
                   help="accepted for Qubes' compatibility; no effect (sizes are the authenticated manifest's, "
                   "enforced exactly)")  # fmt: skip
    p.add_argument("--auto-close", action="store_true", help="accepted for Qubes' compatibility; no effect")
    p.add_argument("-Z", "--compression-filter", metavar="PROG", help=argparse.SUPPRESS)
    p.add_argument("--paranoid-mode", "--plan-b", action="store_true",
                   help="for a backup made on a compromised machine: verify and parse it in a DisposableVM; "
                   "restore only names, classes, labels, templates, allow-listed settings and volume data "
                   "(no dom0 home, devices, tags, firewall)")  # fmt: skip
    p.add_argument("--location-is-service", action="store_true", help=argparse.SUPPRESS)
    repo_cli.add_restore_options(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    add_version(p)
    p.add_argument("location", metavar="LOCATION", nargs="?" if repo else None,
                   help="backup file (in the backup VM with -d), s3://BUCKET/KEY, ssh://[USER@]HOST[:PORT]/FILE or "
                   "a command; a directory: its backups are listed (--latest: its newest is used)")  # fmt: skip
    p.add_argument("vms", metavar="VM", nargs="*", help="VMs to restore (default: all)")
    return p


def backup_id_arg(value: str) -> str:
    """``--backup-id``: 32 hex digits (case-insensitive), normalised to lowercase."""
    if re.fullmatch(r"[0-9a-fA-F]{32}", value) is None:
        raise argparse.ArgumentTypeError("a backup id is 32 hexadecimal digits, as qvm-backup printed it")
    return value.lower()


DEFAULT_LEGEND = ("(NAME): not set on the VM, it uses the default: NAME where it was backed up; restored, it "
                  "follows this system's default")  # fmt: skip


def summary(plan: RestorePlan, verbose: bool = False, actions: bool = True) -> str:
    h, m = plan.header, plan.manifest
    lines = [f"Backup {h.backup_id.hex()} made {h.created} ({h.compression}, {len(m.archives)} archive(s))"]
    heads = ["VM", "class", "template", "netvm", "size", "data"] + (["action"] if actions else [])
    rows = []
    # --list (no actions) shows what was asked for (VM arguments, -x): the other rows would all say "skip"
    for v in (v for v in plan.vms if actions or v.restore):
        data = human(v.archive.data) if v.archive is not None else "-"
        rows.append([v.name, v.klass, v.template or "-", v.netvm or "-", human(v.size), data]
                    + ([v.action] if actions else []))  # fmt: skip
    home = next((a for a in m.archives if a.kind == "home"), None)
    if home is not None and (actions or plan.home is not None):
        action = "skip" if plan.home is None else "verify" if plan.verify_only else f"restore to ~/{plan.home_target}"
        rows.insert(0, [f"dom0 home ({home_user(m) or '?'})", "-", "-", "-", human(home.size), human(home.data)]
                    + ([action] if actions else []))  # fmt: skip
    lines.append(table(heads, rows))
    if any(r[2].startswith("(") or r[3].startswith("(") for r in rows):
        lines.append(DEFAULT_LEGEND)
    if verbose:
        for a in (m.archives if actions else plan.wanted):
            who = "dom0 home" if a.kind == "home" else a.vm
            lines += [f"  {who}: {f.path} ({f.type}, {human(f.size)}, {human(f.data)} data)" for f in a.files]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    guard_output()
    reuse_freed_memory()
    args_list = sys.argv[1:] if argv is None else argv
    p = parser(repo=any(a in ("--repo", "--profile") or a.startswith(("--repo=", "--profile=")) for a in args_list))
    if "--json" in args_list:
        p.json_command = "restore"
    args = p.parse_intermixed_args(args_list)
    command = report.restore_command(args.verify_only, args.list, args.list_backups)
    if getattr(args, "list_snapshots", False):
        command = "list-snapshots"
    return run_cli(lambda: _run_or_qubes_format(args), args.debug, command if args.json else None)


def _run_or_qubes_format(args: argparse.Namespace) -> int:
    """A backup in Qubes OS' own format (told by its unauthenticated header) is never restored by a switch to
    another tool: it is named with the command that restores it, and that runs only with --use-qubes-restore
    (cli/qubes_tools.py)."""
    try:
        return _run(args)
    except QubesFormatBackup as exc:
        return _qubes_format(args, exc)


def _qubes_format(args: argparse.Namespace, exc: QubesFormatBackup) -> int:
    command_name = report.restore_command(args.verify_only, args.list, args.list_backups)
    try:
        if not args.use_qubes_restore:
            raise qubes_tools.not_restored(exc, args)
        command, rc = qubes_tools.run_qubes_restore(exc, args)
    except qubes_tools.NotRestored as err:
        if not args.json:
            raise
        print(f"{prog()}: error: {printable(str(err))}", file=sys.stderr)
        emit_json(error_document(command_name, printable(str(err)), err.exit_code)
                  | {"tool": None, "qubes_restore_command": err.command})  # fmt: skip
        return err.exit_code
    if args.json:
        emit_json(qubes_tools.handed_over_document(command_name, exc, command, rc))
    else:
        print(f"Qubes OS' own {command[0]} ran for this backup in Qubes' format (not qubes-backup): exit code {rc}")
    return rc


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
    if args.repo is not None or getattr(args, "profile", None) is not None:  # a repository (cli/repo.py)
        return repo_cli.run_restore(args, summary)
    repo_cli.refuse_without_repo(args)
    _check_args(args)
    system = System.from_env()
    source_vm = check_source_vm(system, args.source_vm)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    if args.list_backups:
        return _list_backups(system, args, source_vm)
    args.location = _backup_in_directory(system, args, source_vm, log)
    options = RestoreOptions(
        vms=tuple(args.vms), exclude=tuple(args.exclude), verify_only=args.verify_only or args.list,
        skip_broken=args.skip_broken, ignore_missing=args.ignore_missing,
        skip_conflicting=args.skip_conflicting, rename_conflicting=args.rename_conflicting,
        skip_dom0_home=args.skip_dom0_home, ignore_username_mismatch=args.ignore_username_mismatch,
        backup_id=args.backup_id, restore_devices=args.restore_devices,
        restore_risky_settings=args.restore_risky_settings,
    )  # fmt: skip
    signal.signal(signal.SIGTERM, raise_interrupt)
    if args.paranoid_mode:  # the backup is parsed in a DisposableVM (cli/paranoid.py)
        return paranoid.run(args, system, source_vm, options, log)
    job = Restore(system, args.location, b"", source_vm=source_vm, options=options)
    try:
        # Everything that can be found out without the passphrase first: the VM (above), the location, the
        # agent, whether it is a backup at all (its header, still unauthenticated).
        if not (args.verify_only or args.list or list(args.vms) == ["dom0"]):
            # VMs' volumes are written through admin.vm.volume.ImportWithSize (Qubes' dom0 service): root
            system.check_root("restoring VMs (writing their volumes) needs root", system.rpc_dir_override)
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
    elapsed = run_with_progress(job, plan.data, verb, args.quiet, log)
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
    print(backups_table(where, found))
    return 0


def backups_table(where: str, found: list[Listed]) -> str:
    """The backups of a directory, newest first, as their headers claim them."""
    rows = []
    for f in reversed(found):
        note = f.problem or ("name and time disagree" if f.name_mismatch else "")
        size = human(f.size) if f.size is not None else "-"
        rows.append([f.name, f.backup_id or "-", f.created or "-", size, f.compression or "-", note])
    heads = ["file", "backup id (unverified)", "created (unverified)", "size", "compression", "note"]
    return (f"Backups in {where}: {len(found)}, newest first (ids and times as their headers claim them: NOT "
            f"authenticated; --list or --verify-only of one backup verifies it)\n{table(heads, rows)}")  # fmt: skip


def _may_be_directory(system: System, location: str, source_vm: str | None) -> bool:
    if source_vm is None:
        return system.dom0_path(location).is_dir()
    return _is_path(location) and not names.is_backup_file_name(location.rstrip("/").rsplit("/", 1)[-1])


def _is_path(location: str) -> bool:
    """One word that is not a URL: a path in the backup VM (a command or s3://, ssh:// is no directory)."""
    try:
        return len(shlex.split(location)) == 1 and "://" not in location
    except ValueError:
        return False


def _backup_in_directory(system: System, args: argparse.Namespace, source_vm: str | None, log: Log) -> str:
    """LOCATION as a directory: with --latest its newest backup; without, what it holds is shown and the user is
    asked to choose (a usage error).  A location that is no directory is returned as it is."""
    where = f"{source_vm}:{args.location}" if source_vm else args.location
    if not args.latest:
        if not _may_be_directory(system, args.location, source_vm):
            return str(args.location)
        try:
            found = list_backups(system, args.location, source_vm)
        except BackupError:  # a file, or nothing: the restore says which
            return str(args.location)
        if not args.json:
            print(backups_table(where, found))
        raise UsageError(f"{where} is a directory: give one of the {len(found)} backups it holds as LOCATION, or "
                         "add --latest to use the newest")  # fmt: skip
    if (source_vm is None and not system.dom0_path(args.location).is_dir()) or \
            (source_vm is not None and not _is_path(args.location)):  # fmt: skip
        raise UsageError(f"--latest needs a directory as LOCATION: {args.location}")
    chosen = newest(list_backups(system, args.location, source_vm))
    if chosen is None:
        raise BackupError(f"no backup in {where} (qvm-backup-restore --list-backups shows what it holds)")
    log(f"Newest backup in {where}: {chosen.name} (backup id {chosen.backup_id}, created {chosen.created}, as "
        "its header claims: verified as it is read)")  # fmt: skip
    return f"{str(args.location).rstrip('/')}/{chosen.name}"


if __name__ == "__main__":
    sys.exit(main())
