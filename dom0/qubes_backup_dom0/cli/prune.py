"""``qvm-backup-prune``: delete the snapshots of a repository that a retention policy does not keep, in the backup
VM and without the passphrase; or, with ``--audit``, check with the passphrase that the snapshots present are the
policy's and all still verify (docs/REPOSITORY.md section 11).

    qvm-backup-prune -d VM --repo DIR --keep-last N --keep-daily D --keep-weekly W --keep-monthly M [--dry-run]
    qvm-backup-prune -d VM --repo DIR --keep-... --audit [-p FILE] [--expect-root ID]

The policy is restic's ``forget`` rules (``qubes_backup_protocol.retention``); the newest snapshot is always
kept.  A prune does not ask for confirmation (as restic's and borg's do not): ``--dry-run`` shows what it would
delete.  ``--audit`` only reads: it never prunes.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

from qubes_backup_protocol.retention import MAX_KEEP, Policy

from qubes_backup_dom0.cli import report
from qubes_backup_dom0.cli.common import (
    ArgumentParser,
    add_version,
    check_text_arg,
    emit_json,
    guard_output,
    human,
    raise_interrupt,
    run_cli,
    table,
    warn,
)
from qubes_backup_dom0.cli.passphrase import read_passphrase
from qubes_backup_dom0.cli.profile import KEEP_RULES, Profile, profile_passphrase, repository_profile
from qubes_backup_dom0.cli.repo import _source_vm, root_id_arg
from qubes_backup_dom0.errors import UsageError
from qubes_backup_dom0.qubes import prune as prune_mod
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import make_transport, stall_timeout
from qubes_backup_dom0.restore.audit import AuditResult, audit
from qubes_backup_dom0.restore.plan import RestoreOptions
from qubes_backup_dom0.restore.repository import RepoRestore


def keep_arg(value: str) -> int:
    if not value.isascii() or not value.isdigit() or int(value) > MAX_KEEP:
        raise argparse.ArgumentTypeError(f"a number from 0 to {MAX_KEEP}")
    return int(value)


def parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="qvm-backup-prune",
        description="Delete the snapshots of a repository that the retention policy does not keep (in the backup "
        "VM, without the passphrase; the newest snapshot is always kept), or with --audit check that the "
        "snapshots present are the policy's and still verify.",
    )  # fmt: skip
    p.add_argument("-d", "--dest-vm", dest="dest_vm", metavar="VM", help="the backup VM holding the repository")
    p.add_argument("--profile", metavar="NAME", help="the backup VM, repository, passphrase (for --audit) and, if it "
                   "has a keep: mapping, the policy from /etc/qubes/backup/NAME.conf (a profile qvm-backup "
                   "--save-profile wrote with --repo); --keep-... given here replace its policy")  # fmt: skip
    p.add_argument("--repo", metavar="DIR|URL", help="the repository, reached through the backup VM: a directory "
                   "in it, ssh://[USER@]HOST[:PORT]/DIR or s3://BUCKET/PREFIX")  # fmt: skip
    for rule, what in (("last", "the N newest snapshots"), ("daily", "the newest snapshot of each of the N newest "
                       "days that have one (UTC)"), ("weekly", "the same per ISO week"),
                       ("monthly", "the same per calendar month")):  # fmt: skip
        p.add_argument(f"--keep-{rule}", type=keep_arg, default=None, metavar="N", help=f"keep {what}")
    p.add_argument("-n", "--dry-run", action="store_true", help="show what would be deleted; delete nothing")
    p.add_argument("--audit", action="store_true",
                   help="do not prune: check (with the passphrase) that the snapshots present are exactly the ones "
                   "the policy keeps, by the repository's authenticated history, and verify each of them")  # fmt: skip
    p.add_argument("-p", "--passphrase-file", metavar="FILE", help="with --audit: read the passphrase from FILE "
                   "('-': stdin)")  # fmt: skip
    p.add_argument("--expect-root", metavar="ID", type=root_id_arg,
                   help="with --audit: the newest snapshot must be this root or a later one that records it (on a "
                   "dom0 that has no record of the repository yet)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout (docs/JSON.md)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the result line")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    add_version(p)
    return p


def _policy(args: argparse.Namespace, profile: Profile | None) -> Policy:
    """The command line's ``--keep-...`` counts; without any, the profile's ``keep:`` mapping."""
    given = [args.keep_last, args.keep_daily, args.keep_weekly, args.keep_monthly]
    if all(n is None for n in given) and profile is not None and profile.keep is not None:
        given = [profile.keep[rule] for rule in KEEP_RULES]
    try:
        return Policy(*(n or 0 for n in given))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _profile(args: argparse.Namespace, system: System) -> Profile | None:
    """``--profile NAME``: -d and --repo from a repository's profile (neither may be given as well)."""
    if args.profile is None:
        return None
    profile = repository_profile(system, args.profile, {"--repo": args.repo, "--dest-vm": args.dest_vm},
                                 "there is nothing to prune")  # fmt: skip
    args.repo, args.dest_vm = profile.repository, profile.destination_vm
    return profile


