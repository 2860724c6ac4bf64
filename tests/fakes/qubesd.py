"""A fake qubesd on a temporary UNIX socket, in the style of qubesadmin's tests.

``FakeQubesd.replies`` maps ``(method, dest, arg, payload)`` to the raw reply bytes (``ok(b"...")``,
``error("QubesVMNotFoundError", "No such domain")``, ``b""`` for a policy refusal) or to a callable
``(method, dest, arg, payload) -> bytes``; a key whose payload is None matches any
payload.  Every request is recorded in ``requests``, in order; a request
with no entry gets an error reply and is also recorded in ``unexpected``.  The wire format is checked as
strictly as qubesd does (header ``METHOD+ARG dom0 name DEST\\0``, at most 64 KiB).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

Request = tuple[str, str, str, bytes]
Key = tuple[str, str, str, bytes | None]  # payload None: any payload
Reply = bytes | Callable[[str, str, str, bytes], bytes]


def ok(data: bytes | str = b"") -> bytes:
    return b"0\0" + (data.encode() if isinstance(data, str) else data)


def error(exc_type: str, message: str) -> bytes:
    return b"2\0" + exc_type.encode() + b"\0\0" + message.encode() + b"\0"


class FakeQubesd:
    def __init__(self, path: Path, replies: dict[Key, Reply] | None = None) -> None:
        self.path = Path(path)
        self.replies: dict[Key, Reply] = dict(replies or {})
        self.requests: list[Request] = []
        self.unexpected: list[Request] = []
        self.malformed: list[bytes] = []
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- setup -------------------------------------------------------------------------------------------
    def add(
        self, method: str, dest: str = "dom0", arg: str = "", payload: bytes | None = b"", reply: Reply = b"0\0"
    ) -> None:
        self.replies[(method, dest, arg, payload)] = reply

    def start(self) -> FakeQubesd:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        sock.listen(16)
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="fake-qubesd", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> FakeQubesd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving -----------------------------------------------------------------------------------------
    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                with contextlib.suppress(OSError):
                    self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        data = bytearray()
        while True:
            piece = conn.recv(65536)
            if not piece:
                break
            data += piece
            if len(data) > 65536:
                self.malformed.append(bytes(data[:200]))
                return  # qubesd aborts the connection: empty reply
        reply = self._answer(bytes(data))
        conn.sendall(reply)

    def _answer(self, data: bytes) -> bytes:
        header, sep, payload = data.partition(b"\0")
        parts = header.decode("ascii", "replace").split(" ")
        if not sep or len(parts) != 4 or parts[1] != "dom0" or parts[2] != "name" or "+" not in parts[0]:
            self.malformed.append(data[:200])
            return b""
        method, _, arg = parts[0].partition("+")
        req = (method, parts[3], arg, payload)
        with self._lock:
            self.requests.append(req)
            reply = self.replies.get(req)
            if reply is None:
                reply = self.replies.get((method, parts[3], arg, None))
            if reply is None:
                self.unexpected.append(req)
                return error("QubesException", f"fake qubesd: unexpected request {req!r}")
        return reply(*req) if callable(reply) else reply

    # -- assertions --------------------------------------------------------------------------------------
    def methods(self) -> list[str]:
        return [r[0] for r in self.requests]

    def writes(self) -> list[Request]:
        """Requests that would change Qubes state (anything but List/Get/GetAll/Info/Index/Assigned/Attached)."""
        reads = (".List", ".Get", ".GetAll", ".Info", ".Index", ".Assigned", ".Attached")
        return [r for r in self.requests if not r[0].endswith(reads) and r[0] != "admin.vm.List"]
