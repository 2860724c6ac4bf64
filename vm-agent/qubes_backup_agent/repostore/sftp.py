"""A small, strict SFTP (version 3) client over one ``ssh -s … sftp`` process: the few operations a
repository needs, pipelined.

Why not paramiko: the agent would need another package in every template, and paramiko's SFTP expects its
own transport; the system ssh (the user's config, keys, known_hosts, agent, ProxyJump) is what
storage/ssh.py already uses.  Why not a shell on the server: SFTP works for sftp-only accounts
(``ForceCommand internal-sftp``, NAS boxes, hosting storage) and needs no process per file.

Strict: every packet's length is bounded before it is read (MAX_PACKET), every reply must answer a request we
sent, with the type that request allows; a server that breaks the protocol ends the session with one line.
Requests whose answer is only a status (WRITE, CLOSE, RENAME, fsync) may be *deferred*: sent at once, their
status checked when it arrives (``settle`` waits for all of them); a request may also name what follows its
answer (``then``: an OPEN's handle is written to, closed and renamed when it arrives).  So storing objects
costs no round trip of its own: only the window of requests in flight waits.
"""

from __future__ import annotations

import contextlib
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..storage import StorageError
from ..storage import ssh as ssh_storage

VERSION = 3
MAX_PACKET = 256 << 10  # OpenSSH's sftp-server limit (SFTP_MAX_MSG_LENGTH); nothing we ask for is larger
CHUNK = 64 << 10  # bytes per READ / WRITE request
FLUSH_AT = 1 << 20  # queued request bytes sent without waiting for an answer
WINDOW = 256  # requests in flight before we wait for answers (their replies fit in the pipes)
MAX_NAMES_PACKET = 4096  # entries in one NAME reply

# packet types
INIT, VERSION_T, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT = 1, 2, 3, 4, 5, 6, 7, 8
OPENDIR, READDIR, REMOVE, MKDIR, STAT, RENAME = 11, 12, 13, 14, 17, 18
STATUS, HANDLE, DATA, NAME, ATTRS, EXTENDED, EXTENDED_REPLY = 101, 102, 103, 104, 105, 200, 201
# open flags
F_READ, F_WRITE, F_CREAT, F_TRUNC, F_EXCL = 0x1, 0x2, 0x8, 0x10, 0x20
# status codes
OK, EOF, NO_SUCH_FILE, PERMISSION_DENIED, FAILURE = 0, 1, 2, 3, 4
_STATUS_TEXT = {2: "no such file", 3: "permission denied", 4: "failure", 5: "bad message", 8: "unsupported"}
S_IFMT, S_IFREG, S_IFDIR = 0o170000, 0o100000, 0o040000


class SftpStatus(Exception):
    """A request failed on the server: ``code`` is the SFTP status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Attrs:
    size: int | None
    mode: int | None

    @property
    def is_file(self) -> bool:
        return self.mode is None or self.mode & S_IFMT == S_IFREG

    @property
    def is_dir(self) -> bool:
        return self.mode is not None and self.mode & S_IFMT == S_IFDIR


class _Reader:
    """Parses one packet's payload; running past its end is a protocol error."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise StorageError("sftp: malformed reply from the server")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def string(self) -> bytes:
        return self.take(self.u32())

    def attrs(self) -> Attrs:
        flags = self.u32()
        size = self.u64() if flags & 0x1 else None
        if flags & 0x2:
            self.take(8)
        mode = self.u32() if flags & 0x4 else None
        if flags & 0x8:
            self.take(8)
        if flags & 0x80000000:
            for _ in range(self.u32()):
                self.string()
                self.string()
        return Attrs(size, mode)


def open_flags(flags: int) -> bytes:
    """OPEN's flags and attributes: a file we create is the user's alone (0600)."""
    return struct.pack(">III", flags, 0x4, 0o600) if flags & F_CREAT else struct.pack(">II", flags, 0)