def _policy_doc(policy: Policy) -> dict[str, int]:
    return dict(policy.counts())


def run(args: argparse.Namespace) -> int:
    system = System.from_env()
    profile = _profile(args, system)
    if not args.repo:
        raise UsageError("--repo DIR|URL is needed: the repository (reached through the backup VM given with -d)")
    check_text_arg(args.repo, "the repository")
    policy = _policy(args, profile)
    if not args.audit and (args.passphrase_file or args.expect_root):
        raise UsageError("-p and --expect-root apply to --audit only: a prune needs no passphrase")
    stall_timeout()
    vm = _source_vm(system, args.dest_vm)
    signal.signal(signal.SIGTERM, raise_interrupt)
    if args.audit:
        return _audit(args, system, vm, policy, profile)
    try:
        result = prune_mod.prune(make_transport(system), vm, args.repo, policy, args.dry_run)
    except prune_mod.PruneDamaged as e:  # the findings first (the backup VM's words, made printable), then the line
        for line in e.lines:
            warn(f"backup VM {vm}: {line}")
        raise
    for warning in result.warnings:
        warn(warning)
    if args.json:
        emit_json(prune_document(result))
        return 0
    if not args.quiet:
        print(prune_table(result))
    print(prune_line(result))
    return 0


# ------------------------------------------------------------------------------------------------- prune

def _fate_text(s: prune_mod.SnapshotFate, dry_run: bool) -> str:
    if s.kept:
        return f"{'would keep' if dry_run else 'kept'}: {', '.join(s.reasons)}"
    return "would delete" if dry_run else "deleted"


def prune_table(r: prune_mod.PruneResult) -> str:
    """One row per snapshot the backup VM held before the prune (its word: names are not authenticated)."""
    rows = [[str(s.seq), s.created, _fate_text(s, r.dry_run)] for s in r.snapshots]
    return table(["snapshot", "created", "kept because / deleted"], rows)


def prune_line(r: prune_mod.PruneResult) -> str:
    t, n = r.totals, len(r.deleted)
    where = f"{r.vm}:{r.location}"
    snaps = f"{n} snapshot{'' if n == 1 else 's'}"
    freed = f"{t.objects_deleted} object{'' if t.objects_deleted == 1 else 's'}, {t.bytes_freed / (1 << 20):.1f} MiB"
    kept = f"{len(r.snapshots) - n} kept ({t.objects_kept} objects, {t.bytes_kept / (1 << 20):.1f} MiB)"
    if r.dry_run:
        return f"Dry run on {where}: would delete {snaps}, {freed}; {kept}; nothing was deleted"
    return f"{snaps} deleted from {where}, {freed} freed; {kept}"


def prune_document(r: prune_mod.PruneResult) -> dict[str, Any]:
    t = r.totals
    return {"version": report.JSON_VERSION, "command": "prune", "ok": True, "location": f"{r.vm}:{r.location}",
            "dry_run": r.dry_run, "policy": _policy_doc(r.policy),
            "snapshots": [{"snapshot": s.seq, "created": s.created, "name": s.name, "kept": s.kept,
                           "reasons": list(s.reasons)} for s in r.snapshots],
            "snapshots_deleted": len(r.deleted), "objects_deleted": t.objects_deleted, "bytes_freed": t.bytes_freed,
            "objects_kept": t.objects_kept, "bytes_kept": t.bytes_kept, "warnings": r.warnings}  # fmt: skip


