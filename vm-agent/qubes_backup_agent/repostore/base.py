"""Where a repository's files live, behind one small interface (restic's backend model).

A *store* keeps the files of docs/REPOSITORY.md section 2 under their names (``repo-header``,
``repo-header.hmac``, ``roots/NAME``, ``objects/XX/ID``): a directory in the backup VM (``Repository`` in
repository.py), an ssh server (``ssh.SshStore``, SFTP over one connection) or an S3 bucket
(``s3.S3Store``).  The sessions of repository.py use only ``Store``; the keyless prune (prune.py) the methods
of ``PruneStore``.

A remote store implements a few primitives (``RemoteStore``): load a file whole (bounded), load its first
bytes, its size, list a directory, save a file (atomically; ``exclusive``: never over an existing name),
remove a file, make what was saved durable, disconnect.  Everything else (the opening, GET answers, the
commit's order, the lock, the prune reads) is written once here, on top of them.  Nothing a server returns
is trusted: every load has a bound, every listing a count, every name its grammar.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import BinaryIO, Protocol

from qubes_backup_protocol import frames
from qubes_backup_protocol import repo as names
from qubes_backup_protocol.frames import FrameType

from ..storage import StorageError

HEAD_LEN = 83  # "qbr1 T C ID NNNNNNNN\n" (REPOSITORY.md section 5)
REF_LEN = 65  # one reference line
MAX_HEADER = 4096
MAC_LINE = 65
MAX_BLOCK = 4 << 20
_TYPE_BOUNDS = {  # object type -> (max references, max plaintext), REPOSITORY.md section 5
    "r": (10_001, 16 << 20),
    "t": (262_144, 16 << 20),
    "s": (4_096, 1 << 20),
    "d": (0, MAX_BLOCK),
    "x": (0, 16 << 20),
}
MAX_REFS = max(refs for refs, _plain in _TYPE_BOUNDS.values())
LOCK_NAME = "lock.exclusive"  # a remote store's lock file (the directory's ``lock`` is an flock)
TMP = "tmp"
OWN = {names.OBJECTS_DIR, names.ROOTS_DIR, TMP, "lock", LOCK_NAME}  # what a first backup may have left
MAX_LOCK_TEXT = 256
_CLEAR_HEAD = re.compile(rb"qbr1 ([rtsdx]) [zn] ([0-9a-f]{64}) ([0-9]{8})\n")
_UNPRINTABLE = re.compile(r"[^ -~]")


def object_bound(otype: str) -> int:
    """The largest object file of type ``otype``: 83 + 65·maxrefs + 16 + maxplain + 8192 + 65."""
    refs, plain = _TYPE_BOUNDS[otype]
    return HEAD_LEN + REF_LEN * refs + 16 + plain + 8192 + MAC_LINE


MAX_OBJECT = max(object_bound(t) for t in _TYPE_BOUNDS)


def file_bound(name: str) -> int:
    """The most bytes a GET of ``name`` may answer: the header's, a root's or any object's bound."""
    if name == names.HEADER:
        return MAX_HEADER
    if name == names.HEADER_MAC:
        return MAC_LINE
    if names.is_root_name(name):
        return object_bound("r")
    return MAX_OBJECT


def key_of(name: str) -> str:
    """The path of a repository file name inside the store (REPOSITORY.md section 2)."""
    if names.is_object_name(name):
        return f"{names.OBJECTS_DIR}/{name[:2]}/{name}"
    if names.is_root_name(name) or name in (names.HEADER, names.HEADER_MAC):
        return name
    raise StorageError(f"bad request: not a repository file name: {frames.safe_text(name)}")


def lock_text() -> bytes:
    """What a lock holds: who took it, and when (shown to whoever finds it)."""
    host = _UNPRINTABLE.sub("?", socket.gethostname())[:64]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return f"host {host} pid {os.getpid()} since {stamp}\n".encode()


def busy_message(view: str, holder: bytes) -> str:
    """One line for a lock another session holds (or a stale one): whose, and how to remove it."""
    text = _UNPRINTABLE.sub("?", holder[:MAX_LOCK_TEXT].decode("ascii", "replace").strip())[:80]
    who = f" ({text})" if text else ""
    return (f"repository {view} is in use by another backup or prune{who}; if none is running, remove its "
            f"{LOCK_NAME}")  # fmt: skip


def write_member(out: BinaryIO, name: str, data: bytes) -> None:
    raw = name.encode("ascii")
    out.write(frames.encode_header(FrameType.MEMBER, len(raw), len(data)) + raw)
    out.write(data)


