"""``qvm-backup-prune --audit``: are the snapshots the backup VM kept the ones the policy keeps, and do they all
still verify?  (docs/REPOSITORY.md section 11.)  It only reads: nothing is pruned, nothing restored.

With the passphrase, over qubes.Restore (read-only, the repository's lock shared), as a restore opens it
(``RepoRestore.open``): the header's MAC, the newest root against dom0's record or ``--expect-root``.  The
newest root's authenticated history (number, root id, creation time of every earlier snapshot, pruned or not)
is what the policy is applied to (``retention.reasons``), so the verdict does not depend on what the backup VM
lists or says:

- a snapshot the policy keeps whose root is missing: the backup VM deleted (or withholds) it; refused, exit 3;
- a snapshot present that the policy would delete: a warning, "not pruned yet";
- then every snapshot present is verified as ``--verify-only --all-snapshots`` verifies it
  (``repoverify.AllSnapshots``): its root (the entry of the newest root's history with its number), qubes.xml
  subset and file lists (the manifest a backup file would carry, through the same strict checks), its maps and
  every data block, each distinct object fetched and MAC-checked once across all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qubes_backup_protocol import retention
from qubes_backup_protocol.retention import Policy

from qubes_backup_dom0.errors import VerificationError
from qubes_backup_dom0.restore.repository import RepoRestore
from qubes_backup_dom0.restore.repoverify import AllSnapshots


@dataclass(frozen=True)
class AuditSnapshot:
    seq: int
    created: str  # authenticated: from the newest root's history
    root: str
    present: bool
    keeps: tuple[str, ...]  # why the policy keeps it; empty: the policy deletes it


@dataclass
class AuditResult:
    repo_id: str
    where: str
    newest: int
    root: str
    snapshots: list[AuditSnapshot]
    extra: list[int]  # present, but the policy deletes them: not pruned yet
    verified: list[int] = field(default_factory=list)
    objects: int = 0  # objects fetched and verified
    object_bytes: int = 0
    data_bytes: int = 0  # plaintext of the distinct data blocks verified


def _numbers(seqs: list[int]) -> str:
    return ", ".join(map(str, seqs[:20])) + (f" and {len(seqs) - 20} more" if len(seqs) > 20 else "")


def compare(job: RepoRestore, policy: Policy) -> tuple[list[AuditSnapshot], list[int]]:
    """Every snapshot of the newest root's lineage with the policy's verdict; raises if one the policy keeps is
    missing.  Returns them and the numbers present that the policy would delete."""
    infos = job.snapshots()
    why = retention.reasons([(s.seq, retention.parse_time(s.created)) for s in infos], policy)
    snaps = [AuditSnapshot(s.seq, s.created, s.root, s.present, tuple(why.get(s.seq, ()))) for s in infos]
    missing = [s.seq for s in snaps if s.keeps and not s.present]
    if missing:
        assert job.header is not None
        word = "snapshot" if len(missing) == 1 else "snapshots"
        raise VerificationError(
            f"{word} {_numbers(missing)} of repository {job.header.repo_id_hex} in {job.where} "
            f"{'is' if len(missing) == 1 else 'are'} kept by the policy {policy.describe()} but missing: the backup "
            f"VM deleted or withholds {'it' if len(missing) == 1 else 'them'}")  # fmt: skip
    return snaps, [s.seq for s in snaps if s.present and not s.keeps]


def audit(job: RepoRestore, policy: Policy) -> AuditResult:
    """``job`` opened (``RepoRestore.open()``: header, newest root checked against dom0's record).  Compares
    the snapshots present with the policy's, then verifies every one present (``repoverify.AllSnapshots``:
    each distinct object once; a snapshot that fails does not stop the others, and the error names them all)."""
    assert job.chosen is not None and job.header is not None and job.reader is not None
    head, head_id = job.chosen.head, job.chosen.head_id
    snaps, extra = compare(job, policy)
    result = AuditResult(job.header.repo_id_hex, job.where, head.seq, head_id, snaps, extra)
    checker = AllSnapshots(job)
    checks = checker.run()
    failed = [c for c in checks if not c.ok]
    if failed:
        first = failed[0].error or "failed"
        first = first if first.startswith("snapshot ") else f"snapshot {failed[0].seq}: {first}"
        more = ""
        if len(failed) > 1:
            more = f" (and {len(failed) - 1} more: snapshots {_numbers([c.seq for c in failed])})"
        raise VerificationError(first + more)
    result.verified = sorted(c.seq for c in checks)
    result.objects, result.object_bytes = checker.fetched, checker.fetched_bytes
    result.data_bytes = checker.data_bytes
    return result
