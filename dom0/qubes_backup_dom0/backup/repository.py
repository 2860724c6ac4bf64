"""A backup into a repository (docs/REPOSITORY.md section 7): a complete snapshot that sends only what the
repository does not hold yet, as far as dom0 verified.

The plan is ``backup.plan``'s (VMs in restore order, each volume's committed state opened and held until it is
read; planned with ``zeros=False``: a volume read in full is not scanned for zero runs first, its allocation map
says what to read and the all-zero blocks are dropped here as they are read).  Then, with the repository's
session open:

1. the newest root is fetched and verified, and checked against dom0's record (repostate) or ``--expect-root``:
   a repository behind dom0's record, a fork or another repository at the same place is refused;
2. its file lists are fetched and, for each file backed up again, that file's map segments (from dom0's
   cache when it is of that very root): the data ids in them are what dom0 may reference without sending
   (dom0 dedups only against what it verified, or its own cache of that root says);
3. every file is cut into fixed blocks (the repository's block size); a block without data is a hole, never
   stored; every other block gets its keyed id and, unless the parent or this run has it, is compressed,
   encrypted and MACed into an object: worker threads take batches of up to BATCH_BYTES, read each run of
   data with one read into a buffer of their own (the kernel asked to read ADVISE_AHEAD batches ahead), and
   hand back ids and objects; the objects go to the agent in DATA frames of about FRAME_BYTES; segments,
   file lists and the qubes.xml subset likewise;
4. the archives of the parent this run does not read (not named, or the VM is gone) are carried forward
   unchanged (their verified file lists referenced), unless ``--forget``; the qubes.xml subset merges the
   parent's for them (``carry``);
5. the new root (sequence number + 1, the parent's history + the parent) goes last; COMMIT; the agent makes
   the objects durable before it links the root; dom0 records the new head and its cache of the new maps
   (``repocache``: the next run reads the parent's segments from it instead of the backup VM when the newest
   root is the one dom0 wrote).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from qubes_backup_protocol import repo as names

from qubes_backup_dom0.backup import carry
from qubes_backup_dom0.backup.plan import BackupPlan, PlannedArchive, attached_volumes
from qubes_backup_dom0.backup.targets import AgentTarget, check_location
from qubes_backup_dom0.backup.tracking import Tracking
from qubes_backup_dom0.errors import BackupError, Cancelled, UsageError, VerificationError
from qubes_backup_dom0.format import crypto, repo, repotree
from qubes_backup_dom0.format import manifest as manifest_mod
from qubes_backup_dom0.format.header import DEFAULT_KDF_N, DEFAULT_KDF_P, DEFAULT_KDF_R, now_utc
from qubes_backup_dom0.format.outer import OuterWriter
from qubes_backup_dom0.format.tarwriter import InnerFile
from qubes_backup_dom0.qubes import repocache, repostate
from qubes_backup_dom0.qubes.repoclient import RepoReader, RepoSession, check_head, map_blocks
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import Transport, make_transport

ProgressCallback = Callable[[int, int], None]
_Files = dict[tuple[str, str], repotree.TreeFile]  # the parent snapshot's files by (VM, path)
_ZEROS = bytes(repo.BLOCK_MAX)


@dataclass(frozen=True)
class RepoOptions:
    block_size: int = repo.DEFAULT_BLOCK_SIZE  # used when the repository is created
    compression: str = "zstd"  # idem
    kdf_n: int = DEFAULT_KDF_N
    kdf_r: int = DEFAULT_KDF_R
    kdf_p: int = DEFAULT_KDF_P
    workers: int = max(2, min(os.cpu_count() or 1, 8))
    expect_root: str | None = None  # the newest root must be this one or descend from it (a fresh dom0)
    forget: tuple[str, ...] = ()  # VMs (dom0: its home) of the parent snapshot not to carry forward
    cache: bool = True  # use and keep dom0's cache of the newest snapshot's maps (qubes/repocache.py)


@dataclass
class RepoBackupResult:
    """dom0's own account of a snapshot it wrote."""

    repo_id: str
    seq: int
    root: str
    created: str
    location: str
    archives: int
    changed: list[str]  # the VMs (dom0: its home) whose file list differs from the parent snapshot's
    stored: int  # bytes of objects sent
    objects: int
    blocks: int  # data blocks sent
    new_repository: bool
    read: list[str] = field(default_factory=list)  # VMs (dom0: its home) whose data this run read
    carried: list[str] = field(default_factory=list)  # archives carried from the parent snapshot unchanged
    forgotten: list[str] = field(default_factory=list)  # archives of the parent left out (--forget)
    parent: int | None = None  # the parent snapshot's number
    segments_fetched: int = 0  # the parent's map segments fetched from the backup VM (not in dom0's cache)
    cache_used: bool = False  # dom0's cache of the parent's maps matched the parent and was used
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    read_blocks: int = 0  # blocks read from the files (change tracking reads only the changed ones)
    reused_blocks: int = 0  # blocks not read: change tracking took their ids from the parent's verified map
    volume_read_blocks: int = 0  # of read_blocks: those of volumes (the rest: dom0's home, the VMs' own files)