class Store(Protocol):
    """What the sessions of repository.py need (REPOSITORY.md sections 9, 10)."""

    view: str  # the location as shown in messages

    @property
    def has_header(self) -> bool: ...

    def lock(self, exclusive: bool) -> None:
        """Exclusive (backup, prune): refused while another session holds it.  Shared (restore)."""

    def roots(self) -> list[str]:
        """``roots/NAME`` of every snapshot present, ascending sequence number."""
        ...

    def send_opening(self, out: BinaryIO) -> list[str]:
        """The header and its MAC (if any) as MEMBER frames, one ENTRY per root, END; returns the roots."""
        ...

    def serve(self, name: str, out: BinaryIO) -> None:
        """One MEMBER frame with the file's content (bounded); a missing file is a StorageError."""

    def prepare(self) -> None:
        """Before a backup stores anything: what a killed backup left in ``tmp/`` is removed."""

    def store_object(self, name: str, data: bytes) -> None:
        """An object, atomically (an existing one with the same id is the same content)."""

    def commit(self, header: tuple[bytes, bytes] | None, root: str, data: bytes) -> None:
        """Objects durable, then a new repository's header, then the root, never over an existing one."""

    def close(self) -> None:
        """End of the session: the lock is released (must not raise)."""


class PruneStore(Store, Protocol):
    """What the keyless prune needs besides (HELPERS interface; the directory's are in repository.py)."""

    def object_sizes(self) -> dict[str, int]:
        """Every object stored (``objects/XX/ID``, a regular file) and its file's size, in one pass."""
        ...

    def read_clear(self, name: str) -> bytes:
        """HEAD and REFS of object (or root) ``name``: 83 bytes, then 65 × N (N from HEAD, bounded)."""
        ...

    def delete_root(self, name: str) -> None: ...

    def delete_object(self, oid: str) -> None: ...

    def delete_objects(self, oids: list[str]) -> None:
        """``delete_object`` of each (a store may run several at once)."""

    def clean_tmp(self) -> None: ...


class Missing(Exception):
    """The file does not exist in the store."""


class Exists(Exception):
    """An exclusive save found the name taken."""


