"""Reading a repository in the backup VM (docs/REPOSITORY.md sections 8-9): the session, and snapshots opened
object by object, each verified before it is used.

``RepoSession`` is the frame layer of a repository session: the opening (header, its MAC, the list of roots;
bounded, strictly checked names) and GET requests answered by MEMBER frames, bounded per request before
anything is read.  ``RepoReader`` adds the keys: every object goes through ``repo.open_object`` (MAC, then
type and id as asked, then decryption, bounded decompression, id recomputed), every body through the strict
parsers of ``repotree`` (its clear references must be the ids it names).  Requests are pipelined (a window
of GETs in flight) and objects opened on a thread pool, results in request order.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

from qubes_backup_protocol import repo as names
from qubes_backup_protocol.frames import MAX_ERROR_LEN, BufferFor, FrameType, ProtocolError, safe_text

from qubes_backup_dom0.errors import BackupError, Cancelled, VerificationError
from qubes_backup_dom0.format import repo, repotree
from qubes_backup_dom0.format.repo import RepoHeader, RepoKeys
from qubes_backup_dom0.qubes.repostate import RepoState
from qubes_backup_dom0.qubes.transport import Channel, ChannelClosed, Transport

WINDOW = 64  # GET requests in flight (each answer is at most a few MiB; the requests fit a pipe buffer)
REQUEST_BATCH = 32  # objects asked for at once (one GETS frame on qubes.Restore): half the window
OPEN_BATCH = 8  # objects opened by one task of the pool (fewer hand-overs between threads)


def _buffer(ftype: FrameType, size: int) -> memoryview | None:
    """A MEMBER's data goes straight into a buffer of its own (its size was bounded first)."""
    return memoryview(bytearray(size)) if ftype == FrameType.MEMBER else None


class _Buffers:
    """Buffers of ``capacity`` bytes that received data blocks are read into, reused once the block was
    opened (nothing of it is kept: ``open_object`` decrypts into new bytes); larger answers get their own."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free: list[bytearray] = []

    def take(self, ftype: FrameType, size: int) -> memoryview | None:
        if ftype != FrameType.MEMBER:
            return None
        if size > self.capacity:
            return memoryview(bytearray(size))
        buf = self.free.pop() if self.free else bytearray(self.capacity)
        return memoryview(buf)[:size]

    def give_back(self, views: list[bytes | memoryview]) -> None:
        for view in views:
            if isinstance(view, memoryview) and isinstance(view.obj, bytearray) and len(view.obj) == self.capacity:
                buf = view.obj
                try:
                    view.release()
                except BufferError:  # still exported somewhere: not reused
                    continue
                if len(self.free) < 2 * WINDOW:
                    self.free.append(buf)


@dataclass(frozen=True)
class Opening:
    """What the agent sends first: the header (unauthenticated) and its MAC, and the roots it holds."""

    header: bytes | None
    header_mac: bytes | None
    roots: list[str]


class RepoSession:
    """A repository session with the agent: qubes.Backup (a backup) or qubes.Restore (restore, verify, list)."""

    def __init__(self, transport: Transport, service: str, vm: str, location: str) -> None:
        self.vm = vm
        self.location = location
        self.channel = Channel(transport.start(service, vm), vm=f"backup VM {vm}")
        self.channel.send(FrameType.LOCATION, names.REQUEST, location.encode("utf-8"))
        self.outstanding: deque[str] = deque()
        self._agent_gone = False
        self.batched = service == "qubes.Restore"  # its agent takes GETS (docs/REPOSITORY.md section 9)

    def _recv(self, limits: dict[FrameType, tuple[int, int]], name_ok: Callable[[str], bool] | None,
              what: str, asked: str = "", into: BufferFor | None = None,
              ) -> tuple[FrameType, str, bytes | memoryview]:  # fmt: skip
        """One frame; ``asked``: the object a GET asked for (then an ERROR, say a missing object, means the
        snapshot cannot be verified: exit code 3; a stall or a failed agent stays a failure, exit code 1);
        ``into``: as frames.read_frame's."""
        limits = {**limits, FrameType.ERROR: (0, MAX_ERROR_LEN)}
        try:
            frame = self.channel.recv(limits, name_ok, into)
        except ProtocolError as e:
            raise VerificationError(f"backup VM {self.vm} sent a malformed answer ({what}): {e}") from None
        if frame is None:
            raise VerificationError(f"backup VM {self.vm} stopped answering ({what}){self._said()}")
        if frame.type == FrameType.ERROR:
            if asked:
                raise VerificationError(f"backup VM {self.vm} reports: {safe_text(frame.data)} (asked for {asked})")
            raise BackupError(f"backup VM {self.vm} reports: {safe_text(frame.data)}")
        return frame.type, frame.name, frame.data

    def _said(self) -> str:
        tail = self.channel.stderr_tail()
        return f" (agent said: {tail})" if tail else ""

    def read_opening(self) -> Opening:
        """Header and MAC (if the repository has them), ENTRY per root in ascending order, END."""
        header = mac = None
        roots: list[str] = []
        limits = {FrameType.MEMBER: (64, repo.MAX_HEADER_SIZE), FrameType.ENTRY: (64, 0), FrameType.END: (0, 0)}
        while True:
            ftype, name, data = self._recv(limits, names.is_member_name, "opening the repository")
            if ftype == FrameType.END:
                break
            if ftype == FrameType.MEMBER:
                expected = names.HEADER if header is None else names.HEADER_MAC
                if roots or mac is not None or name != expected:
                    raise VerificationError(f"backup VM {self.vm} sent {safe_text(name)} out of place")
                if header is None:
                    header = bytes(data)
                else:
                    mac = bytes(data)
                continue
            if not names.is_root_name(name) or len(roots) >= names.MAX_ROOTS:
                raise VerificationError(f"backup VM {self.vm} lists a bad or excess snapshot {safe_text(name)}")
            if roots and names.root_seq(name) <= names.root_seq(roots[-1]):
                raise VerificationError(f"backup VM {self.vm} lists snapshot {names.root_seq(name)} twice or out "
                                        "of order")  # fmt: skip
            roots.append(name)
        if header is not None and mac is None:
            raise VerificationError(f"backup VM {self.vm} sent the repository header without its MAC")
        return Opening(header, mac, roots)

    def request(self, name: str) -> None:
        self.request_many([name])

    def request_many(self, wanted: list[str]) -> None:
        """Ask for ``wanted`` (at most GETS_MAX names): on qubes.Restore objects in one GETS frame, else (a
        root, the header, a backup session) one GET each; the answers come in this order."""
        self.outstanding.extend(wanted)
        if self._agent_gone:
            return
        try:
            if self.batched and len(wanted) > 1 and all(names.is_object_name(n) for n in wanted):
                self.channel.send(FrameType.GETS, "", names.encode_gets(wanted))
                return
            for name in wanted:
                self.channel.send(FrameType.GET, name)
        except ChannelClosed:
            # The agent stopped reading (it answered an earlier GET with ERROR and exited, or died): what it
            # sent before, its answers and its ERROR, is still to be read; ``receive`` reports it (or the end).
            self._agent_gone = True

    def receive(self, max_size: int, into: BufferFor = _buffer) -> bytes | memoryview:
        """The answer to the oldest request: its MEMBER, bounded by ``max_size`` before it is read (then read
        straight from the pipe into a buffer of its own: no copy)."""
        name = self.outstanding.popleft()
        limits = {FrameType.MEMBER: (64, max_size)}
        _ftype, got, data = self._recv(limits, names.is_member_name, f"sending {name[:40]}", name[:40], into)
        if got != name:
            raise VerificationError(f"backup VM {self.vm} sent {safe_text(got)} when asked for {name[:40]}")
        return data

    def get(self, name: str, max_size: int) -> bytes:
        self.request(name)
        return bytes(self.receive(max_size))

    def close(self) -> None:
        self.channel.close()


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Want:
    """One object to fetch: its name (id, or a root's name), type and exact plaintext length (data)."""

    name: str
    type: str
    length: int | None = None


