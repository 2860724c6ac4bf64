"""qvm-backup: back up VMs into a backup VM (or a dom0 directory), encrypted and authenticated in dom0."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from qubes_backup_protocol.frames import safe_text

from .api import BackupResult, run_backup
from .backup import BackupOptions, BackupPlan, plan_backup
from .cli_common import check_text_arg, confirm, human, raise_interrupt, run_cli, table
from .errors import UsageError
from .header import (
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
from .passphrase import read_passphrase
from .progress import Progress
from .system import System
from .transport import make_transport, stall_timeout


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qvm-backup",
        description="Back up VMs, encrypted and authenticated in dom0, into a backup VM or a dom0 directory.",
    )
    p.add_argument("-d", "--dest-vm", metavar="VM", help="the backup VM (default: LOCATION is in dom0)")
    p.add_argument("-x", "--exclude", metavar="VM", action="append", default=[], help="exclude VM (repeatable)")
    p.add_argument("-p", "--passphrase-file", metavar="FILE", help="read the passphrase from FILE ('-': stdin)")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument("-z", "--compress", action="store_true", help="compress (the default, zstd)")
    comp.add_argument("--no-compress", action="store_true", help="do not compress")
    comp.add_argument("-Z", "--compress-filter", choices=("zstd", "gzip", "none"), help="compression to use")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print only errors and the location")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="list every file")
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
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("location", metavar="LOCATION", help="directory (in the backup VM with -d), or a command")
    p.add_argument("vms", metavar="VM", nargs="*", help="VMs to back up (default: all with include_in_backups)")
    return p


def summary(plan: BackupPlan, verbose: bool) -> str:
    rows = [[a.vm, a.klass, human(a.size), human(a.data)] for a in plan.archives]
    rows.append(["Total", "", human(plan.size), human(plan.data)])
    text = table(["VM", "class", "size", "to back up"], rows)
    for path in plan.skipped:
        text += f"\nskipped (control characters in the file name): {safe_text(path)}"
    if verbose:
        text += "\n" + "\n".join(f"  {f.path} ({human(f.size)}, {human(f.data)} data)" for a in plan.archives
                                 for f in a.files)  # fmt: skip
    return text


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    return run_cli(lambda: _run(args), args.debug)


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


def _run(args: argparse.Namespace) -> int:
    check_text_arg(args.location, "LOCATION")
    if args.dest_vm is not None:
        check_text_arg(args.dest_vm, "the backup VM name")
    check_kdf_n(args.kdf_n, args.weak_kdf_ok)
    stall_timeout()  # a bad QUBES_BACKUP_TIMEOUT is a usage error before anything is asked or written
    system = System.from_env()
    compression = args.compress_filter or ("none" if args.no_compress else "zstd")
    options = BackupOptions(compression=compression, kdf_n=args.kdf_n)
    if args.chunk_size is not None:
        if not CHUNK_MIN <= args.chunk_size <= CHUNK_MAX:
            raise UsageError("chunk size out of range")
        options = BackupOptions(compression=compression, kdf_n=args.kdf_n, chunk_size=args.chunk_size)
    plan = plan_backup(system, args.vms, args.exclude)
    try:  # the plan holds the volumes' snapshots from the scan until each archive is written
        return _confirm_and_run(args, system, options, plan)
    finally:
        plan.close()


def _confirm_and_run(args: argparse.Namespace, system: System, options: BackupOptions, plan: BackupPlan) -> int:
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    log(summary(plan, args.verbose))
    if not confirm("Do you want to proceed with the backup?", args.yes):
        print("Backup cancelled.", file=sys.stderr)
        return 1
    passphrase = read_passphrase(args.passphrase_file, confirm=True, system_path=system.dom0_path)
    transport = make_transport(system) if args.dest_vm else None
    if transport is not None and getattr(transport, "confined", True) is False:
        log("note: simulated backup VM agent runs unconfined (bubblewrap not found or QUBES_SIM_SANDBOX=0)")
    bar = Progress(plan.data, "backup", enabled=None if not args.quiet else False)
    start = time.monotonic()
    # SIGTERM ends the backup like Ctrl-C: the partial file is removed, nothing looks complete.
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        result = run_backup(system, args.location, passphrase, plan=plan, dest_vm=args.dest_vm, options=options,
                            progress=bar, transport=transport)  # fmt: skip
    finally:
        bar.close()
    for warning in result.warnings:
        print(f"qvm-backup: warning: {safe_text(warning, limit=400)}", file=sys.stderr)
    elapsed = max(time.monotonic() - start, 1e-9)
    log(
        f"Backed up {len(plan.archives)} VM(s), {human(plan.data)} of data in {elapsed:.1f} s "
        f"({plan.data / elapsed / 1e6:.0f} MB/s); {human(result.size)} sent"
    )
    # Always printed (also with -q): dom0's own account of the backup.  The id and creation time are what a
    # restore shows and what `qvm-backup-restore --backup-id` pins (docs/SECURITY.md section 5).
    print(result_line(result))
    return 0


def result_line(result: BackupResult) -> str:
    return (
        f"Backup written to: {result.location} (backup id {result.backup_id}, created {result.created}, "
        f"{result.size} bytes)"
    )


if __name__ == "__main__":
    sys.exit(main())