def _string(data: bytes | str) -> bytes:
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    return struct.pack(">I", len(raw)) + raw


class SftpClient:
    """One SFTP session through the system ssh (storage/ssh.py's options and configuration)."""

    def __init__(self, target: ssh_storage.Target, root: Path) -> None:
        self.target = target
        client = ssh_storage._Client(target, root)
        argv = [*client.argv, "-s", *target.destination(), "sftp"]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, bufsize=0, close_fds=True)  # fmt: skip
        except OSError as exc:
            raise StorageError(f"cannot run ssh: {exc.strerror or exc}") from None
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.tail = ssh_storage._StderrTail(self.proc.stderr)  # type: ignore[arg-type]
        self.next_id = 1
        self.outbuf = bytearray()
        self.pending: dict[int, tuple[int, ...]] = {}  # id -> reply types it allows (sync requests)
        self.deferred: dict[int, Callable[[int, str], None]] = {}  # id -> check of a status-only reply
        self.callbacks: dict[int, tuple[tuple[int, ...], str, Callable[[_Reader], None]]] = {}  # what follows
        self.answers: dict[int, tuple[int, _Reader]] = {}
        self.extensions: dict[bytes, bytes] = {}
        self._send(bytes([INIT]) + struct.pack(">I", VERSION))
        ptype, body = self._read_packet()
        if ptype != VERSION_T:
            raise StorageError(f"sftp: {target.authority} did not answer as an SFTP server")
        if body.u32() != VERSION:
            raise StorageError(f"sftp: {target.authority} does not speak SFTP version 3")
        count = 0
        while body.pos < len(body.data) and count < 64:
            name, value = body.string(), body.string()
            self.extensions[name] = value
            count += 1

    # -- the wire ------------------------------------------------------------------------------------

    def _lost(self, doing: str) -> StorageError:
        with contextlib.suppress(OSError):
            self.stdin.close()
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        text = self.tail.text()
        if "subsystem request failed" in text:
            return StorageError(f"ssh: {self.target.authority} offers no SFTP (repositories over ssh need the "
                                "server's sftp subsystem)")  # fmt: skip
        if rc == 0:
            rc = ssh_storage.SSH_FAILED  # the server ended the session: say why if ssh did
        return StorageError(ssh_storage.describe_failure(self.target, rc, text, doing))

    def _send(self, payload: bytes) -> None:
        """Queue a packet: requests go out together when an answer is awaited (or FLUSH_AT bytes are queued),
        as few writes as possible; small writes one after another would each wait for the previous one's
        TCP acknowledgement (Nagle's algorithm against delayed ACKs: ~40 ms per object)."""
        self.outbuf += struct.pack(">I", len(payload))
        self.outbuf += payload
        if len(self.outbuf) >= FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        view = memoryview(bytes(self.outbuf))
        self.outbuf.clear()
        try:
            while view:
                view = view[self.stdin.write(view) or 0 :]
        except (BrokenPipeError, ConnectionResetError, ValueError):
            raise self._lost("sending a request") from None

    def _read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            try:
                piece = self.stdout.read(n - len(out))
            except OSError:
                piece = b""
            if not piece:
                raise self._lost("reading an answer")
            out += piece
        return bytes(out)

    def _read_packet(self) -> tuple[int, _Reader]:
        if self.outbuf:
            self._flush()
        (length,) = struct.unpack(">I", self._read_exact(4))
        if not 1 <= length <= MAX_PACKET + 1024:
            raise StorageError(f"sftp: {self.target.authority} sent a packet of {length} bytes")
        data = self._read_exact(length)
        return data[0], _Reader(data[1:])

    def _request(self, ptype: int, payload: bytes) -> int:
        rid = self.next_id
        self.next_id = (self.next_id + 1) & 0xFFFFFFFF or 1
        self._send(bytes([ptype]) + struct.pack(">I", rid) + payload)
        return rid

    def _dispatch_one(self) -> None:
        ptype, body = self._read_packet()
        rid = body.u32()
        if rid in self.deferred:
            check = self.deferred.pop(rid)
            if ptype != STATUS:
                raise StorageError(f"sftp: {self.target.authority} answered a request with packet type {ptype}")
            code, message = self._status(body)
            check(code, message)
        elif rid in self.callbacks:
            allowed, what, then = self.callbacks.pop(rid)
            if ptype not in allowed:
                raise StorageError(f"sftp: {self.target.authority} answered a request with packet type {ptype}")
            if ptype == STATUS:
                raise StorageError(f"sftp: {what} failed: {self._status(body)[1]}")
            then(body)
        elif rid in self.pending:
            allowed = self.pending.pop(rid)
            if ptype not in allowed:
                raise StorageError(f"sftp: {self.target.authority} answered a request with packet type {ptype}")
            self.answers[rid] = (ptype, body)
        else:
            raise StorageError(f"sftp: {self.target.authority} answered a request that was not made")

    def _status(self, body: _Reader) -> tuple[int, str]:
        code = body.u32()
        message = ""
        if body.pos < len(body.data):
            message = ssh_storage._CONTROL_RE.sub("?", body.string()[:200].decode("utf-8", "replace"))
        return code, message or _STATUS_TEXT.get(code, f"status {code}")

    def call(self, ptype: int, payload: bytes, allowed: tuple[int, ...]) -> tuple[int, _Reader]:
        """Send a request and wait for its answer (answering deferred ones meanwhile)."""
        rid = self._request(ptype, payload)
        self.pending[rid] = (STATUS, *allowed)
        while rid not in self.answers:
            self._dispatch_one()
        ptype, body = self.answers.pop(rid)
        if ptype == STATUS:
            code, message = self._status(body)
            if code != OK or allowed:
                raise SftpStatus(code, message)
        return ptype, body

    def defer(self, ptype: int, payload: bytes, check: Callable[[int, str], None], wait: bool = True) -> None:
        """Send a request whose answer is a status; ``check(code, message)`` runs when it arrives.  ``wait``:
        first let the answers catch up if WINDOW requests are in flight (not from within a callback)."""
        self.deferred[self._request(ptype, payload)] = check
        while wait and self.in_flight() > WINDOW:
            self._dispatch_one()

    def then(self, ptype: int, payload: bytes, allowed: tuple[int, ...], what: str,
             then: Callable[[_Reader], None]) -> None:  # fmt: skip
        """Send a request; ``then(answer)`` runs when its answer (of an ``allowed`` type) arrives; a status
        instead is a StorageError (``what`` failed) then."""
        self.callbacks[self._request(ptype, payload)] = ((STATUS, *allowed), what, then)

    def in_flight(self) -> int:
        return len(self.deferred) + len(self.callbacks)

    def settle(self) -> None:
        """Wait until every deferred request has been answered (and checked)."""
        while self.deferred or self.callbacks:
            self._dispatch_one()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError, ValueError):
            self.stdout.close()

    # -- operations ----------------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> bytes:
        _t, body = self.call(OPEN, _string(path) + open_flags(flags), (HANDLE,))
        handle = body.string()
        if len(handle) > 256:
            raise StorageError("sftp: the server sent an oversize handle")
        return handle

    def stat_and_open(self, path: str) -> tuple[Attrs | None, bytes | None]:
        """LSTAT and OPEN(read) of ``path`` in one round trip: (its attributes, a handle), None if missing."""
        stat_id = self._request(LSTAT, _string(path))
        self.pending[stat_id] = (STATUS, ATTRS)
        open_id = self._request(OPEN, _string(path) + struct.pack(">II", F_READ, 0))
        self.pending[open_id] = (STATUS, HANDLE)
        while stat_id not in self.answers or open_id not in self.answers:
            self._dispatch_one()
        error: SftpStatus | None = None
        attrs: Attrs | None = None
        handle: bytes | None = None
        for rid in (stat_id, open_id):
            ptype, body = self.answers.pop(rid)
            if ptype == STATUS:
                code, message = self._status(body)
                if code != NO_SUCH_FILE:
                    error = SftpStatus(code, message)
            elif ptype == ATTRS:
                attrs = body.attrs()
            else:
                handle = body.string()
                if len(handle) > 256:
                    raise StorageError("sftp: the server sent an oversize handle")
        if attrs is None or handle is None:
            if handle is not None:
                self.defer(CLOSE, _string(handle), lambda code, message: None)
            if error is not None:
                raise error
            return None, None
        return attrs, handle

    def close_handle(self, handle: bytes) -> None:
        self.call(CLOSE, _string(handle), ())

    def stat(self, path: str, follow: bool = False) -> Attrs | None:
        try:
            _t, body = self.call(STAT if follow else LSTAT, _string(path), (ATTRS,))
        except SftpStatus as exc:
            if exc.code == NO_SUCH_FILE:
                return None
            raise
        return body.attrs()

    def fstat(self, handle: bytes) -> Attrs:
        _t, body = self.call(FSTAT, _string(handle), (ATTRS,))
        return body.attrs()

    def read(self, handle: bytes, offset: int, length: int) -> bytes:
        """Bytes at ``offset`` (up to ``length``, in pipelined requests; fewer only at the end of the file)."""
        out = bytearray()
        while len(out) < length:
            asked: list[tuple[int, int]] = []
            pos = offset + len(out)
            while pos < offset + length and len(asked) < WINDOW:
                n = min(CHUNK, offset + length - pos)
                rid = self._request(READ, _string(handle) + struct.pack(">QI", pos, n))
                self.pending[rid] = (STATUS, DATA)
                asked.append((rid, n))
                pos += n
            short = eof = False
            for rid, n in asked:
                while rid not in self.answers:
                    self._dispatch_one()
                ptype, body = self.answers.pop(rid)
                if short or eof:
                    continue  # the rest of the window is re-asked from where the short piece ended
                if ptype == STATUS:
                    code, message = self._status(body)
                    if code != EOF:
                        raise SftpStatus(code, message)
                    eof = True
                    continue
                piece = body.string()
                if len(piece) > n:
                    raise StorageError("sftp: the server sent more than was asked for")
                out += piece
                short = len(piece) < n
            if eof:
                break
        return bytes(out)

    def write(self, handle: bytes, data: bytes, check: Callable[[int, str], None], wait: bool = True) -> None:
        for pos in range(0, len(data), CHUNK):
            self.defer(WRITE, _string(handle) + struct.pack(">Q", pos) + _string(data[pos : pos + CHUNK]), check,
                       wait)  # fmt: skip

    def listdir(self, path: str, limit: int) -> Iterator[tuple[str, Attrs]]:
        """Entries of a directory (``.`` and ``..`` left out); more than ``limit`` is an error."""
        _t, body = self.call(OPENDIR, _string(path), (HANDLE,))
        handle = body.string()
        seen = 0
        try:
            while True:
                try:
                    _t, body = self.call(READDIR, _string(handle), (NAME,))
                except SftpStatus as exc:
                    if exc.code == EOF:
                        return
                    raise
                count = body.u32()
                if count > MAX_NAMES_PACKET:
                    raise StorageError(f"sftp: {self.target.authority} sent a listing of {count} names at once")
                for _ in range(count):
                    name = body.string().decode("utf-8", "surrogateescape")
                    body.string()
                    attrs = body.attrs()
                    if name in (".", ".."):
                        continue
                    seen += 1
                    if seen > limit:
                        raise StorageError(f"sftp: {path} on {self.target.authority} lists more than {limit} entries")
                    yield name, attrs
        finally:
            with contextlib.suppress(SftpStatus):
                self.close_handle(handle)

    def extended(self, name: bytes, payload: bytes) -> bytes | None:
        """The request's payload for extension ``name`` if the server announced it."""
        if name not in self.extensions:
            return None
        return _string(name) + payload
