"""Backups as files in a directory of the VM: written under a temporary name, renamed only when complete."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import queue
import secrets
import threading
from pathlib import Path
from typing import BinaryIO

from .. import confine
from . import StorageError


def describe_oserror(exc: OSError, action: str, where: str) -> str:
    """One line such as ``No space left on device writing /home/user/backups/x``."""
    reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "") or type(exc).__name__
    return f"{reason} {action} {where}"


WRITEBACK_WINDOW = 64 << 20
DIRECT_BUFFER = 4 << 20  # one O_DIRECT write; a multiple of any logical block size
DIRECT_BUFFERS = 3  # one being filled, one being written, one queued
DIRECT_ALIGN = 4096
ABORT_WAIT = 10.0  # seconds an aborted backup waits for the writer thread's last write


class _DirectWriter:
    """The file written with O_DIRECT from a few reused page-aligned buffers, on a thread of its own.

    Buffered writes (and splice into the file) copy every byte into freshly allocated page-cache pages
    that this process charges, writes back and drops again; in a VM whose freed memory goes back to the
    hypervisor, touching those fresh pages is most of the agent's CPU (measured: 0.4 to 3 CPU-s per GiB,
    depending on whether the kernel happens to reuse pages).  O_DIRECT writes from buffers that stay
    mapped: one copy (pipe -> buffer), no page cache.  The thread overlaps the disk with the next read.
    Full buffers are written at aligned offsets; the unaligned tail is written without O_DIRECT at the
    end (``finish``); the caller then fsyncs as before."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(DIRECT_BUFFERS):
            self._free.put(mmap.mmap(-1, DIRECT_BUFFER))
        self._full: queue.Queue[tuple[mmap.mmap, int, int] | None] = queue.Queue()
        self._buf: mmap.mmap | None = None
        self._fill = 0
        self._offset = 0  # file offset of the current buffer
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="direct-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._full.get()
            if item is None:
                return
            buf, n, offset = item
            if self.error is None:
                try:
                    self._pwrite(memoryview(buf)[:n], offset)
                except OSError as exc:
                    self.error = exc
            self._free.put(buf)

    def _pwrite(self, view: memoryview, offset: int) -> None:
        while view:
            try:
                written = os.pwrite(self.fd, view, offset)
            except OSError as exc:
                flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
                if exc.errno != errno.EINVAL or not flags & os.O_DIRECT:
                    raise
                fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)  # refused after all: buffered
                continue
            view, offset = view[written:], offset + written

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def space(self) -> memoryview:
        """Where the next bytes go (the free tail of the current buffer); then ``advance``."""
        self._check()
        if self._buf is None:
            self._buf, self._fill = self._free.get(), 0
        return memoryview(self._buf)[self._fill :]

    def advance(self, n: int) -> None:
        self._fill += n
        if self._fill == DIRECT_BUFFER:
            assert self._buf is not None
            self._full.put((self._buf, DIRECT_BUFFER, self._offset))
            self._offset += DIRECT_BUFFER
            self._buf, self._fill = None, 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            room = self.space()
            take = min(len(room), len(view))
            room[:take] = view[:take]
            room.release()
            view = view[take:]
            self.advance(take)

    def finish(self) -> None:
        """Everything written: whole aligned blocks directly, the tail without O_DIRECT."""
        self._check()
        head = self._fill - self._fill % DIRECT_ALIGN
        tail = b""
        if self._buf is not None:
            tail = bytes(self._buf[head : self._fill])
            if head:
                self._full.put((self._buf, head, self._offset))
            else:
                self._free.put(self._buf)
            self._buf = None
        self.stop()
        self._check()
        if tail:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self._pwrite(memoryview(tail), self._offset + head)

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the thread once it has written what is queued; False if it is still busy after ``timeout``
        (a write hung on a dead disk or network share)."""
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join(timeout)
        return not self._thread.is_alive()


TMPFS_MAGIC = 0x01021994


def _fs_type(fd: int) -> int | None:
    """statfs(2)'s f_type of ``fd``'s filesystem (Linux), None if unknown."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        buf = (ctypes.c_long * 32)()  # struct statfs (120 bytes on 64-bit Linux), f_type first
        if libc.fstatfs(fd, buf) != 0:
            return None
        return int(buf[0]) & 0xFFFFFFFF
    except (OSError, AttributeError):
        return None


def _set_direct(fd: int) -> bool:
    """Switch ``fd`` to O_DIRECT; False where the filesystem refuses it (tmpfs before Linux 6.6, FUSE...)
    or where it would only add a copy (tmpfs accepts O_DIRECT but its pages are the file itself)."""
    if not hasattr(os, "O_DIRECT") or _fs_type(fd) == TMPFS_MAGIC:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError:
        return False
    return True


