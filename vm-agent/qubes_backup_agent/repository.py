"""A repository in a directory of the backup VM: the agent's side (docs/REPOSITORY.md sections 7-9).

No keys here, and nothing here is trusted by dom0: objects arrive sealed and MACed, are stored as they came,
and go back as they are.  The agent only keeps the directory consistent for the next reader:

- a backup session holds the repository's lock exclusively (a second backup, or a prune, is refused); it
  sends the header and the list of snapshot roots, answers GET requests (dom0 reads the newest snapshot's
  maps to send only what changed), stores every object of the tar that follows (written to ``tmp/``, then
  renamed into ``objects/XX/ID``) and, at COMMIT, makes them durable (each fsynced when a session stored at most
  256, else syncfs) before the new root is linked
  into ``roots/``, last, never over an existing one: a killed backup leaves no root, so no snapshot that
  looks complete;
- a restore session holds the lock shared and answers GET requests until dom0 hangs up.

The sessions see their storage only through ``repostore.base.Store``: ``Repository`` below for a directory,
``repostore`` for ssh:// and s3:// locations (the same names, the same order of writes).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Union

from qubes_backup_protocol import frames
from qubes_backup_protocol import repo as names
from qubes_backup_protocol.frames import FrameType

from . import confine
from .common import EXIT_FAILED, EXIT_OK, send_error, silence
from .outer_tar import BLOCK, member_header
from .storage import StorageError
from .storage.directory import describe_oserror

if TYPE_CHECKING:
    from .repostore.base import RemoteStore, Store

LOCK = "lock"
TMP = "tmp"
MAX_STORE_MEMBER = 64 << 20  # the largest object dom0 writes is about 33 MiB (a file list at its bounds)
MAX_SERVE = (256 << 20) + 16  # what a MEMBER frame may carry (docs/PROTOCOL.md section 2)
COPY_PIECE = 4 << 20
_GET = (64, 0)
_BACKUP_FRAMES = {FrameType.DATA: (0, frames.MAX_DATA_FRAME), FrameType.COMMIT: (0, 0), FrameType.GET: _GET}
_RESTORE_FRAMES = {FrameType.GET: _GET, FrameType.GETS: (0, names.GETS_MAX_DATA)}
_OBJECT_HEAD = re.compile(rb"qbr1 [rtsdx] [zn] ([0-9a-f]{64}) ([0-9]{8})\n")
HEAD_LEN, REF_LEN = 83, 65  # an object's clear header line, and one reference line (REPOSITORY.md section 5)
MAX_CLEAR_REFS = 262_144  # the most references any type may list (a file list)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ZERO_BLOCK = bytes(BLOCK)
_OWN = {names.OBJECTS_DIR, names.ROOTS_DIR, LOCK, TMP}  # what an unfinished first backup may have left

# prune (object_sizes, delete_objects)
_OBJECT_ID = re.compile(r"[0-9a-f]{64}")  # an object's name (qubes_backup_protocol.repo), here for prune's pace
_SUBDIR = re.compile(r"[0-9a-f]{2}")  # objects/XX
DELETERS, DELETE_BATCH = 8, 256  # a prune's deletions: threads, objects per task (ids in order: neighbours)


class EarlyEnd(Exception):
    """dom0 closed the stream before COMMIT (cancelled or failed): nothing is committed."""


class PeerGone(Exception):
    """dom0 closed its side of a restore session: it has what it needs."""


class MidFrame(Exception):
    """A failure after a MEMBER header went out: an ERROR frame would be read as member data."""


FSYNC_EACH = 256  # objects of a session made durable one by one at most; more: one syncfs


def _write_new(name: str, data: bytes | bytearray | memoryview, dir_fd: int, sync: bool) -> None:
    """A new file ``name`` in the directory ``dir_fd`` holding ``data`` (fsynced if ``sync``); removed again
    if that fails."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        raise
    os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _syncfs(path: Path) -> None:
    """Make everything written to this filesystem durable (the objects of a backup, before its root)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    except AttributeError:
        os.sync()
    finally:
        os.close(fd)


_sendfile_works = True  # until the kernel refuses sendfile to this stdout (then read and write, as before)


def _send_file(fd: int, out: BinaryIO, size: int, name: str) -> int:
    """Send the ``size`` bytes of file ``fd`` from its start to ``out`` with sendfile (the kernel moves them:
    no copy through this process), after what ``out`` buffered; how many are left to send (``size`` when
    sendfile is not possible here: the caller reads and writes them, from the file's start)."""
    global _sendfile_works
    if not _sendfile_works or not size:
        return size
    try:
        out_fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        return size  # not a file descriptor (a test's buffer)
    out.flush()
    sent = 0
    while sent < size:
        try:
            n = os.sendfile(out_fd, fd, sent, size - sent)
        except OSError as exc:
            if sent == 0 and exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EAGAIN):
                _sendfile_works = False
                return size
            raise
        if n == 0:
            raise MidFrame(f"{name} shrank while it was sent")
        sent += n
    return 0