class _RepoTarget(AgentTarget):
    """The tar of a backup, as DATA frames on the session's channel (AgentTarget's bounded writing); the
    agent's DONE must name the root dom0 sent."""

    def __init__(self, session: RepoSession) -> None:
        self.vm = session.vm
        self.location = session.location
        self.name = ""
        self.sent = 0
        self._pending = bytearray()
        self.channel = session.channel

    def write(self, data: bytes | memoryview) -> None:
        """Members are gathered into DATA frames of up to FRAME_BYTES (a frame per object cost more than the
        object's copy here, and as much again in the agent); each frame goes under one deadline."""
        self.sent += len(data)
        self._pending += data
        if len(self._pending) >= FRAME_BYTES:
            self._flush()

    def _flush(self) -> None:
        """The gathered members as they are (not copied into a bytes first)."""
        if self._pending:
            pending, self._pending = self._pending, bytearray()
            self._send((memoryview(pending),))

    def _result(self, done: bytes | memoryview) -> str:
        if bytes(done) != self.name.encode():
            raise BackupError(f"backup VM {self.vm} did not confirm the snapshot dom0 sent ({self.name})")
        return self.name


_Block = tuple[int, int, list[tuple[int, int, int]]]  # (block number, length, reads: (file offset, offset in block, n))
_Sealed = tuple[int, int, str | None, bytearray | None]  # (block number, length, id or None: zeros, object or None)
FRAME_BYTES = 1 << 20  # the tar is sent in DATA frames of about this size (at most MAX_DATA_FRAME)
BATCH_BYTES = 4 << 20  # blocks read and sealed per worker task: one read of a data run, one future
ADVISE_AHEAD = 8  # batches whose reading the kernel is asked to start before they are submitted (_advise)
_ZERO_ARRAYS: dict[int, bytearray] = {}  # by length: bytearray == view compares with memcmp (view == view does not)
_local = threading.local()


def _is_zero(view: memoryview) -> bool:
    zeros = _ZERO_ARRAYS.get(len(view))
    if zeros is None:
        zeros = bytearray(len(view))
        if len(_ZERO_ARRAYS) < 8:  # the block size, and a few last blocks of files
            _ZERO_ARRAYS[len(view)] = zeros
    return zeros == view


def _buffer(size: int) -> memoryview:
    """This worker thread's read buffer (reused: a fresh one is zero-filled and page-faulted in each time)."""
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None or len(buf) < size:
        buf = _local.buf = bytearray(size)
    return memoryview(buf)


