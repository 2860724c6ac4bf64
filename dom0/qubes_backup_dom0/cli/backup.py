"""qvm-backup: back up VMs into a backup VM (or a dom0 directory), encrypted and authenticated in dom0."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from qubes_backup_protocol.frames import safe_text

from qubes_backup_dom0.api import BackupResult, run_backup
from qubes_backup_dom0.backup.plan import BackupOptions, BackupPlan, PlannedArchive, plan_backup
from qubes_backup_dom0.cli import repo as repo_cli
from qubes_backup_dom0.cli import report
from qubes_backup_dom0.cli.common import (
    ArgumentParser,
    add_version,
    check_text_arg,
    confirm,
    emit_json,
    guard_output,
    human,
    raise_interrupt,
    reuse_freed_memory,
    run_cli,
    table,
    warn,
)
from qubes_backup_dom0.cli.listing import check_directory
from qubes_backup_dom0.cli.passphrase import read_passphrase, short_passphrase
from qubes_backup_dom0.cli.profile import (
    PLAINTEXT_WARNING,
    PROFILE_DIR,
    Profile,
    load_profile,
    profile_passphrase,
    resolve,
    save_profile,
)
from qubes_backup_dom0.cli.progress import Progress
from qubes_backup_dom0.errors import BackupError, UsageError
from qubes_backup_dom0.format.header import (
    CHUNK_MAX,
    CHUNK_MIN,
    DEFAULT_KDF_N,
    DEFAULT_KDF_P,
    DEFAULT_KDF_R,
    KDF_MEMORY_MAX,
    KDF_N_MAX,
    KDF_N_MIN,
    KDF_WORK_MAX,
)
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import make_transport, stall_timeout


def parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="qvm-backup",
        description="Back up VMs, encrypted and authenticated in dom0, into a backup VM or a dom0 directory. "
        "Backups are always encrypted (-e is accepted and changes nothing).",
    )
    p.add_argument("--profile", metavar="NAME",
                   help=f"run the backup described by {PROFILE_DIR}/NAME.conf (Qubes' YAML profile; one saved "
                   "with --repo makes the next snapshot of its repository)")  # fmt: skip
    p.add_argument("--save-profile", metavar="NAME",
                   help=f"also save these options, with the passphrase, as {PROFILE_DIR}/NAME.conf (with --repo: "
                   "the repository, which qvm-backup-restore --profile NAME also uses)")  # fmt: skip
    p.add_argument("-d", "--dest-vm", metavar="VM", help="the backup VM (default: LOCATION is in dom0)")
    p.add_argument("-x", "--exclude", metavar="VM", action="append", default=[],
                   help="exclude VM (repeatable; also @tag:NAME, @type:CLASS)")  # fmt: skip
    p.add_argument("-e", "--encrypt", action="store_true", help="accepted: backups are always encrypted")
    p.add_argument("-p", "--passphrase-file", metavar="FILE", help="read the passphrase from FILE ('-': stdin)")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument("-z", "--compress", action="store_true", help="compress (the default, zstd)")
    comp.add_argument("--no-compress", action="store_true", help="do not compress")
    comp.add_argument("-Z", "--compress-filter", choices=("zstd", "gzip", "none"), help="compression to use")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print only errors and the location")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="list every file")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout (docs/JSON.md)")
    p.add_argument("--chunk-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--kdf-n", type=int, default=DEFAULT_KDF_N, metavar="N",
        help=f"scrypt cost N, a power of two (default {DEFAULT_KDF_N}); below the default needs --weak-kdf-ok",
    )  # fmt: skip
    p.add_argument(
        "--weak-kdf-ok", action="store_true",
        help="accept --kdf-n below the default: it makes guessing the passphrase cheaper for anyone who gets "
        "a copy of this backup (and the passphrase is shared by all your backups)",
    )  # fmt: skip
    repo_cli.add_backup_options(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    add_version(p)
    p.add_argument("location", metavar="LOCATION", nargs="?",
                   help="directory (in the backup VM with -d), s3://BUCKET/PREFIX, ssh://[USER@]HOST[:PORT]/DIR or a "
                   "command; not with --profile")  # fmt: skip
    p.add_argument("vms", metavar="VM", nargs="*",
                   help="VMs to back up, @tag:NAME, @type:CLASS (default: all with include_in_backups)")  # fmt: skip
    return p


RUNNING_NOTE = "running: its state from before its start is backed up"
LIVE_NOTE = "live volume {}: written in place while it runs, saved crash-consistent"


def summary(plan: BackupPlan, verbose: bool) -> str:
    """The table Qubes' qvm-backup shows before asking, with its notes: a running VM is backed up as it was
    before its start (its committed volumes), and the VMs not selected are listed."""
    running = any(a.running or a.live for a in plan.archives)
    rows = [[_shown(a), a.klass if a.kind == "vm" else "-", human(a.size), human(a.data)]
            + (["; ".join(_notes(a))] if running else []) for a in plan.archives]  # fmt: skip
    rows.append(["Total", "", human(plan.size), human(plan.data)] + ([""] if running else []))
    text = table(["VM", "class", "size", "to back up"] + (["note"] if running else []), rows)
    for path in plan.skipped:
        text += f"\nskipped (control characters in the file name): {safe_text(path)}"
    if plan.not_selected:
        text += "\nVMs not selected for backup:\n" + "\n".join(f" - {safe_text(n)}" for n in plan.not_selected)
    if verbose:
        text += "\n" + "\n".join(f"  {f.path} ({human(f.size)}, {human(f.data)} data)" for a in plan.archives
                                 for f in a.files)  # fmt: skip
    return text


def _notes(a: PlannedArchive) -> list[str]:
    """A running VM is backed up as it was before its start, except its live volumes (revisions_to_keep=-1:
    Qubes keeps no snapshot of them, the VM writes them in place), which are read as a crash would leave them."""
    notes = [RUNNING_NOTE] if a.running else []
    return [*notes, LIVE_NOTE.format(", ".join(a.live))] if a.live and a.running else notes


def _shown(a: PlannedArchive) -> str:
    return f"dom0 home ({a.files[0].path.split('/')[-1]})" if a.kind == "home" else a.vm


def main(argv: list[str] | None = None) -> int:
    guard_output()
    reuse_freed_memory()
    p = parser()
    args_list = sys.argv[1:] if argv is None else argv
    if "--json" in args_list:
        p.json_command = "backup"
    args = p.parse_intermixed_args(args_list)
    return run_cli(lambda: _run(args), args.debug, "backup" if args.json else None)


def check_kdf_n(n: int, weak_ok: bool) -> None:
    """``--kdf-n``: a power of two within the restore-side ceilings; below the default only when asked."""
    if n < 1 or n & (n - 1) or not KDF_N_MIN <= n <= KDF_N_MAX or 128 * n * DEFAULT_KDF_R > KDF_MEMORY_MAX \
            or n * DEFAULT_KDF_R * DEFAULT_KDF_P > KDF_WORK_MAX:  # fmt: skip
        top = min(KDF_N_MAX, KDF_MEMORY_MAX // (128 * DEFAULT_KDF_R), KDF_WORK_MAX // (DEFAULT_KDF_R * DEFAULT_KDF_P))
        raise UsageError(f"--kdf-n must be a power of two from {KDF_N_MIN} to {top}: {n}")
    if n < DEFAULT_KDF_N and not weak_ok:
        raise UsageError(
            f"--kdf-n {n} is below the default {DEFAULT_KDF_N}: it makes guessing the passphrase cheaper for "
            "anyone holding this backup; add --weak-kdf-ok to accept that"
        )


@dataclass
class Job:
    """What to back up, where, and where the passphrase comes from: the command line or a profile."""

    vms: list[str]
    include_given: bool
    exclude: list[str]
    dest_vm: str | None
    location: str
    compression: str
    profile: Profile | None = None


def _job(args: argparse.Namespace, system: System) -> Job:
    if args.profile is None:
        if args.location is None:
            raise UsageError("either --profile or LOCATION is required")
        compression = args.compress_filter or ("none" if args.no_compress else "zstd")
        dest = None if args.dest_vm in (None, "dom0") else args.dest_vm
        return Job(list(args.vms), bool(args.vms), list(args.exclude), dest, args.location, compression)
    given = [opt for opt, on in (("--exclude", args.exclude), ("--passphrase-file", args.passphrase_file),
                                 ("--compress", args.compress or args.no_compress or args.compress_filter),
                                 ("--save-profile", args.save_profile), ("--dest-vm", args.dest_vm),
                                 ("LOCATION", args.location), ("VM", args.vms)) if on]  # fmt: skip
    if given:
        raise UsageError(f"{given[0]} cannot be used together with --profile (the profile says it)")
    prof = load_profile(system, args.profile)
    return Job(prof.include or [], prof.include is not None, prof.exclude, prof.destination_vm,
               prof.destination_path, prof.compression, prof)  # fmt: skip


def _check_destination(system: System, qubes: Qubes, job: Job) -> None:
    """Before anything is asked: the backup VM exists, a dom0 directory exists, a directory in the VM exists
    (asked of the agent with a listing request; a command, s3:// or ssh:// location is checked by the agent
    when the backup starts)."""
    pvm = job.profile.passphrase_vm if job.profile is not None else None
    if pvm is not None and job.profile is not None and (pvm == "dom0" or pvm not in qubes.vm_list()):
        raise UsageError(f"invalid backup profile {job.profile.name}: passphrase_vm {pvm} does not exist")
    if job.dest_vm is None:
        path = system.dom0_path(job.location)
        if not _is_command(job.location) and not path.is_dir():
            raise BackupError(f"directory {job.location} does not exist in dom0")
        return
    if job.dest_vm not in qubes.vm_list():
        raise UsageError(f"no such VM: {job.dest_vm} (the backup VM given with -d)")
    if _is_path(job.location):
        check_directory(system, job.location, job.dest_vm)


def _is_path(location: str) -> bool:
    try:
        words = shlex.split(location)
    except ValueError:
        return False
    return len(words) == 1 and "://" not in location and (location.startswith(("/", "~")) or "/" in location)


def _is_command(location: str) -> bool:
    try:
        return len(shlex.split(location)) > 1
    except ValueError:
        return False


def _check_home(system: System, job: Job, plan: BackupPlan) -> list[str]:
    """Qubes refuses to back dom0's home up into itself; backing the backup VM up into itself is allowed,
    with a warning (returned)."""
    if job.dest_vm is None and any(a.kind == "home" for a in plan.archives) and not _is_command(job.location):
        home = system.home_dir.resolve()
        target = system.dom0_path(job.location).resolve()
        if target == home or target.is_relative_to(home):
            raise UsageError(
                f"cannot back up dom0's home directory into itself ({job.location} is that directory or inside "
                "it): choose a directory outside it, or leave dom0 out (-x dom0)"
            )
    if job.dest_vm is not None and any(a.kind == "vm" and a.vm == job.dest_vm for a in plan.archives):
        return [f"the backup VM {job.dest_vm} is backed up into itself: its volumes are saved as they were "
                "when it last shut down (without this backup); to restore it, another VM must hold a copy"]  # fmt: skip
    return []


def _passphrase(system: System, args: argparse.Namespace, job: Job) -> bytes:
    prof = job.profile
    if prof is None:
        return read_passphrase(args.passphrase_file, confirm=True, system_path=system.dom0_path)
    return profile_passphrase(system, prof)


def _plan(system: System, qubes: Qubes, job: Job) -> BackupPlan:
    vms = resolve(qubes, job.vms)
    if job.include_given and not vms:
        raise UsageError("nothing to back up: the VMs to include match no VM")
    return plan_backup(system, vms, resolve(qubes, job.exclude), qubes=qubes)


def _run(args: argparse.Namespace) -> int:
    if args.release_bases:  # change tracking's base snapshots (cli/repo.py)
        return repo_cli.release_bases()
    if args.rescan and args.repo is None:
        raise UsageError("--rescan applies to --repo backups only (a backup file always reads everything)")
    if args.repo is not None:  # a repository of snapshots (cli/repo.py)
        check_kdf_n(args.kdf_n, args.weak_kdf_ok)
        return repo_cli.run_backup(args, summary)
    if args.profile is not None:
        prof = load_profile(System.from_env(), args.profile)
        if prof.repository is not None:  # a profile of a repository
            check_kdf_n(args.kdf_n, args.weak_kdf_ok)
            return repo_cli.run_backup(args, summary, prof)
    repo_cli.refuse_without_repo(args)
    for text, what in ((args.location, "LOCATION"), (args.dest_vm, "the backup VM name")):
        if text is not None:
            check_text_arg(text, what)
    check_kdf_n(args.kdf_n, args.weak_kdf_ok)
    stall_timeout()  # a bad QUBES_BACKUP_TIMEOUT is a usage error before anything is asked or written
    system = System.from_env()
    job = _job(args, system)
    qubes = Qubes(system)
    _check_destination(system, qubes, job)
    options = BackupOptions(compression=job.compression, kdf_n=args.kdf_n)
    if args.chunk_size is not None:
        if not CHUNK_MIN <= args.chunk_size <= CHUNK_MAX:
            raise UsageError("chunk size out of range")
        options = BackupOptions(compression=job.compression, kdf_n=args.kdf_n, chunk_size=args.chunk_size)
    plan = _plan(system, qubes, job)
    try:  # the plan holds the volumes' snapshots from the scan until each archive is written
        return _confirm_and_run(args, system, job, options, plan)
    finally:
        plan.close()


def _confirm_and_run(args: argparse.Namespace, system: System, job: Job, options: BackupOptions,
                     plan: BackupPlan) -> int:  # fmt: skip
    warnings = _check_home(system, job, plan)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    log(summary(plan, args.verbose))
    for warning in warnings:
        warn(warning)
    if not confirm("Do you want to proceed with the backup?", args.yes):
        print("Backup cancelled.", file=sys.stderr)  # "no" is no failure (exit 0), as in Qubes' qvm-backup
        if args.json:
            emit_json(report.cancelled_document("backup"))
        return 0
    passphrase = _passphrase(system, args, job)
    short = short_passphrase(passphrase)
    if short is not None:
        warn(short)
    if args.save_profile:
        _save(system, args, job, passphrase)
    return _execute(system, args, job, plan, options, passphrase, log)


def _save(system: System, args: argparse.Namespace, job: Job, passphrase: bytes) -> None:
    """--save-profile: as Qubes' qvm-backup, with the passphrase (a dom0 path is made absolute)."""
    location = job.location
    if job.dest_vm is None and not _is_command(location):
        location = os.path.abspath(location)
    prof = Profile(args.save_profile, job.vms or None, job.exclude, job.dest_vm, location, job.compression,
                   passphrase.decode("utf-8"))  # fmt: skip
    save_profile(system, prof)
    warn(f"{PLAINTEXT_WARNING} File location: {PROFILE_DIR}/{prof.name}.conf")


