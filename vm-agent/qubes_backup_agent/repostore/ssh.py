"""A repository on an ssh server: ``ssh://[user@]host[:port]/path`` (``/~/path``: in the remote home), the
same URLs, ssh configuration and keys as the single-file ssh storage (storage/ssh.py).

One SFTP session (``ssh -s sftp``, sftp.py) per repository session, whatever the number of objects: a GET is
one OPEN, pipelined READs and a CLOSE; storing an object is one round trip (OPEN) and pipelined WRITEs,
``fsync@openssh.com``, CLOSE and ``posix-rename@openssh.com`` from ``tmp/.partial-RANDOM`` to
``objects/XX/ID``, whose statuses are checked as they arrive and all before the root is written.

Exclusive names (the lock, the header, a root) are written to ``tmp/`` and renamed with SFTP's plain RENAME,
which fails when the new name exists (SFTP version 3; OpenSSH's server links, then unlinks): never over an
existing root.  SFTP cannot fsync a directory: a root's rename is as durable as the server's file system makes
renames (ext4, xfs, btrfs commit it with their journal).
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from qubes_backup_protocol import repo as names

from ..storage import StorageError
from ..storage import ssh as ssh_storage
from . import sftp
from .base import TMP, Exists, Missing, RemoteStore
from .sftp import SftpStatus

MAX_QUEUED = 64 << 20  # bytes of objects held while their OPEN is answered


class SshStore(RemoteStore):
    def __init__(self, url: str, root: Path, create: bool) -> None:
        self.target = ssh_storage.parse_url(url)
        self.view = self.target.url()
        self.client = sftp.SftpClient(self.target, root)
        self.listed_sizes: dict[str, int] = {}
        self.queued = 0  # bytes of objects whose OPEN is in flight (held until their handle arrives)
        self.dirs: set[str] = set()  # directories known to exist (relative to the repository)
        self.posix_rename = b"posix-rename@openssh.com" in self.client.extensions
        self.fsync = b"fsync@openssh.com" in self.client.extensions
        try:
            attrs = self._op(lambda: self.client.stat(self.target.path, follow=True), "opening")
            if attrs is None:
                if not create:
                    raise StorageError(f"location does not exist: {self.view}")
                self._op(lambda: self.client.call(sftp.MKDIR, self._mkdir_payload(self.target.path), ()), "creating")
            elif not attrs.is_dir:
                raise StorageError(f"not a directory: {self.view}")
        except BaseException:
            self.client.close()
            raise

    # -- helpers -------------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        return self.target.path if not key else self.target.child(key)

    def _op(self, fn, doing: str):  # type: ignore[no-untyped-def]
        try:
            return fn()
        except SftpStatus as exc:
            raise StorageError(f"sftp: {doing} {self.view} failed: {exc}") from None

    @staticmethod
    def _mkdir_payload(path: str) -> bytes:
        return sftp._string(path) + struct.pack(">II", 0x4, 0o700)

    def _ensure_dir(self, key: str) -> None:
        if key in self.dirs:
            return
        try:
            self.client.call(sftp.MKDIR, self._mkdir_payload(self._path(key)), ())
        except SftpStatus as exc:
            attrs = self.client.stat(self._path(key))
            if attrs is None or not attrs.is_dir:
                raise StorageError(f"sftp: creating {self.target.url(self._path(key))} failed: {exc}") from None
        self.dirs.add(key)

    def _failed(self, what: str) -> Callable[[int, str], None]:
        def check(code: int, message: str) -> None:
            if code != sftp.OK:
                raise StorageError(f"sftp: {what} in {self.view} failed: {message}")

        return check

    # -- primitives ----------------------------------------------------------------------------------

    def load(self, key: str, limit: int) -> bytes:
        """Two round trips: LSTAT with OPEN, then pipelined READs (CLOSE is not waited for)."""
        name = key.rsplit("/", 1)[-1]
        try:
            attrs, handle = self.client.stat_and_open(self._path(key))
        except SftpStatus as exc:
            raise StorageError(f"sftp: opening {key} of {self.view} failed: {exc}") from None
        if attrs is None or handle is None:
            raise Missing(key)
        try:
            if not attrs.is_file or attrs.size is None:
                raise StorageError(f"{name} in repository {self.view} is not a regular file")
            if attrs.size > limit:
                raise StorageError(f"{name} in repository {self.view} is larger than possible ({attrs.size} bytes)")
            size = attrs.size
            data = self._op(lambda: self.client.read(handle, 0, size + 1), f"reading {key} of")
            if len(data) != size:
                raise StorageError(f"{name} in repository {self.view} changed while it was read")
            return data
        finally:
            self.client.defer(sftp.CLOSE, sftp._string(handle), lambda code, message: None)

    def load_prefix(self, key: str, length: int) -> bytes:
        handle = self._open_read(key)
        try:
            return bytes(self._op(lambda: self.client.read(handle, 0, length), f"reading {key} of"))
        finally:
            self.client.defer(sftp.CLOSE, sftp._string(handle), lambda code, message: None)

    def _open_read(self, key: str) -> bytes:
        try:
            return self.client.open(self._path(key), sftp.F_READ)
        except SftpStatus as exc:
            if exc.code == sftp.NO_SUCH_FILE:
                raise Missing(key) from None
            raise StorageError(f"sftp: opening {key} of {self.view} failed: {exc}") from None

    def size(self, key: str) -> int | None:
        attrs = self._op(lambda: self.client.stat(self._path(key)), f"reading {key} of")
        if attrs is None:
            return None
        if not attrs.is_file or attrs.size is None:
            raise StorageError(f"{key} in repository {self.view} is not a regular file")
        return attrs.size

    def listdir(self, directory: str, limit: int) -> Iterator[str]:
        try:
            for name, attrs in self.client.listdir(self._path(directory), limit):
                if attrs.is_file or attrs.is_dir:
                    yield name
        except SftpStatus as exc:
            if exc.code != sftp.NO_SUCH_FILE:
                raise StorageError(f"sftp: listing {directory or '.'} of {self.view} failed: {exc}") from None

    def object_ids(self) -> Iterator[str]:
        """As the base's, keeping the sizes READDIR gives (prune asks for every object's size)."""
        for sub in sorted(self.listdir(names.OBJECTS_DIR, 4096)):
            if len(sub) != 2 or any(c not in "0123456789abcdef" for c in sub):
                continue
            directory = f"{names.OBJECTS_DIR}/{sub}"
            found = []
            try:
                for name, attrs in self.client.listdir(self._path(directory), 1 << 40):
                    if names.is_object_name(name) and name[:2] == sub and attrs.is_file:
                        found.append(name)
                        if attrs.size is not None:
                            self.listed_sizes[name] = attrs.size
            except SftpStatus as exc:
                if exc.code != sftp.NO_SUCH_FILE:
                    raise StorageError(f"sftp: listing {directory} of {self.view} failed: {exc}") from None
            yield from sorted(found)

    def save(self, key: str, data: bytes, *, exclusive: bool, durable: bool) -> None:
        tmp = f"{TMP}/.partial-{secrets.token_hex(8)}"
        self._ensure_dir(TMP)
        if "/" in key:
            parent = key.rsplit("/", 1)[0]
            if parent.count("/") == 1:
                self._ensure_dir(parent.split("/")[0])
            self._ensure_dir(parent)
        flags = sftp.F_WRITE | sftp.F_CREAT | sftp.F_EXCL
        check = self._failed(f"writing {key}")
        old, new = sftp._string(self._path(tmp)), sftp._string(self._path(key))
        replace = not exclusive and self.posix_rename

        def opened(answer: sftp._Reader) -> None:
            handle = answer.string()
            if len(handle) > 256:
                raise StorageError("sftp: the server sent an oversize handle")
            self.client.write(handle, data, check, wait=False)
            if self.fsync:  # every file: SFTP has no syncfs to call once at commit
                fsync = sftp._string(b"fsync@openssh.com") + sftp._string(handle)
                self.client.defer(sftp.EXTENDED, fsync, check, wait=False)
            self.client.defer(sftp.CLOSE, sftp._string(handle), check, wait=False)
            if replace:
                rename = sftp._string(b"posix-rename@openssh.com") + old + new
                self.client.defer(sftp.EXTENDED, rename, check, wait=False)
            self.queued -= len(data)

        # The OPEN goes out now; what follows goes when its handle arrives: no round trip per object.
        self.client.then(sftp.OPEN, sftp._string(self._path(tmp)) + sftp.open_flags(flags), (sftp.HANDLE,),
                         f"storing {key} in {self.view}", opened)  # fmt: skip
        self.queued += len(data)
        try:
            while self.client.in_flight() > sftp.WINDOW or self.queued > MAX_QUEUED:
                self.client._dispatch_one()
            if replace:
                return
            self.client.settle()
        except SftpStatus as exc:
            raise StorageError(f"sftp: storing {key} in {self.view} failed: {exc}") from None
        try:
            self.client.call(sftp.RENAME, old + new, ())
        except SftpStatus as exc:
            taken = self.client.stat(self._path(key)) is not None
            self.client.defer(sftp.REMOVE, old, lambda code, message: None)
            if not taken:
                raise StorageError(f"sftp: storing {key} in {self.view} failed: {exc}") from None
            if exclusive:
                raise Exists(key) from None
            # an object of the same id exists: the same content (and no posix-rename to replace it)

    def remove(self, key: str) -> None:
        try:
            self.client.call(sftp.REMOVE, sftp._string(self._path(key)), ())
        except SftpStatus as exc:
            if exc.code != sftp.NO_SUCH_FILE:
                raise StorageError(f"sftp: removing {key} from {self.view} failed: {exc}") from None

    def sync(self) -> None:
        self.client.settle()

    def disconnect(self) -> None:
        self.client.close()

    def clean_tmp(self) -> None:
        for entry in list(self.listdir(TMP, 1 << 20)):
            if entry.startswith(".partial-"):
                self.client.defer(sftp.REMOVE, sftp._string(self._path(f"{TMP}/{entry}")), lambda c, m: None)
        self.client.settle()

    def prepare(self) -> None:
        for d in (names.OBJECTS_DIR, names.ROOTS_DIR, TMP):
            self._ensure_dir(d)
        for sub in self.listdir(names.OBJECTS_DIR, 4096):
            self.dirs.add(f"{names.OBJECTS_DIR}/{sub}")
        self.clean_tmp()