class DirectorySink:
    """Writes DIR/.NAME.partial-RANDOM, fsyncs, then renames it to DIR/NAME on commit.

    The temporary name never starts with ``qubes-backup-``, so an interrupted backup never looks finished.
    """

    def __init__(self, directory: Path, name: str, root: Path) -> None:
        self.directory = directory
        self.name = name
        self.root = root
        self.final = directory / name
        self.tmp = directory / f".{name}.partial-{secrets.token_hex(6)}"
        self.final_view = confine.vm_view(self.final, root)
        if self.final.exists() or self.final.is_symlink():
            raise StorageError(f"backup already exists: {self.final_view}")
        try:
            self.fd: int | None = os.open(
                self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            where = confine.vm_view(directory, root)
            raise StorageError(describe_oserror(exc, "creating a file in", where)) from None
        self.created = True
        self._written = 0
        self._flushed = 0
        self._splice = hasattr(os, "splice")
        self._direct = _DirectWriter(self.fd) if _set_direct(self.fd) else None

    def write(self, data: bytes | memoryview) -> None:
        assert self.fd is not None
        view = memoryview(data)
        if self._direct is not None:
            try:
                self._direct.write(view)
            except OSError as exc:
                raise StorageError(describe_oserror(exc, "writing", self.final_view)) from None
            self._written += len(view)
            return
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
                self._written += written
            self._writeback()
        except OSError as exc:
            raise StorageError(describe_oserror(exc, "writing", self.final_view)) from None

    def splice_from(self, src: int, n: int) -> int:
        """Move ``n`` bytes from the pipe ``src`` into the file: read into the O_DIRECT writer's buffers, or
        (where O_DIRECT is refused) with splice(2); fewer only at the end of ``src``.  Falls back to
        read/write where splice is refused."""
        assert self.fd is not None
        if self._direct is not None:
            return self._read_direct(src, n)
        moved = 0
        try:
            while moved < n:
                try:
                    got = os.splice(src, self.fd, n - moved) if self._splice else 0
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    self._splice = False
                    continue
                if not self._splice:
                    piece = os.read(src, min(n - moved, 1 << 20))
                    if not piece:
                        break
                    self.write(piece)
                    moved += len(piece)
                    continue
                if not got:
                    break
                moved += got
                self._written += got
            self._writeback()
        except OSError as exc:
            raise StorageError(describe_oserror(exc, "writing", self.final_view)) from None
        return moved

    def _read_direct(self, src: int, n: int) -> int:
        """``n`` bytes from ``src`` read straight into the direct writer's buffers (one copy)."""
        assert self._direct is not None
        moved = 0
        try:
            while moved < n:
                room = self._direct.space()
                got = os.readv(src, [room[: n - moved]])
                room.release()
                if not got:
                    break
                self._direct.advance(got)
                moved += got
        except OSError as exc:
            raise StorageError(describe_oserror(exc, "writing", self.final_view)) from None
        self._written += moved
        return moved

    def _writeback(self) -> None:
        if self._written - self._flushed >= WRITEBACK_WINDOW:
            # Start writing back what we have so far instead of letting GiBs of dirty pages pile up for the
            # final fsync: the disk works while dom0 is still compressing and encrypting.
            assert self.fd is not None
            os.posix_fadvise(self.fd, self._flushed, self._written - self._flushed, os.POSIX_FADV_DONTNEED)
            self._flushed = self._written

    def commit(self) -> str:
        assert self.fd is not None
        try:
            if self._direct is not None:
                self._direct.finish()
                self._direct = None
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            # link + unlink instead of rename: fails if a file of that name appeared meanwhile (never replaces).
            # Filesystems without hard links (vfat/exfat USB sticks) fall back to check-then-rename.
            try:
                os.link(self.tmp, self.final, follow_symlinks=False)
            except FileExistsError:
                raise StorageError(f"backup already exists: {self.final_view}") from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                    raise
                if self.final.exists() or self.final.is_symlink():
                    raise StorageError(f"backup already exists: {self.final_view}") from None
                os.rename(self.tmp, self.final)
            else:
                os.unlink(self.tmp)
            self.created = False
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StorageError(describe_oserror(exc, "finishing", self.final_view)) from None
        return self.final_view

    def abort(self) -> None:
        if self._direct is not None:
            stopped = self._direct.stop(ABORT_WAIT)
            self._direct = None
            if not stopped:
                self.fd = None  # its thread may still write: never close a descriptor under it (reuse)
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        if self.created:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.created = False


def open_file(path: Path, root: Path) -> BinaryIO:
    """Open a stored backup for reading (seekable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise StorageError(describe_oserror(exc, "opening", confine.vm_view(path, root))) from None
    return os.fdopen(fd, "rb", buffering=1 << 16)
