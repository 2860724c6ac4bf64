"""Restoring, verifying and listing the snapshots of a repository (docs/REPOSITORY.md section 8).

The same restore as a backup file's, from another source: ``open()`` verifies the header (the passphrase),
the newest root against dom0's record or ``--expect-root`` (no rollback, no fork, no other repository at
the same place), then the snapshot asked for (its root must be the newest or in the newest's authenticated
history) and its file lists and qubes.xml; from those it builds the manifest a backup file would carry and
runs it through the same strict checks (``manifest.parse``).  ``plan()`` is ``restore.plan``'s, ``run()``
drives ``restore.apply``'s Applier: VMs created through qubesd and tagged in progress, then every file's
blocks, fetched in order, each object verified before it is decrypted, into the same sinks (volume imports,
firewall and notes, dom0 home staging), then the commit; any failure removes what was created.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

from lxml import etree
from qubes_backup_protocol import repo as names

from qubes_backup_dom0.errors import BackupError, UsageError, VerificationError
from qubes_backup_dom0.format import extractor, repo, repotree
from qubes_backup_dom0.format import header as header_mod
from qubes_backup_dom0.format import manifest as manifest_mod
from qubes_backup_dom0.format.tarwriter import InnerFile
from qubes_backup_dom0.qubes import repostate
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.policy import PolicyFacts, read_policy
from qubes_backup_dom0.qubes.repoclient import RepoReader, RepoSession, Want, block_length, check_head, map_blocks
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import Transport, make_transport
from qubes_backup_dom0.restore import risk
from qubes_backup_dom0.restore.apply import Applier, Leftovers, clean_leftovers, find_leftovers
from qubes_backup_dom0.restore.extract import ArchiveTarget
from qubes_backup_dom0.restore.plan import RestoreOptions, RestorePlan, TargetSystem, plan_restore
from qubes_backup_dom0.restore.writer import Writer

ProgressCallback = Callable[[int, int], None]
CACHE_LIMIT = 64 << 20  # plaintext of blocks that recur later in the same file, kept instead of fetched again
STREAM_BLOCKS = 1 << 17  # files asked for as one stream (their maps held at once): 32 GiB of 256 KiB blocks


@dataclass(frozen=True)
class SnapshotInfo:
    seq: int
    created: str
    root: str
    present: bool  # its root is in the repository (else pruned, or withheld)


@dataclass
class Chosen:
    """The snapshot being restored, verified: its root, file lists (by archive member) and head."""

    root_id: str
    root: repotree.Root
    head_id: str
    head: repotree.Root
    trees: dict[str, repotree.Tree] = field(default_factory=dict)
    qubes_xml: bytes = b""  # its qubes.xml subset, verified


class RepoRestore:
    """Restore (or verify, or list) snapshot ``snapshot`` (None: the newest) of the repository ``location``
    in ``source_vm``: ``connect()``, ``open()``, ``plan()``, ``run()``, ``close()``."""

    def __init__(self, system: System, location: str, source_vm: str, passphrase: bytes = b"",
                 options: RestoreOptions = RestoreOptions(), snapshot: int | None = None,  # noqa: B008
                 expect_root: str | None = None, progress: ProgressCallback | None = None,
                 transport: Transport | None = None, qubes: Qubes | None = None) -> None:  # fmt: skip
        self.system = system
        self.location = location
        self.vm = source_vm
        self.passphrase = passphrase
        self.options = options
        self.snapshot = snapshot
        self.expect_root = expect_root
        self.progress = progress
        self.transport = transport
        self._qubes = qubes
        self.session: RepoSession | None = None
        self.reader: RepoReader | None = None
        self.header: repo.RepoHeader | None = None
        self.roots: list[str] = []
        self.chosen: Chosen | None = None
        self.manifest: manifest_mod.Manifest | None = None
        self.restore_plan: RestorePlan | None = None
        self.applier: Applier | None = None
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.leftovers = Leftovers()  # what killed restores left (found by plan(), cleaned by run())
        self.cleaned: list[str] = []
        self._policy: PolicyFacts | None = None
        self.restored: list[str] = []
        self.home_restored_to: object = None
        self._cancel = threading.Event()
        self._opening: tuple[bytes, bytes] | None = None
        self._done = 0
        self._total = 0  # the plan's data (a sum over every file: computed once, not per block)
        self._writer: Writer | None = None  # the sinks' writing thread while the blocks are fetched

    @property
    def where(self) -> str:
        return f"{self.vm}:{self.location}"

    @property
    def qubes(self) -> Qubes:
        if self._qubes is None:
            self._qubes = Qubes(self.system)
        return self._qubes

    # -- connecting and opening ----------------------------------------------------------------------

    def connect(self) -> repo.RepoHeader:
        """Start the agent and read the repository's (not yet authenticated) header and roots."""
        try:
            if self.session is None:
                self.session = RepoSession(self.transport or make_transport(self.system), "qubes.Restore", self.vm,
                                           self.location)  # fmt: skip
                opening = self.session.read_opening()
                if opening.header is None or opening.header_mac is None:
                    raise BackupError(f"{self.where} holds no repository")
                self.header = repo.parse_header(opening.header)
                self._opening = (opening.header, opening.header_mac)
                self.roots = opening.roots
            assert self.header is not None
            return self.header
        except BaseException:
            self._fail()
            raise

    def open(self) -> manifest_mod.Manifest:
        """Verify the header, the newest root and the snapshot asked for; returns its manifest."""
        try:
            header = self.connect()
            keys = repo.keys_from_passphrase(self.passphrase, header)
            assert self._opening is not None and self.session is not None
            if not repo.verify_header(keys, *self._opening):
                raise VerificationError(f"wrong passphrase, or the header of repository {self.where} was tampered "
                                        "with")  # fmt: skip
            others = [r for r in repostate.owners(self.system, self.where) if r != header.repo_id_hex]
            if others:
                raise VerificationError(f"{self.where} held repository {others[0]}, now it holds "
                                        f"{header.repo_id_hex}: refusing it")  # fmt: skip
            state = repostate.load(self.system, header.repo_id_hex)
            self.reader = RepoReader(self.session, header, keys, self._cancel.is_set)
            head = check_head(self.reader, self.roots, state, self.expect_root, self.where, self.notes)
            if head is None:
                raise BackupError(f"repository {header.repo_id_hex} in {self.where} holds no snapshot")
            self._record(state, *head)
            self.chosen = self._choose(*head)
            self.manifest = self._manifest(self.chosen)
            return self.manifest
        except BaseException:
            self._fail()
            raise

    def _record(self, state: repostate.RepoState | None, head_id: str, head: repotree.Root) -> None:
        """dom0 remembers the newest root it verified (and where it met the repository)."""
        if state is not None and state.seq >= head.seq and self.where in state.locations:
            return
        locations = [*(state.locations if state else []), self.where]
        seq, root, created = (head.seq, head_id, head.created)
        if state is not None and state.seq > head.seq:
            seq, root, created = state.seq, state.root, state.created
        try:
            repostate.save(self.system, repostate.RepoState(head.repo_id, seq, root, created, locations))
        except BackupError as e:
            self.warnings.append(f"could not record the repository's newest snapshot: {e}")

    def _choose(self, head_id: str, head: repotree.Root) -> Chosen:
        assert self.reader is not None
        n = self.snapshot
        if n is None or n == head.seq:
            return Chosen(head_id, head, head_id, head)
        if not 1 <= n < head.seq:
            raise UsageError(f"there is no snapshot {n}: the newest is {head.seq}")
        listed = [r for r in self.roots if names.root_seq(r) == n]
        if not listed:
            raise BackupError(f"snapshot {n} is not in the repository any more (pruned, or withheld by the backup "
                              "VM)")  # fmt: skip
        root_id, root = self.reader.root(listed[0])
        if head.history[n - 1] != root.entry(root_id):
            raise VerificationError(f"snapshot {n} is not the one the newest snapshot {head.seq} records (a fork, "
                                    "or mixed in from another repository)")  # fmt: skip
        return Chosen(root_id, root, head_id, head)

    def _manifest(self, chosen: Chosen) -> manifest_mod.Manifest:
        """The manifest a backup file of this snapshot would carry, through the same strict checks."""
        assert self.reader is not None
        root = chosen.root
        xml = chosen.qubes_xml = self.reader.qubes(root.qubes)
        trees = self.reader.trees([a.tree for a in root.archives])
        chosen.trees = {a.member: trees[a.tree] for a in root.archives}
        archives = [manifest_mod.ArchiveEntry(a.member, a.vm, a.kind, [
            manifest_mod.FileEntry(f.path, f.type, f.size, f.data) for f in chosen.trees[a.member].files])
            for a in root.archives]  # fmt: skip
        try:
            rendered = manifest_mod.Manifest(root.repo_id, root.created, archives, xml).render()
        except BackupError as e:
            raise VerificationError(f"snapshot {root.seq}: {e}") from None
        except etree.LxmlError:  # its qubes.xml (verified: written with the passphrase) is not XML
            raise VerificationError(f"snapshot {root.seq}: its qubes.xml is malformed") from None
        return manifest_mod.parse(rendered)

    def snapshots(self) -> list[SnapshotInfo]:
        """Every snapshot of the newest root's lineage (authenticated), and whether its root is present."""
        assert self.chosen is not None
        head = self.chosen.head
        present = {names.root_seq(r) for r in self.roots}
        entries = [*head.history, head.entry(self.chosen.head_id)]
        return [SnapshotInfo(h.seq, h.created, h.root, h.seq in present) for h in entries]

    # -- planning ------------------------------------------------------------------------------------

    def pseudo_header(self) -> header_mod.Header:
        """The backup-file header this snapshot stands for in the restore plan (id = the repository's)."""
        assert self.header is not None and self.chosen is not None
        h = self.header
        return header_mod.Header(h.repo_id, self.chosen.root.created, h.kdf, h.compression, h.block_size)

    def _target(self) -> TargetSystem:
        """As restore.machine's: this system's names (a killed restore's VMs counted as gone), defaults, user,
        qrexec policy and the VMs that could manage VMs being restored."""
        if self.options.verify_only:
            return TargetSystem(frozenset(), {})
        self.leftovers = find_leftovers(self.qubes, self.system.home_dir)
        names = frozenset(self.qubes.vm_list()) - self.leftovers.removed_names
        defaults = {p: self.qubes.global_property(p) or None
                    for p in ("default_template", "default_netvm", "default_dispvm")}  # fmt: skip
        self._policy = read_policy(self.system)
        return TargetSystem(names, defaults, self.system.user, self._policy, tuple(self._managers()))

    def _managers(self) -> list[str]:
        vms = {n: klass for n, (klass, _state) in self.qubes.vm_list().items()
               if klass != "AdminVM" and n not in self.leftovers.removed_names}  # fmt: skip
        tags = {n: self.qubes.tags(n) for n in vms}
        return risk.restore_managers(vms, tags, self._policy)

    def plan(self) -> RestorePlan:
        assert self.manifest is not None
        try:
            self.restore_plan = plan_restore(self._target(), self.pseudo_header(), self.manifest, self.options)
            return self.restore_plan
        except BaseException:
            self._fail()
            raise

    # -- running -------------------------------------------------------------------------------------

    def run(self) -> None:
        plan, chosen = self.restore_plan, self.chosen
        assert plan is not None and chosen is not None
        try:
            if plan.errors:
                raise BackupError(plan.errors[0])
            if not self.options.verify_only:
                if self.leftovers:  # the snapshot verified and the caller chose to run: now, not earlier
                    self.cleaned = clean_leftovers(self.qubes, self.leftovers, self.system.home_dir)
                    self.leftovers = Leftovers()
                managers = self._managers()  # again, just before the first VM tagged in progress exists
                if managers:
                    raise BackupError(risk.managers_error(managers))
                self.applier = Applier(self.qubes, plan, self.system.home_dir)
                self.applier.create_all()
            self._total = plan.data
            self._writer = Writer()
            self._restore_archives(plan, chosen)
            self._writer.drain()
            self._writer.close()
            if self.progress is not None and plan.data:
                self.progress(plan.data, plan.data)
            if self.applier is not None:
                self.applier.commit()
                self.restored = [a.target_name for a in plan.vms if a.restore and a.archive is not None]
                self.home_restored_to = self.applier.home_restored_to
                self.warnings += self.applier.warnings
        except BaseException:
            self._stop_writer()
            self._fail()
            raise
        finally:
            self._end_session()
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def _stop_writer(self) -> None:
        """After a failure: the writing thread drops what is queued and ends (its write under way, if any, as
        soon as the imports are aborted) before anything is rolled back."""
        if self._writer is None:
            return
        self._writer.stop()
        if self.applier is not None:
            self.applier.abort_imports()
        self._writer.join()

    def _restore_archives(self, plan: RestorePlan, chosen: Chosen) -> None:
        """Every wanted archive's files: fetched and opened here, written by the writing thread.  The files of
        consecutive VM archives are one stream of requests (the pipeline does not drain between files), up
        to STREAM_BLOCKS blocks; dom0's home is restored on its own, after everything before it was written."""
        assert self._writer is not None and self.reader is not None
        if self.applier is None:  # verified only
            verified: dict[str, int] = {}
            for archive in plan.wanted:
                for tf in chosen.trees[archive.member].files:
                    self._verify_file(tf, verified)
            return
        targets: dict[int, ArchiveTarget] = {}  # by id(archive): each archive's target made once
        stream: list[tuple[manifest_mod.ArchiveEntry, repotree.TreeFile]] = []
        blocks = 0
        for archive in plan.wanted:
            if archive.kind == "home":
                self._stream(stream, targets)
                stream, blocks = [], 0
                self._writer.drain()
                self._restore_home(chosen.trees[archive.member], self.applier.target_for(archive))
                continue
            for tf in chosen.trees[archive.member].files:
                if tf.type != "file":
                    continue
                n = -(-tf.data // self.reader.block_size)
                if stream and blocks + n > STREAM_BLOCKS:
                    self._stream(stream, targets)
                    stream, blocks = [], 0
                stream.append((archive, tf))
                blocks += n
        self._stream(stream, targets)

    def _count(self, n: int) -> None:
        self._done += n
        if self.progress is not None:
            self.progress(min(self._done, self._total), self._total)

    def _verify_file(self, tf: repotree.TreeFile, verified: dict[str, int]) -> None:
        """One regular file's blocks verified, each distinct object once per restore."""
        assert self.reader is not None
        if tf.type != "file":
            return
        bs = self.reader.block_size
        wants = []
        for index, did in self.reader.blocks(tf):
            length = block_length(tf, index, bs)
            if did in verified:
                if verified[did] != length:
                    raise VerificationError(f"{tf.path[:80]}: block {index} has the wrong length")
                self._count(length)
                continue
            verified[did] = length
            wants.append(Want(did, repo.DATA, length))
        for opened in self.reader.fetch(wants):
            self._count(len(opened.plaintext))

    def _maps(self, files: list[repotree.TreeFile]) -> list[list[tuple[int, str]]]:
        """(block number, data id) of each of ``files``, their map segments fetched in one stream (each
        distinct segment once)."""
        assert self.reader is not None
        distinct = list(dict.fromkeys(sid for tf in files for _, sid in tf.segments))
        blocks = {sid: seg.blocks for sid, seg in zip(distinct, self.reader.segments(distinct), strict=True)}
        bs = self.reader.block_size
        return [map_blocks(tf, [blocks[sid] for _, sid in tf.segments], bs) for tf in files]

    def _stream(self, files: list[tuple[manifest_mod.ArchiveEntry, repotree.TreeFile]],
                targets: dict[int, ArchiveTarget]) -> None:  # fmt: skip
        """Regular ``files`` in order, each into its sink (created when its turn comes; a file without one is
        verified and dropped), their blocks fetched as one stream."""
        assert self.reader is not None and self.applier is not None and self._writer is not None
        if not files:
            return
        bs = self.reader.block_size
        steps = [_steps(tf, blocks, bs) for (_, tf), blocks in zip(files, self._maps([tf for _, tf in files]),
                                                                    strict=True)]  # fmt: skip
        fetched = self.reader.fetch(Want(did, repo.DATA, block_length(tf, index, bs))
                                    for (_, tf), plan in zip(files, steps, strict=True)
                                    for index, did, fetch, _ in plan if fetch)  # fmt: skip
        writer = self._writer
        for (archive, tf), plan in zip(files, steps, strict=True):
            target = targets.get(id(archive))
            if target is None:
                target = targets[id(archive)] = self.applier.target_for(archive)
            sink = None
            if target.sinks is not None:
                sink = target.sinks(InnerFile(tf.path, type="file", size=tf.size, data=tf.data))
            for index, plain in _in_order(tf, plan, fetched, bs):
                if sink is not None:
                    writer.put(partial(sink.write_at, index * bs, memoryview(plain)), len(plain))
                self._count(len(plain))
            if sink is not None:
                writer.put(partial(sink.finish, tf.size))
        if next(fetched, None) is not None:
            raise VerificationError("the backup VM sent more blocks than were asked for")

    def _blocks_in_order(self, tf: repotree.TreeFile, blocks: list[tuple[int, str]]) -> Iterator[tuple[int, bytes]]:
        """(block number, plaintext) of one file in block order (see ``_steps``)."""
        assert self.reader is not None
        bs = self.reader.block_size
        plan = _steps(tf, blocks, bs)
        wants = (Want(did, repo.DATA, block_length(tf, index, bs)) for index, did, fetch, _ in plan if fetch)
        return _in_order(tf, plan, self.reader.fetch(wants), bs)

    def _restore_home(self, tree: repotree.Tree, target: ArchiveTarget) -> None:
        """dom0's home into its staging directory, confined (extractor's destination: directory fds,
        O_NOFOLLOW, O_EXCL), directory modes and times applied at the end."""
        assert target.dest is not None and self.reader is not None
        target.dest.mkdir(mode=0o700)
        fs = extractor.Filesystem(None)
        fs.open_root(target.dest)
        bs = self.reader.block_size
        try:
            for tf in tree.files:
                if tf.type == "dir":
                    fs.make_dir(tf.path, tf.mode, tf.mtime)
                elif tf.type == "symlink":
                    assert tf.link is not None
                    fs.make_symlink(tf.path, tf.link, tf.mtime)
                else:
                    entry = InnerFile(tf.path, type="file", size=tf.size, data=tf.data)
                    fs.open_file(entry)
                    for index, plain in self._blocks_in_order(tf, self.reader.blocks(tf)):
                        fs.write_at(index * bs, memoryview(plain))
                        self._count(len(plain))
                    fs.end_file(entry, tf.mode, tf.mtime)
            fs.finish()
        except extractor.Refused as e:
            raise VerificationError(f"dom0 home: {e}") from None
        finally:
            fs.close()

    # -- ending --------------------------------------------------------------------------------------

    def cancel(self) -> None:
        self._cancel.set()
        if self.session is not None and self.session.channel.proc.poll() is None:
            self.session.channel.proc.kill()
        if self.applier is not None:
            self.applier.abort_imports()

    def _end_session(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.session is not None:
            self.session.close()
            self.session = None

    def _fail(self) -> None:
        """Undo everything after a failure (called while its exception is handled, which is re-raised; if the
        rollback itself fails, the error says both)."""
        original = sys.exc_info()[1]
        self._end_session()
        if self.applier is not None and not self.applier.committed:
            applier, self.applier = self.applier, None
            try:
                applier.rollback()
            except BackupError as e:
                raise BackupError(f"{original}; {e}" if original is not None else str(e)) from None

    def close(self) -> None:
        self._end_session()
        if self.applier is not None and not self.applier.committed:
            applier, self.applier = self.applier, None
            applier.rollback()


Step = tuple[int, str, bool, bool]  # (block number, data id, fetch it, keep it afterwards)


def _steps(tf: repotree.TreeFile, blocks: list[tuple[int, str]], bs: int) -> list[Step]:
    """How one file's blocks are had, in block order: an object that recurs later in the file is kept (up to
    CACHE_LIMIT) instead of being fetched again."""
    remaining = Counter(did for _, did in blocks)
    steps: list[Step] = []
    cached: set[str] = set()
    cache_bytes = 0
    for index, did in blocks:
        remaining[did] -= 1
        later = remaining[did] > 0
        if did in cached:
            steps.append((index, did, False, later))
            if not later:
                cached.discard(did)
                cache_bytes -= bs
            continue
        keep = later and cache_bytes + bs <= CACHE_LIMIT
        if keep:
            cached.add(did)
            cache_bytes += bs
        steps.append((index, did, True, keep))
    return steps


def _in_order(tf: repotree.TreeFile, steps: list[Step], fetched: Iterator[repo.Opened],
              bs: int) -> Iterator[tuple[int, bytes]]:  # fmt: skip
    """(block number, plaintext) of one file following ``steps``, the fetched ones taken from ``fetched``."""
    cache: dict[str, bytes] = {}
    for index, did, fetch, keep in steps:
        if fetch:
            got = next(fetched, None)
            if got is None:
                raise VerificationError(f"{tf.path[:80]}: block {index} was not sent")
            plain = got.plaintext
        else:
            plain = cache[did]
        if len(plain) != block_length(tf, index, bs):
            raise VerificationError(f"{tf.path[:80]}: block {index} has the wrong length")
        if keep:
            cache[did] = plain
        else:
            cache.pop(did, None)
        yield index, plain