class RemoteStore(ABC):
    """A store over a remote service: the primitives below; the rest is common."""

    view: str
    _locked = False
    listed_sizes: dict[str, int]  # object sizes a listing gave (object_ids), for object_size

    # -- primitives ----------------------------------------------------------------------------------

    @abstractmethod
    def load(self, key: str, limit: int) -> bytes:
        """The whole file; Missing; StorageError if it is larger than ``limit`` (not read past it)."""

    @abstractmethod
    def load_prefix(self, key: str, length: int) -> bytes:
        """The first ``length`` bytes (fewer if the file is shorter); Missing."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The file's size, None if it does not exist."""

    @abstractmethod
    def listdir(self, directory: str, limit: int) -> Iterator[str]:
        """Names of the files and directories directly in ``directory`` (none if it does not exist; no
        symbolic links); a listing of more than ``limit`` entries is a StorageError."""

    @abstractmethod
    def save(self, key: str, data: bytes, *, exclusive: bool, durable: bool) -> None:
        """Atomically: nothing under ``key`` until the whole file is there.  ``exclusive``: raise Exists
        rather than replace a file.  ``durable``: on stable storage when this returns (else by ``sync``)."""

    @abstractmethod
    def remove(self, key: str) -> None:
        """Remove a file; an absent one is not an error."""

    @abstractmethod
    def sync(self) -> None:
        """Everything saved so far is on stable storage (before the root is written)."""

    @abstractmethod
    def disconnect(self) -> None:
        """Close the connection (must not raise)."""

    # -- the session ---------------------------------------------------------------------------------

    @property
    def has_header(self) -> bool:
        return self.size(names.HEADER) is not None

    def check_contents(self, create: bool) -> None:
        """A repository, or (``create``) an empty location, or what a killed first backup left."""
        if self.has_header:
            return
        other = set(self.listdir("", 1024)) - OWN
        if other or self.roots():
            raise StorageError(f"{self.view} is not empty and holds no repository")
        if not create:
            raise StorageError(f"{self.view} holds no repository")

    def lock(self, exclusive: bool) -> None:
        """Exclusive: the lock file, created atomically (never over another's).  Shared: refused while an
        exclusive lock exists, nothing written (docs/REPOSITORY.md section 2)."""
        if exclusive:
            try:
                self.save(LOCK_NAME, lock_text(), exclusive=True, durable=True)
            except Exists:
                pass
            else:
                self._locked = True
                return
        try:
            holder = self.load(LOCK_NAME, MAX_LOCK_TEXT)
        except Missing:
            if not exclusive:
                return
            holder = b""  # removed between our attempt and this read: still busy a moment ago
        except StorageError:
            holder = b""
        raise StorageError(busy_message(self.view, holder))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sync()  # what is in flight completes (no partial file left behind a finished request)
        try:
            if self._locked:
                self._locked = False
                self.remove(LOCK_NAME)
        except Exception:
            pass
        finally:
            self.disconnect()

    def roots(self) -> list[str]:
        found = []
        for entry in self.listdir(names.ROOTS_DIR, 2 * names.MAX_ROOTS + 64):
            name = f"{names.ROOTS_DIR}/{entry}"
            if names.is_root_name(name):
                found.append(name)
        if len(found) > names.MAX_ROOTS:
            raise StorageError(f"repository {self.view} lists more than {names.MAX_ROOTS} snapshot roots")
        found.sort(key=lambda n: (names.root_seq(n), n))
        return found

    def send_opening(self, out: BinaryIO) -> list[str]:
        if self.has_header:
            for name in (names.HEADER, names.HEADER_MAC):
                self.serve(name, out)
        roots = self.roots()
        for name in roots:
            frames.write_frame(out, FrameType.ENTRY, name)
        frames.write_frame(out, FrameType.END)
        out.flush()
        return roots

    def serve(self, name: str, out: BinaryIO) -> None:
        key = key_of(name)
        try:
            data = self.load(key, file_bound(name))
        except Missing:
            raise StorageError(f"{name} is missing from repository {self.view}") from None
        if name not in (names.HEADER, names.HEADER_MAC) and len(data) >= HEAD_LEN:
            m = _CLEAR_HEAD.fullmatch(data[:HEAD_LEN])
            if m is not None and len(data) > object_bound(m.group(1).decode()):
                raise StorageError(f"{name} in repository {self.view} is larger than its type allows")
        write_member(out, name, data)

    def prepare(self) -> None:
        self.clean_tmp()

    def store_object(self, name: str, data: bytes) -> None:
        self.save(key_of(name), data, exclusive=False, durable=False)

    def commit(self, header: tuple[bytes, bytes] | None, root: str, data: bytes) -> None:
        self.sync()
        if header is not None:
            if self.has_header:
                raise StorageError(f"repository {self.view} has a header already; refusing to replace it")
            try:
                self.save(names.HEADER_MAC, header[1], exclusive=False, durable=True)
                self.save(names.HEADER, header[0], exclusive=True, durable=True)
            except Exists:
                raise StorageError(f"repository {self.view} has a header already; refusing to replace it") from None
        try:
            self.save(root, data, exclusive=True, durable=True)
        except Exists:
            raise StorageError(f"snapshot {root} exists already in repository {self.view}") from None

    # -- prune ---------------------------------------------------------------------------------------

    def object_ids(self) -> Iterator[str]:
        """Every object stored: ``objects/XX/ID`` with ``XX`` = ``ID[:2]`` (anything else is left alone),
        sorted within each ``XX`` as the directory store lists them."""
        for sub in sorted(self.listdir(names.OBJECTS_DIR, 4096)):
            if len(sub) != 2 or any(c not in "0123456789abcdef" for c in sub):
                continue
            entries = sorted(self.listdir(f"{names.OBJECTS_DIR}/{sub}", 1 << 40))
            yield from (e for e in entries if names.is_object_name(e) and e[:2] == sub)

    def object_size(self, oid: str) -> int:
        """The size of an object's file (from the listing ``object_ids`` made, when it gave sizes);
        FileNotFoundError when it is missing (the directory store's rule)."""
        known = self.listed_sizes.get(oid)
        if known is not None:
            return known
        size = self.size(key_of(oid))
        if size is None:
            raise FileNotFoundError(oid)
        return size

    def object_sizes(self) -> dict[str, int]:
        """Every object and its size: the listing's (``object_ids``), else one size request each."""
        ids = list(self.object_ids())
        sizes: dict[str, int] = {}
        for oid in ids:
            with contextlib.suppress(FileNotFoundError):
                sizes[oid] = self.object_size(oid)
        return sizes

    def read_clear(self, name: str) -> bytes:
        """HEAD (83 bytes) and the 65 × N bytes of references it states (N at most MAX_REFS), fewer when the
        file is shorter; HEAD alone when it does not parse (the caller checks the grammar strictly).
        FileNotFoundError when the file is missing.  As the directory store's ``read_clear``."""
        key = key_of(name)
        try:
            head = self.load_prefix(key, HEAD_LEN)
            m = _CLEAR_HEAD.fullmatch(head)
            if m is None:
                return head
            want = HEAD_LEN + REF_LEN * min(int(m.group(3)), MAX_REFS)
            return head if want == HEAD_LEN else head + self.load_prefix(key, want)[HEAD_LEN:]
        except Missing:
            raise FileNotFoundError(name) from None

    def delete_root(self, name: str) -> None:
        if not names.is_root_name(name):
            raise StorageError(f"not a snapshot root: {frames.safe_text(name)}")
        self.remove(name)

    def delete_object(self, oid: str) -> None:
        if not names.is_object_name(oid):
            raise StorageError(f"not an object id: {frames.safe_text(oid)}")
        self.listed_sizes.pop(oid, None)
        self.remove(key_of(oid))

    def delete_objects(self, oids: list[str]) -> None:
        for oid in oids:
            self.delete_object(oid)

    @abstractmethod
    def clean_tmp(self) -> None:
        """Partial writes of a killed session (a store whose saves need no temporary file has none)."""
