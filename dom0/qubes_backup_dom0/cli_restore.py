"""qvm-backup-restore: restore VMs from a backup, verifying every byte before it is used."""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time

from .cli_common import check_text_arg, confirm, human, raise_interrupt, run_cli, table
from .header import QubesFormatBackup
from .naming import name_time_mismatch
from .passphrase import read_passphrase
from .progress import Progress
from .qubes_tools import run_qubes_restore
from .restore import Restore, RestoreOptions, RestorePlan
from .system import System
from .transport import stall_timeout


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qvm-backup-restore",
        description="Restore VMs from a qubes-backup backup; every chunk is verified before it is decrypted.",
    )
    p.add_argument("-d", "--dest-vm", "--from-vm", dest="source_vm", metavar="VM",
                   help="the backup VM holding the backup (default: LOCATION is a file in dom0)")  # fmt: skip
    p.add_argument("-p", "--passphrase-file", metavar="FILE", help="read the passphrase from FILE ('-': stdin)")
    p.add_argument("-x", "--exclude", metavar="VM", action="append", default=[], help="do not restore VM")
    p.add_argument("--verify-only", action="store_true", help="verify the backup, restore nothing")
    p.add_argument("--skip-broken", action="store_true", help="skip VMs whose template or netvm is missing")
    p.add_argument("--ignore-missing", action="store_true",
                   help="restore VMs with a missing template/netvm using the system default")  # fmt: skip
    p.add_argument("--skip-conflicting", action="store_true", help="skip VMs that already exist")
    p.add_argument("--rename-conflicting", action="store_true", help="restore existing VMs under a new name")
    p.add_argument("--skip-dom0-home", action="store_true", help="do not restore dom0's home directory")
    p.add_argument("--backup-id", metavar="ID", type=backup_id_arg,
                   help="restore only the backup with this id (qvm-backup prints it); refuse any other")  # fmt: skip
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors and the result")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("location", metavar="LOCATION", help="backup file (in the backup VM with -d) or command")
    p.add_argument("vms", metavar="VM", nargs="*", help="VMs to restore (default: all)")
    return p


def backup_id_arg(value: str) -> str:
    """``--backup-id``: 32 hex digits (case-insensitive), normalised to lowercase."""
    if re.fullmatch(r"[0-9a-fA-F]{32}", value) is None:
        raise argparse.ArgumentTypeError("a backup id is 32 hexadecimal digits, as qvm-backup printed it")
    return value.lower()


def summary(plan: RestorePlan) -> str:
    h, m = plan.header, plan.manifest
    lines = [f"Backup {h.backup_id.hex()} made {h.created} ({h.compression}, {len(m.archives)} archive(s))"]
    rows = [[v.name, v.klass, v.template or "-", v.netvm or "-", human(v.size), v.action] for v in plan.vms]
    home = next((a for a in m.archives if a.kind == "home"), None)
    if home is not None:
        action = f"restore to ~/{plan.home_target}" if plan.home is not None else "skip"
        rows.insert(0, ["dom0 (home)", "AdminVM", "-", "-", human(home.size), action])
    lines.append(table(["VM", "class", "template", "netvm", "size", "action"], rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    return run_cli(lambda: _run_or_hand_over(args, sys.argv[1:] if argv is None else argv), args.debug)


def _run_or_hand_over(args: argparse.Namespace, argv: list[str]) -> int:
    """A backup in Qubes OS' own format goes to Qubes' own qvm-backup-restore (qubes_tools.py)."""
    try:
        return _run(args)
    except QubesFormatBackup as exc:
        return run_qubes_restore(exc, argv)


def _run(args: argparse.Namespace) -> int:
    check_text_arg(args.location, "LOCATION")
    stall_timeout()  # a bad QUBES_BACKUP_TIMEOUT is a usage error before anything is asked
    system = System.from_env()
    options = RestoreOptions(
        vms=tuple(args.vms), exclude=tuple(args.exclude), verify_only=args.verify_only,
        skip_broken=args.skip_broken, ignore_missing=args.ignore_missing,
        skip_conflicting=args.skip_conflicting, rename_conflicting=args.rename_conflicting,
        skip_dom0_home=args.skip_dom0_home, backup_id=args.backup_id,
    )  # fmt: skip
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    passphrase = read_passphrase(args.passphrase_file, confirm=False, system_path=system.dom0_path)
    signal.signal(signal.SIGTERM, raise_interrupt)
    job = Restore(system, args.location, passphrase, source_vm=args.source_vm, options=options)
    try:
        job.open()
        if not job.confined:
            log("note: the process reading the backup runs unconfined (bubblewrap not found or QUBES_SIM_SANDBOX=0)")
        plan = job.plan()
        log(summary(plan))
        mismatch = name_time_mismatch(args.location, plan.header.created)
        if mismatch is not None:  # shown even with -q: it may mean an older backup under a newer name
            print(f"warning: {mismatch}", file=sys.stderr)
        if plan.errors:
            from .errors import BackupError

            raise BackupError(plan.errors[0])
        verb = "verify" if args.verify_only else "restore"
        if not confirm(f"Do you want to {verb} the VMs above?", args.yes):
            log("Restore cancelled.")
            return 1
        bar = Progress(plan.data, verb, enabled=None if not args.quiet else False)
        job.progress = bar
        start = time.monotonic()
        try:
            job.run()
        finally:
            bar.close()
        elapsed = max(time.monotonic() - start, 1e-9)
    finally:
        job.close()
    for warning in job.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    rate = f"{human(plan.data)} in {elapsed:.1f} s ({plan.data / elapsed / 1e6:.0f} MB/s)"
    which = f"backup {plan.header.backup_id.hex()}, created {plan.header.created}"
    if args.verify_only:
        print(f"Backup verified ({which}): {len(plan.wanted)} archive(s), {rate}; nothing was written")
    else:
        done = ", ".join(job.restored) or "no VM"
        print(f"Restored {done} from {which}; {rate}")
        if job.home_restored_to is not None:
            # As a path inside dom0 (in simulation: not the host path of the simulated dom0).
            shown = "/" / job.home_restored_to.relative_to(system.dom0_root)
            print(f"dom0 home restored to {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