def _execute(system: System, args: argparse.Namespace, job: Job, plan: BackupPlan, options: BackupOptions,
             passphrase: bytes, log: Callable[..., None]) -> int:  # fmt: skip
    transport = make_transport(system) if job.dest_vm else None
    if transport is not None and getattr(transport, "confined", True) is False:
        log("note: simulated backup VM agent runs unconfined (bubblewrap not found or QUBES_SIM_SANDBOX=0)")
    bar = Progress(plan.data, "backup", enabled=None if not args.quiet else False)
    start = time.monotonic()
    # SIGTERM ends the backup like Ctrl-C: the partial file is removed, nothing looks complete.
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        result = run_backup(system, job.location, passphrase, plan=plan, dest_vm=job.dest_vm, options=options,
                            progress=bar, transport=transport)  # fmt: skip
    finally:
        bar.close()
    for warning in result.warnings:
        warn(safe_text(warning, limit=400))
    elapsed = max(time.monotonic() - start, 1e-9)
    log(
        f"Backed up {what_backed_up(plan)}, {human(plan.data)} of data in {elapsed:.1f} s "
        f"({human(int(plan.data / elapsed))}/s); {human(result.size)} sent"
    )
    if args.json:
        emit_json(report.backup_document(result, elapsed, job.dest_vm, system.user))
        return 0
    # Always printed (also with -q): dom0's own account of the backup.  The id and creation time are what a
    # restore shows and what `qvm-backup-restore --backup-id` pins (docs/SECURITY.md section 5).
    print(result_line(result))
    return 0


def what_backed_up(plan: BackupPlan) -> str:
    """``10 VMs and dom0 home``: dom0's home is not a VM."""
    vms = sum(1 for a in plan.archives if a.kind == "vm")
    home = any(a.kind == "home" for a in plan.archives)
    parts = [f"{vms} VM" + ("" if vms == 1 else "s")] if vms or not home else []
    return " and ".join(parts + (["dom0 home"] if home else []))


def result_line(result: BackupResult) -> str:
    return (
        f"Backup written to: {result.location} (backup id {result.backup_id}, created {result.created}, "
        f"{human(result.size)})"
    )


if __name__ == "__main__":
    sys.exit(main())
