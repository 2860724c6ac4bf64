"""``qubes-backup-agent``: commands run inside the backup VM (by cron or by hand), not over qrexec.

    qubes-backup-agent prune --repo DIR --keep-last N --keep-daily D --keep-weekly W --keep-monthly M
                             [--dry-run] [--json] [--debug]

Exit codes (docs/EXIT-CODES.md): 0 done, 1 failed (the repository cannot be read or written, or is in use by
a backup or another prune), 2 bad usage, 3 a retained snapshot is damaged (nothing deleted), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback
from typing import NoReturn

from qubes_backup_protocol.retention import Policy

from . import confine
from .common import one_line, silence
from .prune import PruneReport, prune_location
from .storage import StorageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DAMAGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
PROG = "qubes-backup-agent"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a count: {text!r}")
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Commands of the qubes-backup agent, run inside the backup VM.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    pr = sub.add_parser("prune", help="delete the snapshots a retention policy drops, and unreferenced objects",
                        description="Keyless prune of a repository (no passphrase): keeps the snapshots the "
                        "policy keeps (always the newest), deletes the others and every object no kept snapshot "
                        "references.")  # fmt: skip
    pr.add_argument("--repo", required=True, metavar="DIR|URL",
                    help="the repository: a directory, ssh://[USER@]HOST[:PORT]/DIR or s3://BUCKET/PREFIX")
    for rule, what in (("last", "the N newest snapshots"), ("daily", "the newest snapshot of each of the N "
                       "newest days"), ("weekly", "... of each of the N newest ISO weeks"),
                       ("monthly", "... of each of the N newest months")):  # fmt: skip
        pr.add_argument(f"--keep-{rule}", type=_count, default=0, metavar="N", help=f"keep {what} (UTC)")
    pr.add_argument("--dry-run", action="store_true", help="report what would be deleted; delete nothing")
    pr.add_argument("--json", action="store_true", help="the report as one JSON document on stdout")
    pr.add_argument("--debug", action="store_true", help="on an internal error, its traceback on stderr too")
    return p


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def human(report: PruneReport, view: str, policy: Policy) -> str:
    damaged = report.damage_count > 0
    verb = "to delete" if report.dry_run else "deleted"
    freed = "to free" if report.dry_run else "freed"
    head = "Dry run, nothing deleted" if report.dry_run else "Nothing deleted" if damaged else "Pruned"
    lines = [f"{head}: repository {view}, policy {policy.describe()}"]
    for fate in reversed(report.snapshots):
        fate_text = f"kept ({', '.join(fate.reasons)})" if fate.kept else "would be deleted" if (
            report.dry_run or damaged) else "deleted"  # fmt: skip
        lines.append(f"  snapshot {fate.seq:>6}  {fate.created}  {fate_text}")
    dropped = sum(not f.kept for f in report.snapshots)
    kept = len(report.snapshots) - dropped
    if damaged:
        lines.append(f"Damaged: {report.damage_count} finding(s) in kept snapshots:")
        lines += [f"  {line}" for line in report.damaged]
        if report.damage_count > len(report.damaged):
            lines.append(f"  ... and {report.damage_count - len(report.damaged)} more")
    else:
        lines.append(f"Snapshots: {kept} kept, {dropped} {verb}. Objects: {report.objects_kept} kept "
                     f"({_mib(report.bytes_kept)}), {report.objects_deleted} {verb} "
                     f"({_mib(report.bytes_freed)} {freed}).")  # fmt: skip
    return "\n".join(lines)


def _emit(text: str) -> None:
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away: what could not be written is dropped, the work is not
        silence(sys.stdout.buffer)


def _fail(code: int, message: str, as_json: bool) -> int:
    line = one_line(message)
    print(f"{PROG}: {line}" if code == EXIT_INTERRUPTED else f"{PROG}: error: {line}", file=sys.stderr)
    if as_json:
        _emit(json.dumps({"command": "prune", "error": line, "exit_code": code}))
    return code


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    args_list = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args_list
    try:
        args = parser().parse_args(args_list)
        policy = Policy(args.keep_last, args.keep_daily, args.keep_weekly, args.keep_monthly)
    except UsageError as exc:
        return _fail(EXIT_USAGE, f"{exc} (see {PROG} prune --help)", as_json)
    except ValueError as exc:
        return _fail(EXIT_USAGE, str(exc), as_json)
    root = confine.agent_root()
    try:
        remote = args.repo.startswith(("ssh://", "s3://"))  # a URL, as the user wrote it (repostore/)
        view = args.repo if remote else confine.vm_view(confine.resolve(args.repo, root), root)
        report = prune_location(args.repo, root, policy, args.dry_run)
    except (StorageError, confine.ConfinementError) as exc:
        return _fail(EXIT_FAILED, str(exc), as_json)
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted: every kept snapshot is whole; run the prune again to complete it",
                     as_json)  # fmt: skip
    except OSError as exc:
        return _fail(EXIT_FAILED, f"{exc.strerror or exc} pruning {args.repo}", as_json)
    except Exception as exc:  # a bug: one line all the same (every kept snapshot is whole, section 11)
        if args.debug:
            traceback.print_exc()
        hint = "" if args.debug else " (run with --debug for details)"
        return _fail(EXIT_FAILED, f"internal error: {type(exc).__name__}: {exc}{hint}", as_json)
    code = EXIT_DAMAGED if report.damage_count else EXIT_OK
    if args.json:
        doc = {"command": "prune", "repository": view, "policy": dict(policy.counts()), **report.to_json(),
               "exit_code": code}  # fmt: skip
        _emit(json.dumps(doc, indent=2))
    else:
        _emit(human(report, view, policy))
    if code == EXIT_DAMAGED:
        print(f"{PROG}: error: repository {view} is damaged: {report.damage_count} object(s) of kept snapshots missing "
              "or malformed; nothing deleted (verify from dom0 with qvm-backup-restore --verify-only)",
              file=sys.stderr)  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
