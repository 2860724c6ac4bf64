"""qvm-backup: back up VMs into a backup VM (or a dom0 directory), encrypted and authenticated in dom0."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from qubes_backup_protocol.frames import safe_text

from .api import run_backup
from .backup import BackupOptions, BackupPlan, plan_backup
from .cli_common import confirm, human, raise_interrupt, run_cli, table
from .errors import UsageError
from .header import CHUNK_MAX, CHUNK_MIN, DEFAULT_KDF_N
from .passphrase import read_passphrase
from .progress import Progress
from .system import System
from .transport import make_transport


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
        help=f"scrypt cost N, a power of two (default {DEFAULT_KDF_N})",
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


def _run(args: argparse.Namespace) -> int:
    system = System.from_env()
    compression = args.compress_filter or ("none" if args.no_compress else "zstd")
    options = BackupOptions(compression=compression, kdf_n=args.kdf_n)
    if args.chunk_size is not None:
        if not CHUNK_MIN <= args.chunk_size <= CHUNK_MAX:
            raise UsageError("chunk size out of range")
        options = BackupOptions(compression=compression, kdf_n=args.kdf_n, chunk_size=args.chunk_size)
    plan = plan_backup(system, args.vms, args.exclude)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    log(summary(plan, args.verbose))
    if not confirm("Do you want to proceed with the backup?", args.yes):
        log("Backup cancelled.")
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
    header, where = result.header, result.location
    for warning in result.warnings:
        print(f"qvm-backup: warning: {safe_text(warning, limit=400)}", file=sys.stderr)
    elapsed = max(time.monotonic() - start, 1e-9)
    log(
        f"Backed up {len(plan.archives)} VM(s), {human(plan.data)} of data in {elapsed:.1f} s "
        f"({plan.data / elapsed / 1e6:.0f} MB/s); backup id {header.backup_id.hex()}"
    )
    print(f"Backup written to: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