def _reader(f: InnerFile) -> tuple[Callable[[int, memoryview], None], Callable[[], None]]:
    """(read into a view at an offset, close) for the file's source: content, an attached fd, or a path."""
    what = f.label or f.path
    if f.content is not None:
        content = f.content

        def from_content(off: int, view: memoryview) -> None:
            view[:] = content[off : off + len(view)]

        return from_content, lambda: None
    fd, own = f.fd, False
    if fd is None:
        if f.source is None:
            raise BackupError(f"internal error: {what} has no source attached")
        try:
            fd = os.open(f.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise BackupError(f"cannot read {f.source}: {e.strerror}") from None
        own = True
        if os.fstat(fd).st_size != f.size:
            os.close(fd)
            raise BackupError(f"{f.source} changed during the backup (its size)")
    source_fd = fd

    def from_fd(off: int, view: memoryview) -> None:
        while len(view):
            try:
                got = os.preadv(source_fd, [view], off)
            except OSError as e:
                raise BackupError(f"cannot read {what}: {e.strerror or e}") from None
            if got <= 0:
                raise BackupError(f"cannot read {what}: short read at offset {off} (did it change?)")
            view, off = view[got:], off + got

    return from_fd, (lambda: os.close(source_fd)) if own else (lambda: None)


def _advise(f: InnerFile, batch: list[_Block]) -> None:
    """Start reading ``batch``'s data runs now (POSIX_FADV_WILLNEED: the kernel's asynchronous readahead), some
    batches before a worker reads them: the disk keeps reading while the cores hash and seal (a worker's
    preadv otherwise waits for its own few hundred KiB of readahead at a time).  A volume's fd only; advice
    that fails is ignored (nothing depends on it)."""
    fd = f.fd
    if fd is None:
        return
    start = end = -1
    for _index, _length, reads in batch:
        for off, _in_block, n in reads:
            if off != end:
                if end > start:
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
                start = off
            end = off + n
    if end > start:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)


