"""``--repo``: qvm-backup and qvm-backup-restore on a repository of snapshots (docs/REPOSITORY.md).

    qvm-backup -d VM --repo DIR [--forget VM] [VM...]        a snapshot (the first one creates the repository);
                                                             VMs of the previous one not named are carried
    qvm-backup -d VM --repo DIR --save-profile NAME [VM...]   the same, and a profile of it
    qvm-backup --profile NAME                                 the next snapshot, as the profile says
    qvm-backup-restore -d VM --repo DIR [--snapshot N] [VM...]  restore it (the newest by default)
    qvm-backup-restore -d VM --repo DIR --list-snapshots [--json]
    qvm-backup-restore -d VM --repo DIR --verify-only [--snapshot N | --all-snapshots]
    qvm-backup-restore --profile NAME ...                     -d, --repo and the passphrase from the profile

The options are added to the commands' parsers here and each command hands over to this module when
``--repo`` (or a repository's ``--profile``) is given; the restore semantics (plan table, conflicts, rename,
rollback) are the same as for a backup file.  ``--json`` prints the documents of docs/JSON.md.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, cast

from qubes_backup_dom0.backup.plan import BackupPlan, plan_backup
from qubes_backup_dom0.backup.repository import RepoBackup, RepoBackupResult, RepoOptions
from qubes_backup_dom0.backup.tracking import Tracking, release_all
from qubes_backup_dom0.cli import report, settings
from qubes_backup_dom0.cli.common import (
    ArgumentParser,
    check_text_arg,
    confirm,
    emit_json,
    human,
    prog,
    raise_interrupt,
    table,
    warn,
)
from qubes_backup_dom0.cli.passphrase import read_passphrase
from qubes_backup_dom0.cli.profile import (
    PLAINTEXT_WARNING,
    PROFILE_DIR,
    Profile,
    profile_passphrase,
    profile_path,
    repository_profile,
    resolve,
    save_profile,
)
from qubes_backup_dom0.cli.progress import Progress, run_with_progress
from qubes_backup_dom0.errors import BackupError, UsageError
from qubes_backup_dom0.format import repo
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import stall_timeout
from qubes_backup_dom0.restore.plan import RestoreOptions, RestorePlan
from qubes_backup_dom0.restore.repository import RepoRestore
from qubes_backup_dom0.restore.repoverify import AllSnapshots, SnapshotCheck

Log = Callable[..., None]


def root_id_arg(value: str) -> str:
    if re.fullmatch(r"[0-9a-fA-F]{64}", value) is None:
        raise argparse.ArgumentTypeError("a snapshot root id is 64 hexadecimal digits, as qvm-backup printed it")
    return value.lower()


def block_size_arg(value: str) -> int:
    m = re.fullmatch(r"([1-9][0-9]*)([KM]?)", value)
    size = int(m.group(1)) << {"": 0, "K": 10, "M": 20}[m.group(2)] if m else 0
    if not repo.BLOCK_MIN <= size <= repo.BLOCK_MAX or size & (size - 1):
        raise argparse.ArgumentTypeError("a power of two from 64K to 4M")
    return size


def add_common(p: ArgumentParser) -> None:
    p.add_argument("--repo", metavar="DIR|URL",
                   help="a repository of snapshots, reached through the backup VM (-d): a directory in it, "
                   "ssh://[USER@]HOST[:PORT]/DIR or s3://BUCKET/PREFIX; only what changed is stored")  # fmt: skip
    p.add_argument("--expect-root", metavar="ID", type=root_id_arg,
                   help="with --repo: the newest snapshot must be this root or a later one that records it (use "
                   "on a dom0 that has no record of the repository yet)")  # fmt: skip


def add_backup_options(p: ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--block-size", type=block_size_arg, default=repo.DEFAULT_BLOCK_SIZE, metavar="SIZE",
                   help="with --repo, when it creates the repository: its block size (default 256K)")
    p.add_argument("--forget", metavar="VM", action="append", default=[],
                   help="with --repo: leave VM (dom0: its home) of the previous snapshot out of the new one "
                   "(repeatable; older snapshots keep it). Without it, every VM of the previous snapshot that "
                   "this run does not back up is carried into the new snapshot unchanged, deleted VMs too")  # fmt: skip
    p.add_argument("--rescan", action="store_true",
                   help="with --repo: read every volume in full instead of only what changed since the last backup "
                   "(the snapshot is the same; see docs/CHANGE-TRACKING.md)")  # fmt: skip
    p.add_argument("--release-bases", action="store_true",
                   help="remove every base snapshot kept for change tracking (they pin thin pool space), then exit")


def release_bases() -> int:
    """``qvm-backup --release-bases``: one line per snapshot removed."""
    system = System.from_env()
    pools = Qubes(system).collection().pools.values()
    dirs = [system.dom0_path(p["dir_path"]) for p in pools if p.get("driver") == "file-reflink" and p.get("dir_path")]
    lines = release_all(system, dirs, lvm=any(p.get("driver") == "lvm_thin" for p in pools))
    for line in lines:
        print(line)
    if not lines:
        print("No change-tracking base snapshots to release")
    return 0


def add_restore_options(p: ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--profile", metavar="NAME",
                   help=f"the repository (backup VM, directory, passphrase) of the backup profile {PROFILE_DIR}/"
                   "NAME.conf that qvm-backup --repo --save-profile wrote")  # fmt: skip
    p.add_argument("--snapshot", type=int, metavar="N", help="with --repo: restore snapshot N (default: the newest)")
    p.add_argument("--list-snapshots", action="store_true",
                   help="with --repo: list the repository's snapshots (authenticated: needs the passphrase)")
    p.add_argument("--all-snapshots", action="store_true",
                   help="with --repo --verify-only: verify every snapshot still present, each object once")


def refuse_without_repo(args: argparse.Namespace) -> None:
    """The options that only mean something with --repo (or a repository's --profile) are refused without."""
    for opt in ("forget", "expect_root", "snapshot", "list_snapshots", "all_snapshots"):
        if getattr(args, opt, None):
            raise UsageError(f"--{opt.replace('_', '-')} goes with --repo (a repository of snapshots)")


def _positional_vms(args: argparse.Namespace) -> list[str]:
    """With --repo there is no LOCATION: every positional argument is a VM."""
    return ([args.location] if args.location else []) + list(args.vms)


def _source_vm(system: System, vm: str | None) -> str:
    if vm is None or vm == "dom0":
        raise UsageError("--repo needs the backup VM holding the repository (-d VM); repositories in dom0 are not "
                         "supported yet")  # fmt: skip
    check_text_arg(vm, "the backup VM name")
    if vm not in Qubes(system).vm_list():
        raise UsageError(f"no such VM: {vm} (the backup VM given with -d)")
    return vm


# ------------------------------------------------------------------------------------------------ backup

def _from_profile(args: argparse.Namespace, prof: Profile) -> None:
    """A repository's profile stands for -d, --repo, the VMs, --exclude, the compression and the passphrase."""
    given = [opt for opt, on in (("--repo", args.repo), ("--dest-vm", args.dest_vm), ("--exclude", args.exclude),
                                 ("--passphrase-file", args.passphrase_file), ("--save-profile", args.save_profile),
                                 ("--compress", args.compress or args.no_compress or args.compress_filter),
                                 ("VM", _positional_vms(args))) if on]  # fmt: skip
    if given:
        raise UsageError(f"{given[0]} cannot be used together with --profile (the profile says it)")
    args.repo, args.dest_vm, args.exclude = prof.repository, prof.destination_vm, list(prof.exclude)
    args.location, args.vms = None, list(prof.include or [])
    args.compress_filter = prof.compression


def run_backup(args: argparse.Namespace, summary: Callable[[BackupPlan, bool], str],
               profile: Profile | None = None) -> int:  # fmt: skip
    """``summary``: qvm-backup's table of what will be backed up (cli/backup.py); ``profile``: a repository's
    profile (``--profile NAME``) in place of the options it holds."""
    if args.chunk_size:
        raise UsageError("--chunk-size cannot be used with --repo")
    if profile is not None:
        _from_profile(args, profile)
    check_text_arg(args.repo, "the repository")
    if args.save_profile:
        profile_path(System.from_env(), args.save_profile)  # a bad name is refused before anything runs
    stall_timeout()
    system = System.from_env()
    vm = _source_vm(system, args.dest_vm)
    compression = args.compress_filter or ("none" if args.no_compress else "zstd")
    if compression not in repo.COMPRESSIONS:
        raise UsageError(f"a repository is compressed with zstd or not at all, not {compression}")
    for name in args.forget:
        check_text_arg(name, "the VM to forget")
    options = RepoOptions(block_size=args.block_size, compression=compression, kdf_n=args.kdf_n,
                          expect_root=args.expect_root, forget=tuple(args.forget))  # fmt: skip
    qubes = Qubes(system)
    vms = resolve(qubes, _positional_vms(args))
    if _positional_vms(args) and not vms:
        raise UsageError("nothing to back up: the VMs to include match no VM")
    tracking = Tracking(system, f"{vm}:{args.repo}", rescan=args.rescan)
    try:
        plan = plan_backup(system, vms, resolve(qubes, args.exclude), qubes=qubes, planner=tracking, zeros=False)
        try:
            return _backup(args, system, plan, vm, options, summary, profile, tracking)
        finally:
            plan.close()  # the snapshots' readers closed first, then what was not promoted is removed
    finally:
        tracking.close()


def _passphrase(args: argparse.Namespace, system: System, vm: str, creating: bool, profile: Profile | None) -> bytes:
    """From the profile, or asked (twice for a new repository); ``--save-profile`` then keeps it with -d,
    --repo, the VMs, --exclude and the compression."""
    if profile is not None:
        return profile_passphrase(system, profile)
    passphrase = read_passphrase(args.passphrase_file, confirm=creating, system_path=system.dom0_path)
    if args.save_profile:
        compression = args.compress_filter or ("none" if args.no_compress else "zstd")
        prof = Profile(args.save_profile, _positional_vms(args) or None, list(args.exclude), vm, args.repo,
                       compression, passphrase.decode("utf-8"), repository=args.repo)  # fmt: skip
        save_profile(system, prof)
        warn(f"{PLAINTEXT_WARNING} File location: {PROFILE_DIR}/{prof.name}.conf")
    return passphrase


def _backup(args: argparse.Namespace, system: System, plan: BackupPlan, vm: str, options: RepoOptions,
            summary: Callable[[BackupPlan, bool], str], profile: Profile | None,
            tracking: Tracking) -> int:  # fmt: skip
    log: Log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    log(summary(plan, args.verbose))
    for note in tracking.notes:
        log(f"note: {note}")
    if args.verbose:
        for line in tracking.full_reads():
            log(f"note: read in full: {line}")
    elif n := tracking.no_answer():
        log(f"note: change tracking could not tell what changed in {n} volume{'s' if n > 1 else ''} (thin_delta or "
            "FIEMAP gave no usable answer): read in full; -v names them")
    if any(a.kind == "vm" and a.vm == vm for a in plan.archives):
        warn(f"the backup VM {vm} is backed up into itself: its volumes are saved as they were when it last shut "
             "down")  # fmt: skip
    if not confirm("Do you want to proceed with the backup?", args.yes):
        print("Backup cancelled.", file=sys.stderr)  # "no" is no failure (exit 0), as in Qubes' qvm-backup
        if args.json:
            emit_json(report.cancelled_document("backup"))
        return 0
    signal.signal(signal.SIGTERM, raise_interrupt)
    bar = Progress(plan.data, "backup", enabled=None if not args.quiet else False)
    job = RepoBackup(system, plan, vm, args.repo, options, progress=bar, tracking=tracking)
    start = time.monotonic()
    try:
        creating = job.connect()
        if creating:
            log(f"Creating a new repository in {vm}:{args.repo}")
        passphrase = _passphrase(args, system, vm, creating, profile)
        start = time.monotonic()
        result = job.run(passphrase)
    finally:
        bar.close()
        job.close()
    plan.close()  # readers closed: the new snapshots can become the bases
    assert job.header is not None
    result.warnings += tracking.promote(result.repo_id, result.root, job.header.block_size)
    elapsed = time.monotonic() - start
    for note in result.notes:
        log(f"note: {note}")
    log(what_line(result))
    for warning in result.warnings:
        warn(warning)
    missed = tracking.mismatches()  # --rescan found what change tracking missed: the snapshot is right, say it
    for line in missed:
        print(f"error: {line}", file=sys.stderr)
    if args.json:
        doc = backup_document(result, elapsed)
        doc["read_blocks"], doc["reused_blocks"] = result.read_blocks, result.reused_blocks
        doc["volume_read_blocks"] = result.volume_read_blocks
        if missed:  # the snapshot is written and right, but change tracking was wrong: the run failed
            doc.update(ok=False, error=f"--rescan: {missed[0]}", exit_code=1, tracking_mismatches=missed)
        emit_json(doc)
        return 1 if missed else 0
    print(result_line(result, elapsed))
    return 1 if missed else 0


def _vms(names: list[str]) -> str:
    return ", ".join("dom0 home" if n == "dom0" else n for n in names) or "none"


def what_line(r: RepoBackupResult) -> str:
    """Which VMs this run read and which it carried from the parent snapshot unchanged (or left out)."""
    line = f"Read {_vms(r.read)}"
    if r.carried:
        line += f"; carried from snapshot {r.parent} unchanged: {_vms(r.carried)}"
    if r.forgotten:
        line += f"; left out (--forget): {_vms(r.forgotten)}"
    return line


def mib(n: int) -> str:
    """``212 MiB``, ``3.4 MiB``: whole MiB from 10 on, else one decimal."""
    value = n / (1 << 20)
    return f"{value:.0f} MiB" if value >= 10 else f"{value:.1f} MiB"


def result_line(r: RepoBackupResult, elapsed: float) -> str:
    """dom0's own account, always printed, in issue 20's words (``Snapshot 143 of repository 7a1e…: 4 VMs
    changed, 212 MiB stored, 3.9 s``); then the root id, which is what ``--expect-root`` pins.  "Changed":
    the VMs (dom0: its home) whose file list differs from the parent snapshot's."""
    vms = len(r.changed)
    return (f"Snapshot {r.seq} of repository {r.repo_id}: {vms} VM{'' if vms == 1 else 's'} changed, "
            f"{mib(r.stored)} stored, {elapsed:.1f} s; root {r.root}")  # fmt: skip


def backup_document(r: RepoBackupResult, elapsed: float) -> dict[str, Any]:
    return {"version": report.JSON_VERSION, "command": "backup", "ok": True, "repository": r.repo_id,
            "location": r.location, "snapshot": r.seq, "root": r.root, "created": r.created, "parent": r.parent,
            "new_repository": r.new_repository, "archives": r.archives, "changed": r.changed, "read": r.read,
            "carried": r.carried, "forgotten": r.forgotten, "stored_bytes": r.stored, "objects": r.objects,
            "data_blocks": r.blocks, "parent_segments_fetched": r.segments_fetched,
            "cache_used": r.cache_used, "seconds": round(elapsed, 3), "notes": r.notes,
            "warnings": r.warnings}  # fmt: skip


# ----------------------------------------------------------------------------------------------- restore

def run_restore(args: argparse.Namespace, summary: Callable[[RestorePlan, bool], str]) -> int:
    """``summary``: qvm-backup-restore's plan table (cli/restore.py)."""
    if args.list or args.list_backups:
        raise UsageError("--list and --list-backups do not apply to --repo: use --list-snapshots")
    if args.backup_id:
        raise UsageError("--backup-id does not apply to --repo: use --snapshot N and --expect-root ID")
    profile = None
    if args.profile is not None:
        given = {"--repo": args.repo, "--dest-vm": args.source_vm}
        profile = repository_profile(System.from_env(), args.profile, given,
                                     "restore a backup by its file (qvm-backup-restore -d VM FILE)")  # fmt: skip
        args.repo, args.source_vm = profile.repository, profile.destination_vm
    check_text_arg(args.repo, "the repository")
    if args.snapshot is not None and args.snapshot < 1:
        raise UsageError("--snapshot counts from 1")
    if args.all_snapshots and (not args.verify_only or args.snapshot is not None or args.list_snapshots
                               or _positional_vms(args) or args.exclude):  # fmt: skip
        raise UsageError("--all-snapshots goes with --verify-only alone (not --snapshot, --list-snapshots or VMs)")
    stall_timeout()
    system = System.from_env()
    vm = _source_vm(system, args.source_vm)
    vms = _positional_vms(args)
    options = RestoreOptions(
        vms=tuple(vms), exclude=tuple(args.exclude), verify_only=args.verify_only or args.list_snapshots,
        skip_broken=args.skip_broken, ignore_missing=args.ignore_missing, skip_conflicting=args.skip_conflicting,
        rename_conflicting=args.rename_conflicting, skip_dom0_home=args.skip_dom0_home,
        ignore_username_mismatch=args.ignore_username_mismatch, restore_devices=args.restore_devices,
        restore_risky_settings=args.restore_risky_settings,
    )  # fmt: skip
    log: Log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    signal.signal(signal.SIGTERM, raise_interrupt)
    job = RepoRestore(system, args.repo, vm, options=options, snapshot=args.snapshot, expect_root=args.expect_root)
    try:
        job.connect()
        if profile is not None and args.passphrase_file is None:
            job.passphrase = profile_passphrase(system, profile)
        else:
            job.passphrase = read_passphrase(args.passphrase_file, confirm=False, system_path=system.dom0_path)
        job.open()
        for note in job.notes:
            print(f"note: {note}", file=sys.stderr)
        if args.list_snapshots:
            return _list(args, job)
        if args.all_snapshots:
            return _verify_all(args, job, log)
        return _restore(args, job, log, summary)
    finally:
        job.close()


def _which(job: RepoRestore) -> str:
    assert job.chosen is not None and job.header is not None
    root = job.chosen.root
    repo_id, root_id = job.header.repo_id_hex, job.chosen.root_id
    return f"snapshot {root.seq} of repository {repo_id} (created {root.created}, root {root_id})"


def _list(args: argparse.Namespace, job: RepoRestore) -> int:
    snaps = job.snapshots()
    assert job.header is not None and job.chosen is not None
    if args.json:
        emit_json({"version": report.JSON_VERSION, "command": "list-snapshots", "ok": True,
                   "repository": job.header.repo_id_hex, "location": job.where,
                   "snapshots": [{"snapshot": s.seq, "created": s.created, "root": s.root, "present": s.present}
                                 for s in snaps]})  # fmt: skip
        return 0
    head = job.chosen.head
    print(f"Repository {job.header.repo_id_hex} in {job.where}: {sum(s.present for s in snaps)} of {len(snaps)} "
          f"snapshots present; the newest ({head.seq}) holds {', '.join(a.vm for a in head.archives)}")  # fmt: skip
    print(table(["snapshot", "created", "root", "state"],
                [[str(s.seq), s.created, s.root, "present" if s.present else "pruned"] for s in snaps]))  # fmt: skip
    return 0


def _verify_all(args: argparse.Namespace, job: RepoRestore, log: Log) -> int:
    """--verify-only --all-snapshots: a line per snapshot still present; exit 3 if any failed."""
    assert job.header is not None
    start = time.monotonic()

    def line(c: SnapshotCheck) -> None:
        what = f"Snapshot {c.seq} ({c.created}, root {c.root})" if c.root else f"Snapshot {c.seq}"
        if c.ok:
            log(f"{what}: verified, {human(c.data)} of data, {c.objects} objects checked (the rest with an "
                "earlier snapshot)")  # fmt: skip
        else:
            log(f"{what}: FAILED: {c.error}")

    checker = AllSnapshots(job, line)
    checks = checker.run()
    elapsed = time.monotonic() - start
    failed = [c for c in checks if not c.ok]
    fetched = checker.fetched
    error = None
    if failed:
        error = (f"{len(failed)} of {len(checks)} snapshots failed verification (snapshot "
                 f"{', '.join(str(c.seq) for c in failed)}): snapshot {failed[0].seq}: {failed[0].error}")  # fmt: skip
    if args.json:
        doc: dict[str, Any] = {
            "version": report.JSON_VERSION, "command": "verify", "ok": not failed, "all_snapshots": True,
            "repository": job.header.repo_id_hex, "location": job.where, "objects": fetched,
            "seconds": round(elapsed, 3),
            "snapshots": [{"snapshot": c.seq, "created": c.created or None, "root": c.root or None, "ok": c.ok,
                           "error": c.error, "objects": c.objects, "data": c.data} for c in checks]}  # fmt: skip
        if error is not None:
            doc.update(error=error, exit_code=3)
        emit_json(doc)
    if error is not None:
        print(f"{prog()}: error: {error}", file=sys.stderr)
        return 3
    if not args.json:
        print(f"Verified {len(checks)} snapshots of repository {job.header.repo_id_hex} in {job.where}: {fetched} "
              f"objects, each checked once, in {elapsed:.1f} s")  # fmt: skip
    return 0


def _restore(args: argparse.Namespace, job: RepoRestore, log: Log,
             summary: Callable[[RestorePlan, bool], str]) -> int:  # fmt: skip
    plan = job.plan()
    log(f"{_which(job)[0].upper()}{_which(job)[1:]}")
    log(summary(plan, args.verbose).split("\n", 1)[1])
    for line in [*settings.plan_lines(plan), *settings.leftover_lines(job.leftovers)]:
        log(line)
    if plan.errors:
        raise BackupError(plan.errors[0])
    verb = "verify" if args.verify_only else "restore"
    unattended = args.yes or args.passphrase_file is not None
    if not confirm(f"Do you want to {verb} the VMs above?", unattended):
        log("Restore cancelled.")
        return 0
    if not unattended:  # as for a backup file: settings that grant power are the user's to choose
        settings.ask(plan)
    dropped = settings.dropped_lines(plan)
    elapsed = run_with_progress(job, plan.data, verb, args.quiet, log)
    for warning in dropped + job.warnings:
        warn(warning)
    rate = f"{human(plan.data)} in {elapsed:.1f} s ({human(int(plan.data / elapsed))}/s)"
    if args.json:
        assert job.chosen is not None and job.header is not None
        doc = report.restore_document(cast(Any, job), plan, elapsed, None, dropped)  # the single-file one's keys
        emit_json(doc | {"repository": job.header.repo_id_hex, "location": job.where, "snapshot": job.chosen.root.seq,
                         "root": job.chosen.root_id, "snapshot_created": job.chosen.root.created,
                         "data_bytes": plan.data, "seconds": round(elapsed, 3)})  # fmt: skip
        return 0
    if args.verify_only:
        print(f"Verified {_which(job)}: {report.what(plan.wanted)}, {rate}; nothing was written")
    else:
        done = ", ".join(job.restored) if job.restored else "nothing"
        print(f"Restored {done} from {_which(job)}; {rate}")
        if job.home_restored_to is not None:
            print(f"dom0 home restored to {job.home_restored_to}")
    return 0