# ------------------------------------------------------------------------------------------------- audit

def _audit(args: argparse.Namespace, system: System, vm: str, policy: Policy, profile: Profile | None) -> int:
    job = RepoRestore(system, args.repo, vm, options=RestoreOptions(verify_only=True), expect_root=args.expect_root)
    start = time.monotonic()
    try:
        job.connect()
        if profile is not None and not args.passphrase_file:
            job.passphrase = profile_passphrase(system, profile)
        else:
            job.passphrase = read_passphrase(args.passphrase_file, confirm=False, system_path=system.dom0_path)
        start = time.monotonic()
        job.open()
        result = audit(job, policy)
    finally:
        job.close()
    elapsed = time.monotonic() - start
    notes = list(job.notes)
    warnings = [*job.warnings, *([not_pruned(result)] if result.extra else [])]
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for warning in warnings:
        warn(warning)
    if args.json:
        emit_json(audit_document(result, policy, elapsed, notes, warnings))
        return 0
    if not args.quiet:
        print(audit_table(result))
    print(audit_line(result, elapsed))
    return 0


def not_pruned(r: AuditResult) -> str:
    seqs = ", ".join(map(str, r.extra[:20])) + (f" and {len(r.extra) - 20} more" if len(r.extra) > 20 else "")
    return (f"snapshot{'' if len(r.extra) == 1 else 's'} {seqs} not pruned yet: the policy deletes "
            f"{'it' if len(r.extra) == 1 else 'them'} (run qvm-backup-prune without --audit)")


def audit_table(r: AuditResult) -> str:
    rows = []
    for s in r.snapshots:
        state = ("verified" if s.seq in r.verified else "present") if s.present else "pruned"
        policy = f"keeps: {', '.join(s.keeps)}" if s.keeps else "deletes"
        rows.append([str(s.seq), s.created, s.root[:16], state, policy])
    return table(["snapshot", "created", "root", "state", "policy"], rows)


def audit_line(r: AuditResult, elapsed: float) -> str:
    kept = len(r.verified) - len(r.extra)
    extra = f"; {len(r.extra)} not pruned yet" if r.extra else ""
    return (f"Audited repository {r.repo_id} in {r.where}: the {kept} snapshot{'' if kept == 1 else 's'} the policy "
            f"keeps {'is' if kept == 1 else 'are'} present{extra}; {len(r.verified)} verified ({r.objects} objects, "
            f"{human(r.object_bytes)}) in {elapsed:.1f} s; newest {r.newest}, root {r.root}")  # fmt: skip


def audit_document(r: AuditResult, policy: Policy, elapsed: float, notes: list[str],
                   warnings: list[str]) -> dict[str, Any]:  # fmt: skip
    return {"version": report.JSON_VERSION, "command": "audit", "ok": True, "repository": r.repo_id,
            "location": r.where, "policy": _policy_doc(policy), "newest": r.newest, "root": r.root,
            "snapshots": [{"snapshot": s.seq, "created": s.created, "root": s.root, "present": s.present,
                           "policy_keeps": bool(s.keeps), "reasons": list(s.keeps), "verified": s.seq in r.verified}
                          for s in r.snapshots],
            "not_pruned": r.extra, "objects": r.objects, "object_bytes": r.object_bytes,
            "data_bytes": r.data_bytes, "seconds": round(elapsed, 3), "notes": notes, "warnings": warnings}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    guard_output()
    args_list = sys.argv[1:] if argv is None else argv
    p = parser()
    command = "audit" if "--audit" in args_list else "prune"
    if "--json" in args_list:
        p.json_command = command
    args = p.parse_args(args_list)
    return run_cli(lambda: run(args), args.debug, command if args.json else None)


if __name__ == "__main__":
    sys.exit(main())