def file_batches(f: InnerFile, block_size: int) -> Iterator[list[_Block]]:
    """The blocks of ``f`` that its data regions touch, in order, in batches of at most BATCH_BYTES: each
    block with the parts of it to read (the rest of it is zeros: holes, zero runs the scan found).  Blocks
    no region touches are holes."""
    per_batch = max(1, BATCH_BYTES // block_size)
    batch: list[_Block] = []
    index, reads = -1, list[tuple[int, int, int]]()
    for off, length in f.regions:
        pos, end = off, off + length
        while pos < end:
            at = pos // block_size
            if at != index:
                if index >= 0:
                    batch.append((index, min(block_size, f.size - index * block_size), reads))
                    if len(batch) == per_batch:
                        yield batch
                        batch = []
                index, reads = at, []
            stop = min(end, (at + 1) * block_size)
            reads.append((pos, pos - at * block_size, stop - pos))
            pos = stop
    if index >= 0:
        batch.append((index, min(block_size, f.size - index * block_size), reads))
    if batch:
        yield batch


def read_batch(read: Callable[[int, memoryview], None], batch: list[_Block]) -> memoryview:
    """The blocks of ``batch`` one after another in this thread's buffer; a run of data contiguous in the file
    is one read."""
    view = _buffer(sum(length for _, length, _ in batch))
    pos = 0
    run_file = run_buf = run_len = 0
    for _index, length, reads in batch:
        if not (len(reads) == 1 and reads[0][1] == 0 and reads[0][2] == length):
            view[pos : pos + length] = memoryview(_ZEROS)[:length]
        for file_off, in_block, n in reads:
            if run_len and file_off == run_file + run_len and pos + in_block == run_buf + run_len:
                run_len += n
                continue
            if run_len:
                read(run_file, view[run_buf : run_buf + run_len])
            run_file, run_buf, run_len = file_off, pos + in_block, n
        pos += length
    if run_len:
        read(run_file, view[run_buf : run_buf + run_len])
    return view[:pos]


class RepoBackup:
    """One backup into a repository: ``connect()`` (before the passphrase: is it a new repository?), ``run()``,
    ``close()``."""

    def __init__(self, system: System, plan: BackupPlan, dest_vm: str, location: str,
                 options: RepoOptions = RepoOptions(),
                 transport: Transport | None = None, progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None, tracking: Tracking | None = None) -> None:  # fmt: skip
        check_location(location)
        self.tracking = tracking  # change tracking: which blocks need not be read (backup/tracking.py)
        self._parent_root: str | None = None
        self._read = self._reused = self._volume_read = 0
        self.system = system
        self.plan = plan
        self.vm = dest_vm
        self.location = location
        self.options = options
        self.transport = transport
        self.progress = progress
        self.cancel = cancel or threading.Event()
        self.session: RepoSession | None = None
        self.header: repo.RepoHeader | None = None
        self.raw_header: bytes | None = None
        self.header_mac: bytes | None = None
        self.roots: list[str] = []
        self._sent: set[str] = set()
        self._known: set[str] = set()
        self._stored = self._objects = self._blocks = self._done = 0
        self._tar: OuterWriter | None = None
        self._cached: dict[str, repocache.Blocks] | None = None  # the parent's segments from dom0's cache
        self._maps: dict[str, repocache.Blocks] = {}  # segment id -> its blocks, of what this snapshot references
        self._fetched_segments = 0
        self._trees: dict[str, repotree.Tree] = {}  # the file lists this run made

    @property
    def where(self) -> str:
        return f"{self.vm}:{self.location}"

    @property
    def creating(self) -> bool:
        return self.raw_header is None

    def connect(self) -> bool:
        """Open the session (the agent takes the repository's lock); True if the repository is new."""
        self.session = RepoSession(self.transport or make_transport(self.system), "qubes.Backup", self.vm,
                                   self.location)  # fmt: skip
        opening = self.session.read_opening()
        if opening.header is None:
            if opening.roots:
                raise VerificationError(f"repository {self.where} has snapshots but no header (damaged)")
        else:
            self.header = repo.parse_header(opening.header)
            self.raw_header, self.header_mac = opening.header, opening.header_mac
        self.roots = opening.roots
        return self.creating

    def close(self) -> None:
        if self.session is not None:
            self.session.close()

    # -- the run -------------------------------------------------------------------------------------

    def _keys(self, passphrase: bytes) -> repo.RepoKeys:
        if self.header is None:
            o = self.options
            if o.compression not in repo.COMPRESSIONS:
                raise UsageError(f"unknown compression for a repository: {o.compression}")
            self.header = repo.RepoHeader(crypto.random_bytes(16), now_utc(),
                                          crypto.KdfParams(crypto.random_bytes(16), o.kdf_n, o.kdf_r, o.kdf_p),
                                          o.compression, o.block_size)  # fmt: skip
            self._new_header = self.header.render()
            keys = repo.keys_from_passphrase(passphrase, self.header)
            self._new_mac = repo.header_mac(keys, self._new_header)
            return keys
        keys = repo.keys_from_passphrase(passphrase, self.header)
        assert self.raw_header is not None and self.header_mac is not None
        if not repo.verify_header(keys, self.raw_header, self.header_mac):
            raise VerificationError(f"wrong passphrase, or the header of repository {self.where} was tampered with")
        return keys

    def run(self, passphrase: bytes) -> RepoBackupResult:
        assert self.session is not None
        if not passphrase:
            raise UsageError("the passphrase is empty")
        started = time.time()
        keys = self._keys(passphrase)
        header = self.header
        assert header is not None
        repo_id = header.repo_id_hex
        others = [r for r in repostate.owners(self.system, self.where) if r != repo_id]
        if others:
            raise VerificationError(
                f"{self.where} held repository {others[0]}, now it holds {repo_id}: refusing it (if you replaced "
                f"it on purpose, remove {repostate.STATE_DIR}/{others[0]}.json)"
            )
        state = repostate.load(self.system, repo_id)
        repostate.check_writable(self.system)
        reader = RepoReader(self.session, header, keys, self.cancel.is_set)
        target = _RepoTarget(self.session)
        try:
            result = self._write(reader, keys, header, state, target)
        except BaseException:
            target.abort()
            raise
        finally:
            reader.close()
        repostate.save(self.system, repostate.RepoState(
            repo_id, result.seq, result.root, result.created, [*(state.locations if state else []), self.where]))
        if self.options.cache:
            repocache.save(self.system, repo_id, result.root, header.block_size, self._maps)
        result.warnings += self.plan.record_backup_timestamps(int(started))
        return result

    def _write(self, reader: RepoReader, keys: repo.RepoKeys, header: repo.RepoHeader,
               state: repostate.RepoState | None, target: _RepoTarget) -> RepoBackupResult:  # fmt: skip
        notes: list[str] = []
        parent = check_head(reader, self.roots, state, self.options.expect_root, self.where, notes)
        created = now_utc()
        bs = header.block_size
        self._parent_root = parent[0] if parent is not None else None
        parent_files, carried, trees = self._parent(reader, parent, bs)
        self._tar = OuterWriter(target)
        if self.creating:
            self._tar.add(names.HEADER, self._new_header)
            self._tar.add(names.HEADER_MAC, self._new_mac)
        read: dict[str, tuple[str, str, str]] = {}  # vm -> (kind, tree id, captured)
        with ThreadPoolExecutor(max_workers=self.options.workers, thread_name_prefix="repo-seal") as pool:
            for a in self.plan.archives:
                captured = now_utc()
                read[a.vm] = (a.kind, self._archive(a, reader, keys, bs, parent_files, pool), captured)
        parent_trees = {pa.vm: pa.tree for pa in parent[1].archives} if parent is not None else {}
        changed = [vm for vm, (_kind, tid, _c) in read.items() if parent_trees.get(vm) != tid]
        qubes, archives = self._contents(reader, parent, read, carried, created)
        self._check_manifest(header.repo_id_hex, created, archives, trees, qubes)
        xid = self._emit(keys, repo.QUBES, qubes, ())
        history: list[repotree.HistoryEntry] = []
        seq = 1
        if parent is not None:
            pid, proot = parent
            history, seq = [*proot.history, proot.entry(pid)], proot.seq + 1
        root = repotree.Root(header.repo_id_hex, seq, created, bs, xid, archives, history)
        rid, robj = repo.seal(keys, repo.ROOT, root.render(), root.refs(), self._compress(header))
        name = names.root_name(seq, created)
        self._tar.add(name, memoryview(robj))
        self._stored += len(robj)
        self._objects += 1
        self._tar.close()
        target.name = name
        target.commit()
        return RepoBackupResult(header.repo_id_hex, seq, rid, created, self.where, len(archives), changed,
                                self._stored, self._objects, self._blocks, self.creating, list(read),
                                [c.vm for c in carried], sorted(set(self.options.forget)),
                                parent[1].seq if parent else None, self._fetched_segments,
                                self._cached is not None, notes,
                                read_blocks=self._read, reused_blocks=self._reused,
                                volume_read_blocks=self._volume_read)  # fmt: skip

    def _parent(self, reader: RepoReader, parent: tuple[str, repotree.Root] | None,
                bs: int) -> tuple[_Files, list[repotree.RootArchive], dict[str, repotree.Tree]]:  # fmt: skip
        """The parent snapshot's files by (VM, path), the archives carried from it, its file lists (all
        verified); its segment, file list and qubes.xml ids become known, dom0's cache of its maps loaded."""
        reading = {a.vm for a in self.plan.archives}
        forget = set(self.options.forget)
        if forget & reading:
            raise UsageError(f"--forget {sorted(forget & reading)[0]}: that VM is backed up in this run")
        if parent is None:
            if forget:
                raise UsageError(f"--forget {sorted(forget)[0]}: the repository holds no snapshot yet")
            return {}, [], {}
        pid, proot = parent
        missing = forget - {a.vm for a in proot.archives}
        if missing:
            raise UsageError(f"--forget {sorted(missing)[0]}: snapshot {proot.seq} holds no archive of it")
        trees = reader.trees([a.tree for a in proot.archives])
        files: _Files = {}
        for pa in proot.archives:
            for f in trees[pa.tree].files:
                files[(pa.vm, f.path)] = f
                self._known.update(sid for _, sid in f.segments)
        self._known.update(trees)
        self._known.add(proot.qubes)
        if self.options.cache:
            self._cached = repocache.load(self.system, proot.repo_id, pid, bs)
        carried = [pa for pa in proot.archives if pa.vm not in reading and pa.vm not in forget]
        for c in carried:  # their maps, as far as dom0's cache holds them, stay in the next cache
            for f in trees[c.tree].files:
                for _n, sid in f.segments:
                    if self._cached is not None and sid in self._cached:
                        self._maps[sid] = self._cached[sid]
        return files, carried, trees

    def _contents(self, reader: RepoReader, parent: tuple[str, repotree.Root] | None,
                  read: dict[str, tuple[str, str, str]], carried: list[repotree.RootArchive],
                  created: str) -> tuple[bytes, list[repotree.RootArchive]]:  # fmt: skip
        """The qubes.xml subset (this run's, merged with the parent's for carried VMs) and the root's archives
        (read and carried), numbered in restore order."""
        assert self.header is not None
        qubes = self.plan.manifest(self.header.repo_id_hex, created).qubes
        members = {a.vm: a.member for a in self.plan.archives}
        if parent is not None and carried:
            qubes = carry.merge_subsets(qubes, reader.qubes(parent[1].qubes), [c.vm for c in carried],
                                        any(c.kind == "home" for c in carried))  # fmt: skip
            members = carry.numbering(qubes, [vm for vm, r in read.items() if r[0] == "vm"]
                                      + [c.vm for c in carried if c.kind == "vm"])  # fmt: skip
            members["dom0"] = "vm0"
        archives = [repotree.RootArchive(members[vm], kind, vm, tid, captured)
                    for vm, (kind, tid, captured) in read.items()]  # fmt: skip
        archives += [repotree.RootArchive(members[c.vm], c.kind, c.vm, c.tree, c.captured) for c in carried]
        archives.sort(key=lambda r: int(r.member[2:]))
        return qubes, archives

    def _check_manifest(self, repo_id: str, created: str, archives: list[repotree.RootArchive],
                        trees: dict[str, repotree.Tree], qubes: bytes) -> None:  # fmt: skip
        """The snapshot passes the checks a restore applies (``manifest.parse``): the carried archives and
        the merged qubes.xml subset agree.  (Trees of this run are in ``self._trees``.)"""
        trees = {**trees, **self._trees}
        entries = [manifest_mod.ArchiveEntry(a.member, a.vm, a.kind, [
            manifest_mod.FileEntry(f.path, f.type, f.size, f.data) for f in trees[a.tree].files])
            for a in archives]  # fmt: skip
        try:
            manifest_mod.parse(manifest_mod.Manifest(repo_id, created, entries, qubes).render())
        except BackupError as e:
            raise BackupError(f"internal error: the snapshot would not restore: {e}") from None

    @staticmethod
    def _compress(header: repo.RepoHeader) -> bool:
        return header.compression == "zstd"

    def _emit(self, keys: repo.RepoKeys, otype: str, plaintext: bytes, refs: list[str] | tuple[()],
              oid: str | None = None, sealed: bytes | bytearray | None = None) -> str:  # fmt: skip
        """Send an object unless the parent snapshot or this run has it; returns its id."""
        assert self.header is not None and self._tar is not None
        oid = oid or repo.object_id(keys, otype, plaintext)
        if oid in self._known or oid in self._sent:
            return oid
        if sealed is None:
            _, sealed = repo.seal(keys, otype, plaintext, refs, self._compress(self.header), oid)
        self._tar.add(oid, memoryview(sealed))
        self._sent.add(oid)
        self._stored += len(sealed)
        self._objects += 1
        return oid

    def _archive(self, a: PlannedArchive, reader: RepoReader, keys: repo.RepoKeys, bs: int,
                 parent_files: dict[tuple[str, str], repotree.TreeFile], pool: ThreadPoolExecutor) -> str:  # fmt: skip
        tree = repotree.Tree()
        with attached_volumes(self.system, a):
            for f in a.files:
                mtime = f.mtime if a.kind == "home" else 0  # a VM's files: their content is what counts
                if f.type != "file":
                    tree.files.append(repotree.TreeFile(f.path, f.type, 0, 0, f.mode, mtime, f.link))
                    continue
                parent = parent_files.get((a.vm, f.path))
                parent_blocks = self._parent_blocks(parent, reader) if parent is not None else []
                known = {did for _, did in parent_blocks}
                reuse = None  # change tracking: blocks not read, their ids from the parent's verified map
                if self.tracking is not None:
                    reuse = self.tracking.reuse(f, parent, parent_blocks, self._parent_root, bs)
                before = self._read
                segments, stored = self._file(f, keys, bs, known, pool, reuse)
                if f.label:  # a volume's committed state (not a file of dom0's home or a VM's directory)
                    self._volume_read += self._read - before
                tree.files.append(repotree.TreeFile(f.path, "file", f.size, stored, f.mode, mtime, None, segments))
        tid = self._emit(keys, repo.TREE, tree.render(bs), tree.refs())
        self._trees[tid] = tree
        return tid

    def _parent_blocks(self, parent: repotree.TreeFile, reader: RepoReader) -> list[tuple[int, str]]:
        """(block number, data id) of the parent's copy of a file, in order: from dom0's cache of the parent's
        maps where it holds the segment, else fetched from the backup VM and verified; checked as
        ``RepoReader.blocks`` checks them (each block within the file, the lengths adding up)."""
        fetch = [sid for _n, sid in parent.segments if self._cached is None or sid not in self._cached]
        fetched = dict(zip(fetch, reader.segments(fetch), strict=True))
        self._fetched_segments += len(fetch)
        assert self.header is not None
        maps = [self._cached[sid] if sid not in fetched and self._cached is not None else fetched[sid].blocks
                for _n, sid in parent.segments]  # fmt: skip
        return map_blocks(parent, maps, self.header.block_size)

    def _seal_batch(self, keys: repo.RepoKeys, read: Callable[[int, memoryview], None], batch: list[_Block],
                    known: set[str]) -> list[_Sealed]:  # fmt: skip
        """On a worker: read the batch's blocks; each one's id and its object when it need not be sent (the
        id is known, or it is all zeros: a hole)."""
        assert self.header is not None
        compress = self._compress(self.header)
        view = read_batch(read, batch)
        out: list[_Sealed] = []
        pos = 0
        for index, length, _reads in batch:
            block = view[pos : pos + length]
            pos += length
            if _is_zero(block):
                out.append((index, length, None, None))
                continue
            oid = repo.object_id(keys, repo.DATA, block)
            if oid in known or oid in self._sent:
                out.append((index, length, oid, None))
            else:
                out.append((index, length, *repo.seal(keys, repo.DATA, block, (), compress, oid)))
        return out

    def _file(self, f: InnerFile, keys: repo.RepoKeys, bs: int, known: set[str], pool: ThreadPoolExecutor,
              reuse: dict[int, str] | None = None) -> tuple[list[tuple[int, str]], int]:  # fmt: skip
        """Blocks of one file into objects; returns its segments and the bytes of its stored blocks.  ``reuse``:
        blocks not read (change tracking), with their ids."""
        entries: list[tuple[int, str]] = []
        stored = 0
        inflight: deque[tuple[int, Future[list[_Sealed]]]] = deque()
        depth = self.options.workers + 2
        total = self.plan.data if self.progress is not None else 0  # a sum over every file: not per batch

        def collect() -> None:
            nonlocal stored
            nread, fut = inflight.popleft()
            for index, length, oid, sealed in fut.result():
                if oid is None:  # all zeros: a hole
                    continue
                entries.append((index, oid))
                stored += length
                if sealed is not None and oid not in self._sent:  # else: the parent's map or this run has it
                    self._blocks += 1
                    self._emit(keys, repo.DATA, b"", (), oid, sealed)
            self._done += nread
            if self.progress is not None:
                self.progress(min(self._done, total), total)

        read, close = _reader(f)
        try:
            batches = file_batches(f, bs)
            ahead = deque(itertools.islice(batches, 1))  # the batches to submit next (all but the first advised)
            while ahead:
                batch = ahead.popleft()
                if self.cancel.is_set():
                    raise Cancelled("backup cancelled")
                self._read += len(batch)
                if reuse and any(index in reuse for index, _l, _r in batch):  # never both read and taken
                    raise BackupError(f"internal error: a block of {f.label or f.path} both read and reused")
                nread = sum(n for _i, _l, reads in batch for _f, _o, n in reads)
                inflight.append((nread, pool.submit(self._seal_batch, keys, read, batch, known)))
                for later in itertools.islice(batches, ADVISE_AHEAD - len(ahead)):  # after the submission
                    _advise(f, later)
                    ahead.append(later)
                while len(inflight) > depth:
                    collect()
            while inflight:
                collect()
        finally:
            for _n, fut in inflight:  # failed or cancelled: no worker may still read this file once it is closed
                fut.cancel()
            for _n, fut in inflight:
                if not fut.cancelled():
                    with contextlib.suppress(BaseException):
                        fut.result()
            close()
        if self.tracking is not None:
            self.tracking.check(f, entries)  # --rescan: were tracking's answers right?
        if reuse:
            entries += reuse.items()
            entries.sort()
            stored += sum(min(bs, f.size - i * bs) for i in reuse)
            self._reused += len(reuse)
        segments = []
        span = repo.SEGMENT_BLOCKS
        for n, group in itertools.groupby(entries, key=lambda e: e[0] // span):
            seg = repotree.Segment([(i % span, oid) for i, oid in group])
            sid = self._emit(keys, repo.SEGMENT, seg.render(), seg.refs())
            self._maps[sid] = list(seg.blocks)
            segments.append((n, sid))
        return segments, stored