def _workers() -> int:
    return max(2, min(os.cpu_count() or 1, 8))


class RepoReader:
    """Verified objects of one repository, fetched over a session."""

    def __init__(self, session: RepoSession, header: RepoHeader, keys: RepoKeys,
                 cancel: Callable[[], bool] | None = None) -> None:  # fmt: skip
        self.session = session
        self.header = header
        self.keys = keys
        self.block_size = header.block_size
        self.pool = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="repo-open")
        self.cancelled = cancel or (lambda: False)
        self.fetched = 0  # objects received
        self.fetched_bytes = 0
        self.buffers = _Buffers(repo.max_object_size(repo.DATA, self.block_size))

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _open(self, want: Want, raw: bytes | memoryview) -> repo.Opened:
        oid = None if want.type == repo.ROOT else want.name
        return repo.open_object(self.keys, raw, want.type, oid, self.block_size, want.length)

    def _open_all(self, batch: list[tuple[Want, bytes | memoryview]]) -> list[repo.Opened]:
        return [self._open(want, raw) for want, raw in batch]

    def fetch(self, wants: Iterable[Want]) -> Iterator[repo.Opened]:
        """The objects in order, up to WINDOW requests ahead (REQUEST_BATCH at a time), opened on the pool
        OPEN_BATCH at a time (a few batches ahead of the consumer)."""
        pending: deque[Want] = deque()
        opened: deque[tuple[Future[list[repo.Opened]], list[bytes | memoryview]]] = deque()
        it = iter(wants)
        more = True
        depth = 2 * _workers() + 2
        while True:
            while more and (not pending or len(pending) + REQUEST_BATCH <= WINDOW):
                chunk = list(islice(it, REQUEST_BATCH))
                if not chunk:
                    more = False
                    break
                self.session.request_many([w.name for w in chunk])
                pending.extend(chunk)
            if pending and len(opened) < depth:
                if self.cancelled():
                    raise Cancelled("cancelled")
                batch: list[tuple[Want, bytes | memoryview]] = []
                while pending and len(batch) < OPEN_BATCH:
                    want = pending.popleft()
                    raw = self.session.receive(repo.max_object_size(want.type, self.block_size), self.buffers.take)
                    self.fetched += 1
                    self.fetched_bytes += len(raw)
                    batch.append((want, raw))
                opened.append((self.pool.submit(self._open_all, batch), [raw for _, raw in batch]))
                continue
            if not opened:
                return
            future, raws = opened.popleft()
            done = future.result()
            self.buffers.give_back(raws)
            yield from done

    def one(self, want: Want) -> repo.Opened:
        return next(iter(self.fetch([want])))

    # -- the snapshot's structure ----------------------------------------------------------------------

    def root(self, name: str) -> tuple[str, repotree.Root]:
        """Root ``name``: verified, and its body must state that number and time, this repository and
        block size (a root served under another name is refused)."""
        opened = self.one(Want(name, repo.ROOT))
        root = repotree.parse_root(opened.plaintext, opened.refs)
        seq = names.root_seq(name)
        if root.seq != seq or names.root_name(root.seq, root.created) != name:
            raise VerificationError(f"the backup VM sent snapshot {root.seq} when asked for snapshot {seq}")
        if root.repo_id != self.keys.repo_id.hex() or root.block_size != self.block_size:
            raise VerificationError(f"snapshot {seq} belongs to another repository")
        return opened.id, root

    def trees(self, ids: list[str]) -> dict[str, repotree.Tree]:
        distinct = list(dict.fromkeys(ids))
        out = {}
        for tid, opened in zip(distinct, self.fetch(Want(t, repo.TREE) for t in distinct), strict=True):
            out[tid] = repotree.parse_tree(opened.plaintext, self.block_size, opened.refs)
        return out

    def segments(self, ids: list[str]) -> Iterator[repotree.Segment]:
        for opened in self.fetch(Want(s, repo.SEGMENT) for s in ids):
            yield repotree.parse_segment(opened.plaintext, opened.refs)

    def qubes(self, xid: str) -> bytes:
        return self.one(Want(xid, repo.QUBES)).plaintext

    def blocks(self, f: repotree.TreeFile) -> list[tuple[int, str]]:
        """(block number, data id) of a regular file, from its segments; each within the file."""
        segments = self.segments([s for _, s in f.segments])
        return map_blocks(f, [seg.blocks for seg in segments], self.block_size)


