"""The simulated qubesd: ``python -m qubes_backup_sim.qubesd DIR [--socket PATH] [--host-paths] [--log FILE]
[--idle SECONDS] [--release 4.2|4.3]``.

It serves the Admin API of the system's Qubes release (``DIR/dom0/etc/qubes-release``, written by simgen;
``--release`` overrides it): VM list, device calls, notes and refusals as that release's qubesd
(``release.py``).

A separate process that owns ``DIR/dom0/var/lib/qubes/qubes.xml`` (loaded at start, saved atomically after
every change) and the simulated pools, and answers qubesd's Admin API on a UNIX socket (default
``DIR/dom0/var/run/qubesd.sock``) with qubesd's wire protocol: request ``METHOD+ARG SRC name DEST\\0PAYLOAD``
(at most 64 KiB, read to EOF), reply ``0\\0DATA`` or ``2\\0EXCTYPE\\0\\0MESSAGE\\0``.  Requests are handled one
at a time, like qubesd's single event loop.  A request qubesd refuses without an answer (PermissionDenied,
ProtocolError, no such method, an unhandled exception) gets none here either: the connection is closed.
The calls and their strictness are in ``handlers.py`` and ``devices.py``.

Test hook: ``QUBES_SIM_FAIL="RULE[,RULE...]"`` in the server's environment, each RULE
``METHOD[+ARG][@DEST][#N]``, makes matching requests fail with a qubesd error reply (``QubesException``,
message ``injected failure (RULE)``) without being executed: the request is still logged.  ARG and DEST,
when given, must match exactly; ``#N`` fails only the N-th matching request (counted from 1 since the
server started), otherwise every one.  Example: ``admin.vm.property.Set+memory@work``, ``admin.vm.Create.AppVM#2``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path

from .exc import ApiError, protocol_error
from .handlers import Api
from .release import RELEASES, read_release
from .store import SOCKET, Store

MAX_REQUEST = 64 * 1024
CONN_TIMEOUT = 10.0
FAIL_ENV = "QUBES_SIM_FAIL"


class FailRule:
    """One ``METHOD[+ARG][@DEST][#N]`` rule of QUBES_SIM_FAIL."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        rest, _, nth = spec.partition("#")
        rest, at, dest = rest.partition("@")
        self.method, plus, arg = rest.partition("+")
        if not self.method or (at and not dest) or (nth and not nth.isdigit()):
            raise ValueError(f"{FAIL_ENV}: malformed rule {spec!r} (METHOD[+ARG][@DEST][#N])")
        self.arg = arg if plus else None
        self.dest = dest if at else None
        self.nth = int(nth) if nth else None
        self.seen = 0

    def hit(self, method: str, arg: str, dest: str) -> bool:
        if method != self.method or self.arg not in (None, arg) or self.dest not in (None, dest):
            return False
        self.seen += 1
        return self.nth is None or self.seen == self.nth


def parse_fail_rules(text: str) -> list[FailRule]:
    return [FailRule(spec.strip()) for spec in text.split(",") if spec.strip()]


def parse_request(data: bytes) -> tuple[str, str, str, str, bytes]:
    """(method, arg, src, dest, payload) of a raw request; ProtocolError when malformed."""
    header, sep, payload = data.partition(b"\0")
    if not sep:
        raise protocol_error("malformed request: no header terminator")
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        raise protocol_error("malformed request: header is not ASCII") from None
    parts = text.split(" ")
    if len(parts) != 4 or parts[2] != "name" or not all(p.isprintable() for p in parts):
        raise protocol_error("malformed request header")
    method, _, arg = parts[0].partition("+")
    if not method or not parts[1] or not parts[3]:
        raise protocol_error("malformed request header")
    return method, arg, parts[1], parts[3], payload


def _recv_request(conn: socket.socket) -> bytes | None:
    """The whole request, or None when it exceeds MAX_REQUEST (qubesd aborts those)."""
    buf = bytearray()
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > MAX_REQUEST:
            return None


IMPORT_IDLE = 900.0


class Server:
    def __init__(self, sim_dir: Path, sock_path: Path, *, host_paths: bool = False, log: Path | None = None,
                 idle: float = 15.0, release: str | None = None) -> None:  # fmt: skip
        self.sim_dir = Path(sim_dir).resolve()
        self.sock_path = sock_path
        self.release = release or read_release(self.sim_dir / "dom0")
        self.api = Api(Store(self.sim_dir), host_paths=host_paths, release=self.release)
        self.log = log
        self.idle = idle
        self.fail_rules = parse_fail_rules(os.environ.get(FAIL_ENV, ""))

    def handle(self, data: bytes | None) -> bytes:
        if data is None:
            return protocol_error(f"request too large (over {MAX_REQUEST} bytes)").reply()
        try:
            method, arg, src, dest, payload = parse_request(data)
        except ApiError as e:
            return e.reply()
        self._log(method, arg, dest, payload)
        for rule in self.fail_rules:
            if rule.hit(method, arg, dest):
                return ApiError("QubesException", f"injected failure ({rule.spec})").reply()
        try:
            return b"0\0" + self.api.call(method, arg, src, dest, payload)
        except ApiError as e:
            if e.closes:  # as qubesd logs it; the client only sees the connection closed
                print(f"{e.exc_type.lower()} for call {method}+{arg} (dom0 -> {dest}): {e.message}",
                      file=sys.stderr, flush=True)  # fmt: skip
            return e.reply()

    def _log(self, method: str, arg: str, dest: str, payload: bytes) -> None:
        if self.log is None:
            return
        line = {"method": method, "arg": arg, "dest": dest, "payload": payload.decode("utf-8", "backslashreplace")}
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")

    def serve(self) -> None:
        self.sock_path.parent.mkdir(parents=True, exist_ok=True)
        if self.sock_path.is_socket():
            self.sock_path.unlink()
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(self.sock_path))
        srv.listen(16)
        ino = os.stat(self.sock_path).st_ino
        last = time.monotonic()
        try:
            while True:
                ready, _, _ = select.select([srv], [], [], 0.5)
                if not ready:
                    # An open import keeps it up (for at most IMPORT_IDLE without a request: a killed import
                    # service never ends its import).
                    limit = IMPORT_IDLE if self.api.imports_open else self.idle
                    if time.monotonic() - last > limit or not self.sim_dir.is_dir():
                        return
                    continue
                conn, _ = srv.accept()
                with conn:
                    conn.settimeout(CONN_TIMEOUT)
                    try:
                        reply = self.handle(_recv_request(conn))
                        conn.sendall(reply)
                        conn.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                last = time.monotonic()
        finally:
            srv.close()
            with contextlib.suppress(OSError):  # only our own socket file: a newer server may own a new one
                if os.stat(self.sock_path).st_ino == ino:
                    self.sock_path.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qubes_backup_sim.qubesd", description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--socket", type=Path)
    ap.add_argument("--host-paths", action="store_true", help="report host paths instead of dom0 paths")
    ap.add_argument("--log", type=Path, help="append one JSON line per request")
    ap.add_argument("--idle", type=float, default=15.0, help="exit after this many seconds without a request")
    ap.add_argument("--release", choices=RELEASES,
                    help="the Admin API of this Qubes release (default: the system's, DIR/dom0/etc/qubes-release)")
    args = ap.parse_args(argv)
    sim_dir = args.dir.resolve()
    sock = args.socket or sim_dir / "dom0" / SOCKET
    try:
        server = Server(sim_dir, sock, host_paths=args.host_paths, log=args.log, idle=args.idle,
                        release=args.release)  # fmt: skip
    except (OSError, ValueError) as e:
        print(f"qubes_backup_sim.qubesd: cannot load {sim_dir}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a malformed qubes.xml (QubesXmlError) -- one line, no traceback
        print(f"qubes_backup_sim.qubesd: {e}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # so the socket file is removed
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
