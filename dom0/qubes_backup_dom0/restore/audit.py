"""``qvm-backup-prune --audit``: are the snapshots the backup VM kept the ones the policy keeps, and do they all
still verify?  (docs/REPOSITORY.md section 11.)  It only reads: nothing is pruned, nothing restored.

With the passphrase, over qubes.Restore (read-only, the repository's lock shared), as a restore opens it
(``RepoRestore.open``): the header's MAC, the newest root against dom0's record or ``--expect-root``.  The
newest root's authenticated history (number, root id, creation time of every earlier snapshot, pruned or not)
is what the policy is applied to (``retention.reasons``), so the verdict does not depend on what the backup VM
lists or says:

- a snapshot the policy keeps whose root is missing: the backup VM deleted (or withholds) it; refused, exit 3;
- a snapshot present that the policy would delete: a warning, "not pruned yet";
- then every snapshot present is verified like ``--verify-only``: its root (the entry of the newest root's
  history with its number), qubes.xml subset and file lists (the manifest a backup file would carry, through
  the same strict checks), its maps and every data block, each distinct object fetched and MAC-checked once
  across all of them (except the newest snapshot's qubes.xml subset, read by ``open()``: fetched again if an
  older snapshot has the very same one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree
from qubes_backup_protocol import repo as names
from qubes_backup_protocol import retention
from qubes_backup_protocol.retention import Policy

from qubes_backup_dom0.errors import BackupError, VerificationError
from qubes_backup_dom0.format import manifest as manifest_mod
from qubes_backup_dom0.format import repo, repotree
from qubes_backup_dom0.qubes.repoclient import RepoReader, Want, block_length
from qubes_backup_dom0.restore.repository import RepoRestore


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


class _Verifier:
    """Verifies snapshots of one reader, each distinct object once across all of them."""

    def __init__(self, reader: RepoReader) -> None:
        self.reader = reader
        self.trees: dict[str, repotree.Tree] = {}
        self.xml: dict[str, bytes] = {}
        self.segments: dict[tuple[str, int, int], int] = {}  # (segment id, number, file size) -> bytes it covers
        self.blocks: dict[str, int] = {}  # data id -> its length
        self.data_bytes = 0

    def snapshot(self, root: repotree.Root, checked: dict[str, repotree.Tree] | None = None) -> None:
        """Snapshot ``root`` (verified); ``checked``: its file lists by archive member when its manifest was
        checked already (the newest, by ``RepoRestore.open``)."""
        if checked is not None:
            self.trees.update({a.tree: checked[a.member] for a in root.archives})
        else:
            self._manifest(root)
        for a in root.archives:
            for tf in self.trees[a.tree].files:
                if tf.type == "file":
                    self._file(tf)

    def _manifest(self, root: repotree.Root) -> None:
        """The manifest a backup file of this snapshot would carry, through the same strict checks."""
        if root.qubes not in self.xml:
            self.xml[root.qubes] = self.reader.qubes(root.qubes)
        wanted = list(dict.fromkeys(a.tree for a in root.archives if a.tree not in self.trees))
        self.trees.update(self.reader.trees(wanted))
        archives = [manifest_mod.ArchiveEntry(a.member, a.vm, a.kind, [
            manifest_mod.FileEntry(f.path, f.type, f.size, f.data) for f in self.trees[a.tree].files])
            for a in root.archives]  # fmt: skip
        try:
            rendered = manifest_mod.Manifest(root.repo_id, root.created, archives, self.xml[root.qubes]).render()
        except BackupError as e:
            raise VerificationError(f"snapshot {root.seq}: {e}") from None
        except etree.LxmlError:  # its qubes.xml (verified: written with the passphrase) is not XML
            raise VerificationError(f"snapshot {root.seq}: its qubes.xml is malformed") from None
        manifest_mod.parse(rendered)

    def _file(self, tf: repotree.TreeFile) -> None:
        bs = self.reader.block_size
        nblocks = -(-tf.size // bs)
        new = [(n, sid) for n, sid in tf.segments if (sid, n, tf.size) not in self.segments]
        wants: list[Want] = []
        for (n, sid), seg in zip(new, self.reader.segments([sid for _, sid in new]), strict=True):
            covered = 0
            for k, did in seg.blocks:
                index = n * repo.SEGMENT_BLOCKS + k
                if index >= nblocks:
                    raise VerificationError(f"{tf.path[:80]}: a map segment names a block past the end of the file")
                length = block_length(tf, index, bs)
                covered += length
                if did in self.blocks:
                    if self.blocks[did] != length:
                        raise VerificationError(f"{tf.path[:80]}: block {index} has the wrong length")
                    continue
                self.blocks[did] = length
                wants.append(Want(did, repo.DATA, length))
            self.segments[(sid, n, tf.size)] = covered
        stored = sum(self.segments[(sid, n, tf.size)] for n, sid in tf.segments)
        if stored != tf.data:
            raise VerificationError(f"{tf.path[:80]}: its map covers {stored} bytes, its file list says {tf.data}")
        for opened in self.reader.fetch(wants):
            self.data_bytes += len(opened.plaintext)


def audit(job: RepoRestore, policy: Policy) -> AuditResult:
    """``job`` opened (``RepoRestore.open()``: header, newest root checked against dom0's record).  Compares
    the snapshots present with the policy's, then verifies every one present."""
    assert job.chosen is not None and job.header is not None and job.reader is not None
    head, head_id = job.chosen.head, job.chosen.head_id
    snaps, extra = compare(job, policy)
    result = AuditResult(job.header.repo_id_hex, job.where, head.seq, head_id, snaps, extra)
    verifier = _Verifier(job.reader)
    listed = {names.root_seq(r): r for r in job.roots}
    present = [s for s in snaps if s.present]
    for s in [*present[-1:], *present[:-1]]:  # the newest first: its file lists are known (open() read them)
        if s.seq == head.seq:
            root_id, root = head_id, head
        else:
            root_id, root = job.reader.root(listed[s.seq])
            if head.history[s.seq - 1] != root.entry(root_id):
                raise VerificationError(f"snapshot {s.seq} is not the one the newest snapshot {head.seq} records (a "
                                        "fork, or mixed in from another repository)")  # fmt: skip
        try:
            verifier.snapshot(root, job.chosen.trees if s.seq == head.seq else None)
        except VerificationError as e:
            text = str(e)
            raise VerificationError(text if text.startswith("snapshot ") else f"snapshot {s.seq}: {text}") from None
        result.verified.append(s.seq)
    result.verified.sort()
    result.objects, result.object_bytes = job.reader.fetched, job.reader.fetched_bytes
    result.data_bytes = verifier.data_bytes
    return result
