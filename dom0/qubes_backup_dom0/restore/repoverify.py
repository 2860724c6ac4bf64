"""``--verify-only --all-snapshots`` (docs/REPOSITORY.md section 8): every snapshot still present in a
repository verified, each distinct object fetched and checked once across all of them.

After ``RepoRestore.open()`` (header, passphrase, the newest root against dom0's record), each listed root,
oldest first: verified, and (except the newest) exactly the entry of the newest root's authenticated history;
its qubes.xml subset and file lists through the checks of a restore (``manifest.parse``), every file's map
segments and data blocks.  Objects already verified for an earlier snapshot (same id, same type, for a data
block the same length) are not fetched again: snapshots share most of them.  A snapshot that fails gets its
line and the others are still checked: a failure mid-session desynchronises the pipelined requests (or the
agent exits on an object it cannot send), so the session is opened again, with the same keys, and must list
the same header and roots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lxml import etree
from qubes_backup_protocol import repo as names

from qubes_backup_dom0.errors import BackupError, Cancelled, VerificationError
from qubes_backup_dom0.format import manifest as manifest_mod
from qubes_backup_dom0.format import repo, repotree
from qubes_backup_dom0.qubes.repoclient import RepoReader, RepoSession, Want, block_length
from qubes_backup_dom0.qubes.transport import make_transport
from qubes_backup_dom0.restore.repository import RepoRestore


@dataclass
class SnapshotCheck:
    seq: int
    created: str
    root: str
    ok: bool
    error: str | None = None
    objects: int = 0  # objects fetched for this snapshot (not already verified for an earlier one)
    data: int = 0  # bytes of data this snapshot's files hold (holes excluded)


class _Seen:
    """What was verified so far, across snapshots: parsed file lists and segments, data ids and lengths."""

    def __init__(self) -> None:
        self.trees: dict[str, repotree.Tree] = {}
        self.segments: dict[str, repotree.Segment] = {}
        self.qubes: dict[str, bytes] = {}
        self.data: dict[str, int] = {}


class AllSnapshots:
    def __init__(self, job: RepoRestore, on_check: Callable[[SnapshotCheck], None] | None = None) -> None:
        assert job.reader is not None and job.chosen is not None and job.header is not None
        self.job = job
        self.keys = job.reader.keys
        self.head_id, self.head = job.chosen.head_id, job.chosen.head
        self.seen = _Seen()
        chosen = job.chosen  # what open() verified of the newest snapshot is not fetched again
        self.seen.trees = {a.tree: chosen.trees[a.member] for a in chosen.root.archives}
        self.seen.qubes = {chosen.root.qubes: chosen.qubes_xml}
        self.on_check = on_check  # told each snapshot's result as soon as it is known
        self.fetched = 0  # objects fetched in all (tests: each distinct object once)
        self.fetched_bytes = 0

    @property
    def reader(self) -> RepoReader:
        assert self.job.reader is not None
        return self.job.reader

    def run(self) -> list[SnapshotCheck]:
        out = []
        for name in self.job.roots:
            seq = names.root_seq(name)
            entry = self.head.entry(self.head_id) if seq == self.head.seq else (
                self.head.history[seq - 1] if seq < self.head.seq else None)  # fmt: skip
            check = SnapshotCheck(seq, entry.created if entry else "", entry.root if entry else "", False)
            before = self._count()
            try:
                if entry is None:
                    raise VerificationError(f"snapshot {seq} is newer than the newest verified snapshot")
                self._snapshot(name, entry, check)
                check.ok = True
            except Cancelled:
                raise
            except BackupError as e:
                check.error = str(e)
                self._reconnect()
            check.objects = self._count() - before
            out.append(check)
            if self.on_check is not None:
                self.on_check(check)
        self.fetched = self._count()
        if self.job.reader is not None:
            self.fetched_bytes += self.job.reader.fetched_bytes
            self.job.reader.fetched = self.job.reader.fetched_bytes = 0
        self.job.close()
        return out

    @property
    def data_bytes(self) -> int:
        """The plaintext of the distinct data blocks verified."""
        return sum(self.seen.data.values())

    def _count(self) -> int:
        return self.fetched + (self.job.reader.fetched if self.job.reader is not None else 0)

    def _reconnect(self) -> None:
        job = self.job
        old = job._opening
        roots = job.roots
        if job.reader is not None:
            self.fetched += job.reader.fetched
            self.fetched_bytes += job.reader.fetched_bytes
        job._end_session()
        session = RepoSession(job.transport or make_transport(job.system), "qubes.Restore", job.vm, job.location)
        job.session = session
        opening = session.read_opening()
        if (opening.header, opening.header_mac) != old or opening.roots != roots:
            raise VerificationError(f"the repository in {job.where} changed while it was verified")
        assert job.header is not None
        job.reader = RepoReader(session, job.header, self.keys, job._cancel.is_set)

    def _snapshot(self, name: str, entry: repotree.HistoryEntry, check: SnapshotCheck) -> None:
        if entry.seq == self.head.seq:
            root_id, root = self.head_id, self.head
        else:
            root_id, root = self.reader.root(name)
        if root.entry(root_id) != entry:
            raise VerificationError(f"snapshot {entry.seq} is not the one the newest snapshot {self.head.seq} "
                                    "records (a fork, or mixed in from another repository)")  # fmt: skip
        if root.qubes not in self.seen.qubes:
            self.seen.qubes[root.qubes] = self.reader.qubes(root.qubes)
        missing = [a.tree for a in root.archives if a.tree not in self.seen.trees]
        self.seen.trees.update(self.reader.trees(missing))
        archives = [manifest_mod.ArchiveEntry(a.member, a.vm, a.kind, [
            manifest_mod.FileEntry(f.path, f.type, f.size, f.data) for f in self.seen.trees[a.tree].files])
            for a in root.archives]  # fmt: skip
        try:
            rendered = manifest_mod.Manifest(root.repo_id, root.created, archives, self.seen.qubes[root.qubes])
            manifest_mod.parse(rendered.render())
        except BackupError as e:
            raise VerificationError(f"snapshot {root.seq}: {e}") from None
        except etree.LxmlError:  # its qubes.xml (verified: written with the passphrase) is not XML
            raise VerificationError(f"snapshot {root.seq}: its qubes.xml is malformed") from None
        for a in root.archives:
            for f in self.seen.trees[a.tree].files:
                if f.type == "file":
                    self._file(f)
                    check.data += f.data

    def _file(self, f: repotree.TreeFile) -> None:
        """Its segments (each distinct one fetched once), the checks of ``RepoReader.blocks``, then its data
        blocks not verified yet."""
        bs = self.reader.block_size
        new = list(dict.fromkeys(sid for _, sid in f.segments if sid not in self.seen.segments))
        for sid, seg in zip(new, self.reader.segments(new), strict=True):
            self.seen.segments[sid] = seg
        nblocks, stored = -(-f.size // bs), 0
        wants: list[Want] = []
        for n, sid in f.segments:
            for k, did in self.seen.segments[sid].blocks:
                index = n * repo.SEGMENT_BLOCKS + k
                if index >= nblocks:
                    raise VerificationError(f"{f.path[:80]}: a map segment names a block past the end of the file")
                length = block_length(f, index, bs)
                stored += length
                known = self.seen.data.get(did)
                if known is None:
                    self.seen.data[did] = length
                    wants.append(Want(did, repo.DATA, length))
                elif known != length:
                    raise VerificationError(f"{f.path[:80]}: block {index} has the wrong length")
        if stored != f.data:
            raise VerificationError(f"{f.path[:80]}: its map covers {stored} bytes, its file list says {f.data}")
        try:
            for _opened in self.reader.fetch(wants):
                pass
        except BaseException:
            for w in wants:  # not verified after all: another snapshot holding them fetches them again
                self.seen.data.pop(w.name, None)
            raise