def map_blocks(f: repotree.TreeFile, maps: list[list[tuple[int, str]]], block_size: int) -> list[tuple[int, str]]:
    """(block number, data id) of regular file ``f`` whose segments (``f.segments``, in order) hold the blocks
    ``maps`` (per segment: (block number within it, data id)): every block within the file, and the blocks'
    lengths adding up to what the file list says the file holds."""
    nblocks = -(-f.size // block_size)
    out: list[tuple[int, str]] = []
    stored = 0
    for (n, _sid), blocks in zip(f.segments, maps, strict=True):
        for k, did in blocks:
            index = n * repo.SEGMENT_BLOCKS + k
            if index >= nblocks:
                raise VerificationError(f"{f.path[:80]}: a map segment names a block past the end of the file")
            out.append((index, did))
            stored += min(block_size, f.size - index * block_size)
    if stored != f.data:
        raise VerificationError(f"{f.path[:80]}: its map covers {stored} bytes, its file list says {f.data}")
    return out


def block_length(f: repotree.TreeFile, index: int, block_size: int) -> int:
    return min(block_size, f.size - index * block_size)


def check_head(reader: RepoReader, roots: list[str], state: RepoState | None, expect: str | None, where: str,
               notes: list[str]) -> tuple[str, repotree.Root] | None:  # fmt: skip
    """The newest root the backup VM lists, verified, and checked against dom0's record of the repository
    (``state``) or, without one, the root the user pinned (``expect``): it must be that root or a later one
    whose history lists it (no rollback, no fork).  Without either, it is accepted and ``notes`` say so
    (a fresh dom0: pin with --expect-root).  None if the repository holds no snapshot (refused when dom0
    recorded one)."""
    if not roots:
        if state is not None:
            raise VerificationError(f"repository {state.repo_id} in {where} holds no snapshot, but dom0 recorded "
                                    f"snapshot {state.seq} (rolled back, or withheld)")  # fmt: skip
        if expect is not None:
            raise VerificationError(f"the repository in {where} holds no snapshot (expected root {expect[:16]})")
        return None
    head_id, head = reader.root(roots[-1])
    known = (state.seq, state.root) if state is not None else (None, expect) if expect is not None else None
    if known is not None:
        problem = repotree.lineage_problem(head_id, head, known[0], known[1])
        if problem is None and state is not None and expect is not None:
            problem = repotree.lineage_problem(head_id, head, None, expect)
        if problem:
            raise VerificationError(f"repository {head.repo_id} in {where}: {problem}; refusing it")
    else:
        notes.append(f"dom0 has no record of repository {head.repo_id}: its newest snapshot is {head.seq} (created "
                     f"{head.created}, root {head_id}); pin it with --expect-root if you noted another")  # fmt: skip
    return head_id, head