class Repository:
    """The directory ``path`` (a host path, confined to the VM ``root``)."""

    def __init__(self, path: Path, root: Path) -> None:
        self.path = path
        self.root = root
        self.view = confine.vm_view(path, root)
        self._lock_fd: int | None = None
        self._tmp_fd: int | None = None  # tmp/ and objects/XX/, opened once per backup (store_object)
        self._dir_fds: dict[str, int] = {}
        self._partial = f".partial-{secrets.token_hex(6)}-"  # this session's temporary names: prefix + counter
        self._count = 0
        self._stored: list[tuple[str, str]] | None = []  # (XX, ID) stored this session, while few (see commit)

    # -- opening -------------------------------------------------------------------------------------

    @property
    def has_header(self) -> bool:
        return (self.path / names.HEADER).is_file()

    def _fail(self, exc: OSError, action: str, what: str = "") -> StorageError:
        return StorageError(describe_oserror(exc, action, f"{self.view}/{what}" if what else self.view))

    def lock(self, exclusive: bool) -> None:
        """The repository's lock for this session (released when the process exits)."""
        try:
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            if not exclusive and exc.errno in (errno.EROFS, errno.EACCES):
                return  # a read-only medium: nobody can write to it either
            raise self._fail(exc, "opening the lock of") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            busy = f"repository {self.view} is in use by another backup or prune; try again later"
            raise StorageError(busy) from None
        self._lock_fd = fd

    def roots(self) -> list[str]:
        """The snapshot roots present, ``roots/NAME``, ascending sequence number (the newest MAX_ROOTS)."""
        directory = self.path / names.ROOTS_DIR
        try:
            entries = os.listdir(directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._fail(exc, "listing", names.ROOTS_DIR) from None
        found = []
        for entry in entries:
            name = f"{names.ROOTS_DIR}/{entry}"
            if names.is_root_name(name):
                with contextlib.suppress(OSError):
                    if stat.S_ISREG(os.lstat(directory / entry).st_mode):
                        found.append(name)
        found.sort(key=lambda n: (names.root_seq(n), n))
        return found[-names.MAX_ROOTS :]

    def send_opening(self, out: BinaryIO) -> list[str]:
        """The header and its MAC (when there is one), one ENTRY per root, END; returns the roots."""
        if self.has_header:
            for name in (names.HEADER, names.HEADER_MAC):
                self.serve(name, out)
        roots = self.roots()
        for name in roots:
            frames.write_frame(out, FrameType.ENTRY, name)
        frames.write_frame(out, FrameType.END)
        out.flush()
        return roots

    # -- reading -------------------------------------------------------------------------------------

    def file_of(self, name: str) -> Path:
        if names.is_object_name(name):
            return self.path / names.OBJECTS_DIR / name[:2] / name
        if names.is_root_name(name) or name in (names.HEADER, names.HEADER_MAC):
            return self.path / name
        raise StorageError(f"bad request: not a repository file name: {frames.safe_text(name)}")

    def serve(self, name: str, out: BinaryIO) -> None:
        """One MEMBER frame with the file's content, streamed in pieces; a missing file is an error."""
        path = self.file_of(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StorageError(f"{name} is missing from repository {self.view}") from None
        except OSError as exc:
            raise self._fail(exc, "opening", name) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SERVE:
                raise StorageError(f"{name} in repository {self.view} is not a regular file of a possible size")
            size = st.st_size
            raw = name.encode("ascii")
            out.write(frames.encode_header(FrameType.MEMBER, len(raw), size) + raw)
            left = size
            try:
                left = _send_file(fd, out, size, name)
                while left:
                    piece = os.read(fd, min(COPY_PIECE, left))
                    if not piece:
                        raise MidFrame(f"{name} shrank while it was sent")
                    out.write(piece)
                    left -= len(piece)
            except OSError as exc:
                if isinstance(exc, BrokenPipeError | ConnectionResetError):
                    raise
                raise MidFrame(describe_oserror(exc, "reading", f"{self.view}/{name}")) from None
        finally:
            os.close(fd)

    # -- writing -------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Before a backup stores anything: the directories exist, partial files of a killed one are gone."""
        try:
            for d in (names.OBJECTS_DIR, names.ROOTS_DIR, TMP):
                (self.path / d).mkdir(mode=0o700, exist_ok=True)
            for entry in os.listdir(self.path / TMP):
                with contextlib.suppress(OSError):
                    os.unlink(self.path / TMP / entry)
        except OSError as exc:
            raise self._fail(exc, "preparing") from None

    def _write_tmp(self, data: bytes, sync: bool) -> Path:
        name = f".partial-{secrets.token_hex(8)}"
        _write_new(name, data, self._tmp_dir(), sync)
        return self.path / TMP / name

    def _tmp_dir(self) -> int:
        """A descriptor of ``tmp/``, kept for the session."""
        if self._tmp_fd is None:
            self._tmp_fd = os.open(self.path / TMP, _DIR_FLAGS)
        return self._tmp_fd

    def _object_dir(self, sub: str) -> int:
        """A descriptor of ``objects/XX`` (created if missing), kept for the session."""
        fd = self._dir_fds.get(sub)
        if fd is None:
            objects = self._dir_fds.get("")
            if objects is None:
                objects = self._dir_fds[""] = os.open(self.path / names.OBJECTS_DIR, _DIR_FLAGS)
            with contextlib.suppress(FileExistsError):
                os.mkdir(sub, 0o700, dir_fd=objects)
            fd = self._dir_fds[sub] = os.open(sub, _DIR_FLAGS, dir_fd=objects)
        return fd

    def store_object(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """An object, written whole to ``tmp/``, then renamed into place (an existing copy is replaced: the
        same id is the same content, and a fresh copy heals a damaged one).  Durable at ``commit``.
        Directories by descriptor, opened once: the only system calls per object are open, write, close and
        rename."""
        try:
            target = self._object_dir(name[:2])
            tmp = f"{self._partial}{self._count}"
            self._count += 1
            _write_new(tmp, data, self._tmp_dir(), sync=False)
            os.rename(tmp, name, src_dir_fd=self._tmp_fd, dst_dir_fd=target)
            if self._stored is not None:
                self._stored.append((name[:2], name))
                if len(self._stored) > FSYNC_EACH:
                    self._stored = None
        except OSError as exc:
            raise self._fail(exc, "storing an object in") from None

    def _make_durable(self) -> None:
        """The objects of this session on stable storage: each one and its directory fsynced when there are
        few (an unchanged or lightly changed system: a syncfs would also flush whatever else the backup VM
        wrote to that filesystem), else one syncfs."""
        if self._stored is None:
            _syncfs(self.path)
            return
        dirs = set()
        for sub, name in self._stored:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._object_dir(sub))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(sub)
        for sub in sorted(dirs):
            os.fsync(self._object_dir(sub))
        if dirs:
            os.fsync(self._dir_fds[""])  # objects/: a directory made this session

    def commit(self, header: tuple[bytes, bytes] | None, root: str, data: bytes) -> None:
        """Objects durable first; then a new repository's header (its MAC before it); the root last, linked
        so that an existing root is never replaced."""
        try:
            self._make_durable()
            if header is not None:
                if self.has_header:
                    raise StorageError(f"repository {self.view} has a header already; refusing to replace it")
                mac_tmp = self._write_tmp(header[1], sync=True)
                head_tmp = self._write_tmp(header[0], sync=True)
                os.rename(mac_tmp, self.path / names.HEADER_MAC)
                os.rename(head_tmp, self.path / names.HEADER)
                _fsync_dir(self.path)
            tmp = self._write_tmp(data, sync=True)
            try:
                os.link(tmp, self.path / root, follow_symlinks=False)
            except FileExistsError:
                raise StorageError(f"snapshot {root} exists already in repository {self.view}") from None
            finally:
                os.unlink(tmp)
            _fsync_dir(self.path / names.ROOTS_DIR)
        except OSError as exc:
            raise self._fail(exc, "committing the snapshot to") from None

    # -- pruning (docs/REPOSITORY.md section 11; prune.py decides, these only act) ---------------------

    def close(self) -> None:
        """Release the lock (a long-lived process that pruned; a service simply exits)."""
        for fd in [*self._dir_fds.values(), *([self._tmp_fd] if self._tmp_fd is not None else [])]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._dir_fds, self._tmp_fd = {}, None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def object_sizes(self) -> dict[str, int]:
        """Every object stored and its file's size, in one pass: ``objects/XX/ID`` with ``XX`` = ``ID[:2]``, a
        regular file (anything else there is not an object and is left alone); one listing per ``XX`` and one
        lstat per object, relative to the listed directory."""
        base = os.path.join(os.fsdecode(self.path), names.OBJECTS_DIR)
        sizes: dict[str, int] = {}
        try:
            subdirs = sorted(e for e in os.listdir(base) if _SUBDIR.fullmatch(e))
        except FileNotFoundError:
            return sizes
        except OSError as exc:
            raise self._fail(exc, "listing", names.OBJECTS_DIR) from None
        is_id, is_reg = _OBJECT_ID.fullmatch, stat.S_ISREG
        for sub in subdirs:
            try:
                fd = os.open(os.path.join(base, sub), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # a symbolic link: not ours
                    continue
                raise self._fail(exc, "listing", f"{names.OBJECTS_DIR}/{sub}") from None
            try:
                for name in os.listdir(fd):
                    if name[:2] == sub and is_id(name) is not None:
                        try:
                            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        except FileNotFoundError:  # gone since it was listed
                            continue
                        if is_reg(st.st_mode):
                            sizes[name] = st.st_size
            except OSError as exc:
                raise self._fail(exc, "listing", f"{names.OBJECTS_DIR}/{sub}") from None
            finally:
                os.close(fd)
        return sizes

    def _object_path(self, oid: str) -> str:
        return f"{os.fsdecode(self.path)}/{names.OBJECTS_DIR}/{oid[:2]}/{oid}"

    def read_clear(self, name: str) -> bytes:
        """The clear HEAD and REFS of an object or root (``name``: an id or ``roots/NAME``): 83 bytes, then
        65 per reference as HEAD states (at most MAX_CLEAR_REFS); shorter when the file is.  Raises
        FileNotFoundError when it is missing.  The caller checks the grammar."""
        path = self._object_path(name) if _OBJECT_ID.fullmatch(name) else self.file_of(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise self._fail(exc, "opening", name) from None
        try:
            head = os.pread(fd, HEAD_LEN, 0)
            m = _OBJECT_HEAD.fullmatch(head)
            if m is None:
                return head
            want = REF_LEN * min(int(m.group(2)), MAX_CLEAR_REFS)
            if not want:
                return head
            refs = bytearray()
            while len(refs) < want:
                piece = os.pread(fd, min(COPY_PIECE, want - len(refs)), HEAD_LEN + len(refs))
                if not piece:
                    break
                refs += piece
            return head + bytes(refs)
        except OSError as exc:
            raise self._fail(exc, "reading", name) from None
        finally:
            os.close(fd)

    def delete_root(self, name: str) -> None:
        """Delete a snapshot root, durably (``roots/`` is fsynced: a root prune deleted never comes back
        after a crash that kept the deletion of its objects)."""
        if not names.is_root_name(name):
            raise StorageError(f"not a root name: {frames.safe_text(name)}")
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path / name)
            _fsync_dir(self.path / names.ROOTS_DIR)
        except OSError as exc:
            raise self._fail(exc, "deleting", name) from None

    def delete_object(self, oid: str) -> None:
        """Delete an object (one already gone is not an error: a prune killed after deleting it)."""
        if not names.is_object_name(oid):
            raise StorageError(f"not an object name: {frames.safe_text(oid)}")
        try:
            os.unlink(self._object_path(oid))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._fail(exc, "deleting", oid) from None

    def delete_objects(self, oids: list[str]) -> None:
        """Delete objects as ``delete_object`` does, DELETERS batches at a time: an unlink waits on the disk (the
        inode, the allocation bitmaps, the journal), and one at a time leaves it idle in between (15,000 unlinks
        measured here: 5 to 11 s one by one, 0.7 to 1.6 s by 8 threads).  The first error stops it (deletions
        in flight complete) and is raised."""
        batches = [oids[i : i + DELETE_BATCH] for i in range(0, len(oids), DELETE_BATCH)]
        pool = ThreadPoolExecutor(DELETERS, thread_name_prefix="prune-delete")
        try:
            for _done in pool.map(self._delete_batch, batches):
                pass
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _delete_batch(self, oids: list[str]) -> None:
        for oid in oids:
            self.delete_object(oid)

    def clean_tmp(self) -> None:
        """Remove what a killed backup left in ``tmp/`` (only ever called under the exclusive lock)."""
        with contextlib.suppress(FileNotFoundError):
            entries = os.listdir(self.path / TMP)
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path / TMP / entry)


# ------------------------------------------------------------------------------------------- the sessions

AnyStore = Union[Repository, "RemoteStore"]  # a directory, or ssh / S3 (repostore/)


def open_repository(location: str, root: Path, create: bool) -> AnyStore:
    """The repository at ``location``: a directory (a path in the VM), ``ssh://…`` or ``s3://…``.  A backup
    may create it (a directory's parent must exist); it refuses a location that holds something else."""
    if location.startswith(("s3://", "ssh://")):
        from .repostore import open_remote

        return open_remote(location, root, create)
    try:
        path = confine.resolve(location, root)
    except confine.ConfinementError as exc:
        raise StorageError(str(exc)) from None
    view = confine.vm_view(path, root)
    if not path.is_dir():
        if path.exists() or path.is_symlink():
            raise StorageError(f"not a directory: {location}")
        if not create:
            raise StorageError(f"location does not exist: {location}")
        try:
            path.mkdir(mode=0o700)
        except OSError as exc:
            raise StorageError(describe_oserror(exc, "creating", view)) from None
    repo = Repository(path, root)
    if not repo.has_header:
        try:
            other = set(os.listdir(path)) - _OWN
        except OSError as exc:
            raise StorageError(describe_oserror(exc, "listing", view)) from None
        if other or repo.roots():
            raise StorageError(f"{view} is not empty and holds no repository")
        if not create:
            raise StorageError(f"{view} holds no repository")
    return repo


class _FrameStream:
    """The tar dom0 sends, as a stream: DATA frames are read as needed; GET requests that come between them
    are answered on the spot; COMMIT is the end of the stream.  ``take`` hands out views of a frame's data
    (a member inside one frame is never copied here; one that spans frames is put together once)."""

    def __init__(self, stdin: BinaryIO, stdout: BinaryIO, repo: Store) -> None:
        self.stdin, self.stdout, self.repo = stdin, stdout, repo
        self.buf = memoryview(b"")
        self.committed = False

    def _fill(self) -> bool:
        """The next DATA frame's data into ``buf`` (GETs before it answered); False at COMMIT."""
        while not self.buf:
            if self.committed:
                return False
            head = frames.read_header(self.stdin)
            if head is None:
                raise EarlyEnd
            ftype, name_len, data_len = head
            if ftype not in _BACKUP_FRAMES:
                raise frames.ProtocolError(f"unexpected frame type {ftype.name}")
            max_name, max_data = _BACKUP_FRAMES[ftype]
            if name_len > max_name or data_len > max_data:
                raise frames.ProtocolError(f"frame too long ({name_len}, {data_len} bytes)")
            name = frames.read_exact(self.stdin, name_len).decode("ascii", "replace")
            if ftype == FrameType.GET:
                self.repo.serve(name, self.stdout)
                self.stdout.flush()
            elif ftype == FrameType.COMMIT:
                self.committed = True
            else:
                self.buf = memoryview(frames.read_exact(self.stdin, data_len))
        return True

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer at a frame's end); b"" after COMMIT."""
        if not self._fill():
            return b""
        out, self.buf = self.buf[:n], self.buf[n:]
        return bytes(out)

    def take(self, n: int, what: str) -> memoryview | bytearray:
        """Exactly ``n`` bytes: a view of the current frame's data when it holds them, else put together."""
        if len(self.buf) >= n:
            out, self.buf = self.buf[:n], self.buf[n:]
            return out
        joined = bytearray()
        while len(joined) < n:
            if not self._fill():
                raise StorageError(f"bad request: the backup stream ends inside {what}")
            piece = self.buf[: n - len(joined)]
            joined += piece
            self.buf = self.buf[len(piece) :]
        return joined

    def read_exact(self, n: int, what: str) -> bytes:
        return bytes(self.take(n, what))


def _next_member(stream: _FrameStream) -> tuple[str, memoryview | bytearray] | None:
    """The next member of dom0's tar (canonical ustar headers only, FORMAT.md section 1), or None at its end."""
    h = stream.read_exact(BLOCK, "a tar header")
    if h == _ZERO_BLOCK:
        if stream.read_exact(BLOCK, "the end of the tar") != _ZERO_BLOCK:
            raise StorageError("bad request: a lone zero block in the backup stream")
        return None
    name = h[:100].split(b"\0", 1)[0].decode("latin-1")
    digits = h[124:136].rstrip(b"\0 ")
    if not names.is_member_name(name) or not digits or any(c not in b"01234567" for c in digits):
        raise StorageError(f"bad request: unexpected member {frames.safe_text(name)!r} in the backup stream")
    size = int(digits, 8)
    if size > MAX_STORE_MEMBER or h != member_header(name, size):
        raise StorageError(f"bad request: malformed tar header of {name}")
    data = stream.take(size, name)
    pad = -size % BLOCK
    if pad and stream.read_exact(pad, name) != _ZERO_BLOCK[:pad]:
        raise StorageError(f"bad request: non-zero padding after {name}")
    return name, data


def _check_object(name: str, data: memoryview | bytearray) -> None:
    """What the agent relies on later (a keyless prune follows the references): the clear header names the
    object and the file holds its references, an IV and a MAC line."""
    m = _OBJECT_HEAD.match(bytes(data[:HEAD_LEN]))
    if m is None or m.group(1).decode() != name or len(data) < 83 + 65 * int(m.group(2)) + 16 + 65:
        raise StorageError(f"bad request: object {name[:16]} is malformed")


def receive_backup(
    stream: _FrameStream, repo: Store, newest: int
) -> tuple[str, tuple[bytes, bytes] | None, bytes]:
    """Store the objects of dom0's tar; returns the root's name, the new header (with its MAC) if the
    repository is being created, and the root."""
    header: dict[str, bytes] = {}
    root: tuple[str, bytes] | None = None
    first = True
    while (member := _next_member(stream)) is not None:
        name, data = member
        if root is not None:
            raise StorageError("bad request: members after the snapshot root")
        if name in (names.HEADER, names.HEADER_MAC):
            expected = names.HEADER if first else names.HEADER_MAC
            if repo.has_header or name != expected or len(data) > 4096:
                raise StorageError("bad request: a repository header where none belongs")
            header[name] = bytes(data)
        elif names.is_object_name(name):
            _check_object(name, data)
            if isinstance(repo, Repository):  # a directory writes the view as it is
                repo.store_object(name, data)
            else:
                repo.store_object(name, bytes(data))
        else:
            if names.root_seq(name) <= newest:
                raise StorageError(f"bad request: snapshot {names.root_seq(name)} is not newer than the newest "
                                   f"one in repository {repo.view} ({newest})")  # fmt: skip
            root = (name, bytes(data))
        first = False
    if stream.read(1) or not stream.committed:
        raise StorageError("bad request: data after the end of the backup stream")
    if root is None:
        raise StorageError("bad request: the backup stream has no snapshot root")
    if not repo.has_header and len(header) != 2:
        raise StorageError("bad request: a new repository needs its header")
    new_header = (header[names.HEADER], header[names.HEADER_MAC]) if header else None
    return root[0], new_header, root[1]


def serve_backup(location: str, root: Path, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """qubes.Backup in repository mode (docs/REPOSITORY.md section 9)."""
    repo: Store | None = None
    try:
        repo = open_repository(location, root, create=True)
        repo.lock(exclusive=True)
        roots = repo.send_opening(stdout)
        newest = names.root_seq(roots[-1]) if roots else 0
        repo.prepare()
        stream = _FrameStream(stdin, stdout, repo)
        name, header, data = receive_backup(stream, repo, newest)
        repo.commit(header, name, data)
    except EarlyEnd:
        print("qubes-backup-agent: stream ended before COMMIT; nothing committed", file=sys.stderr)
        return EXIT_FAILED
    except (StorageError, frames.ProtocolError) as exc:
        send_error(stdout, str(exc) if isinstance(exc, StorageError) else f"bad request: {exc}")
        return EXIT_FAILED
    except MidFrame as exc:
        print(f"qubes-backup-agent: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (BrokenPipeError, ConnectionResetError):
        silence(stdout)
        return EXIT_FAILED
    finally:
        if repo is not None:
            repo.close()
    try:
        frames.write_frame(stdout, FrameType.DONE, "", name.encode("ascii"))
        stdout.flush()
    except (BrokenPipeError, ConnectionResetError):
        silence(stdout)
    return EXIT_OK


def serve_restore(location: str, root: Path, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """qubes.Restore in repository mode: the opening, then one MEMBER per GET (and per id of a GETS, in
    order) until dom0 hangs up."""
    repo: Store | None = None
    try:
        repo = open_repository(location, root, create=False)
        repo.lock(exclusive=False)
        repo.send_opening(stdout)
        while True:
            frame = frames.read_frame(stdin, _RESTORE_FRAMES)
            if frame is None:
                raise PeerGone
            if frame.type == FrameType.GETS:
                try:
                    wanted = names.parse_gets(frame.data)
                except ValueError as exc:
                    raise frames.ProtocolError(str(exc)) from None
            else:
                wanted = [frame.name]
            for name in wanted:  # one MEMBER each, in order
                repo.serve(name, stdout)
            stdout.flush()
    except (PeerGone, BrokenPipeError, ConnectionResetError):
        silence(stdout)
        return EXIT_OK
    except MidFrame as exc:
        print(f"qubes-backup-agent: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (StorageError, frames.ProtocolError) as exc:
        send_error(stdout, str(exc) if isinstance(exc, StorageError) else f"bad request: {exc}")
        return EXIT_FAILED
    finally:
        if repo is not None:
            repo.close()
