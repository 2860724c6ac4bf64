"""qubes.Backup: LOCATION, DATA..., COMMIT in; DONE or ERROR out.  See docs/PROTOCOL.md.

The stream is stored atomically in a directory or over ssh, piped into a hook command, or uploaded to S3.  Without
COMMIT (dom0 died, the user cancelled) nothing that looks like a finished backup is left behind.
"""

from __future__ import annotations

import re
import sys
from typing import BinaryIO

from qubes_backup_protocol import frames, prune_frames
from qubes_backup_protocol import repo as repo_names
from qubes_backup_protocol.frames import FrameType

from . import confine
from .common import EXIT_FAILED, EXIT_OK, install_signal_handlers, send_error, silence
from .storage import Sink, StorageError, classify
from .storage.command import CommandSink
from .storage.directory import DirectorySink

BACKUP_NAME_RE = re.compile(r"qubes-backup-[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{6}")
MAX_BACKUP_NAME = 64

_LOCATION = {FrameType.LOCATION: (MAX_BACKUP_NAME, frames.MAX_LOCATION_LEN)}
_STREAM = {FrameType.DATA: (0, frames.MAX_DATA_FRAME), FrameType.COMMIT: (0, 0)}


class _EarlyEnd(Exception):
    """dom0 closed the stream before COMMIT."""


def is_backup_name(name: str) -> bool:
    return BACKUP_NAME_RE.fullmatch(name) is not None


def open_sink(location: str, name: str) -> Sink:
    """Pick the storage for ``location`` (interpreted inside the VM, confined to its root)."""
    root = confine.agent_root()
    loc = classify(location, root, want_dir=True)
    if loc.kind == "s3":
        from .storage.s3 import S3Sink

        return S3Sink(loc.url, name)
    if loc.kind == "ssh":
        from .storage.ssh import SshSink

        return SshSink(loc.url, name, root)
    if loc.kind == "path":
        assert loc.path is not None
        return DirectorySink(loc.path, name, root)
    return CommandSink(loc.argv, confine.home_dir(root), name)


def _splice_source(stdin: BinaryIO) -> int | None:
    """stdin's descriptor when frame data can be spliced straight from it (our own service entry point)."""
    spliceable = getattr(getattr(stdin, "raw", None), "spliceable_fd", None)
    return spliceable() if spliceable is not None else None


def receive_stream(stdin: BinaryIO, sink: Sink) -> None:
    """DATA frames into ``sink`` until COMMIT.

    The data is opaque here (dom0 encrypted and MACed it), so when the sink is a file and stdin a pipe it
    goes from the pipe straight into the file's writer (``splice_from``: read into its O_DIRECT buffers,
    or splice(2) where O_DIRECT is refused): one copy instead of two through this process, and no
    per-frame allocation.  Frame headers are still read and bounded one by one."""
    splice_into = getattr(sink, "splice_from", None)
    fd = _splice_source(stdin) if splice_into is not None else None
    while True:
        head = frames.read_header(stdin)
        if head is None:
            raise _EarlyEnd
        ftype, name_len, data_len = head
        if ftype not in _STREAM:
            raise frames.ProtocolError(f"unexpected frame type {ftype.name}")
        max_name, max_data = _STREAM[ftype]
        if name_len > max_name or data_len > max_data:
            raise frames.ProtocolError(f"frame too long ({name_len}, {data_len} bytes)")
        if ftype == FrameType.COMMIT:
            return
        if fd is None or splice_into is None:
            sink.write(frames.read_exact(stdin, data_len))
            continue
        buffered = stdin.peek(0)[:data_len] if data_len else b""  # type: ignore[attr-defined]
        if buffered:  # what the reader already holds goes first, through the normal write
            sink.write(frames.read_exact(stdin, len(buffered)))
        left = data_len - len(buffered)
        if left and splice_into(fd, left) != left:
            raise frames.ProtocolError(f"stream ended inside a frame ({data_len - left} of {data_len} bytes)")


def _request_name(name: str) -> bool:
    """A backup file name, or a repository session (``repository``: a snapshot; ``prune``: a keyless prune)."""
    return is_backup_name(name) or name in (repo_names.REQUEST, prune_frames.REQUEST)


def serve(stdin: BinaryIO, stdout: BinaryIO) -> int:
    try:
        first = frames.read_frame(stdin, _LOCATION, _request_name)
    except frames.ProtocolError as exc:
        send_error(stdout, f"bad request: {exc}")
        return EXIT_FAILED
    if first is None:
        return EXIT_FAILED
    if not first.name:
        send_error(stdout, "bad request: no backup name")
        return EXIT_FAILED
    try:
        location = bytes(first.data).decode("utf-8")
    except UnicodeDecodeError:
        send_error(stdout, "bad request: location is not UTF-8")
        return EXIT_FAILED
    if first.name == repo_names.REQUEST:  # a repository (docs/REPOSITORY.md section 9)
        from .repository import serve_backup

        return serve_backup(location, confine.agent_root(), stdin, stdout)
    if first.name == prune_frames.REQUEST:  # a keyless prune of a repository (docs/PROTOCOL.md section 5c)
        from .prune_service import serve_prune

        return serve_prune(location, confine.agent_root(), stdin, stdout)
    sink: Sink | None = None
    try:
        sink = open_sink(location, first.name)
        receive_stream(stdin, sink)
        where = sink.commit()
        sink = None
    except _EarlyEnd:
        print("qubes-backup-agent: stream ended before COMMIT; backup discarded", file=sys.stderr)
        return EXIT_FAILED
    except StorageError as exc:
        send_error(stdout, str(exc))
        return EXIT_FAILED
    except frames.ProtocolError as exc:
        send_error(stdout, f"bad request: {exc}")
        return EXIT_FAILED
    finally:
        if sink is not None:
            sink.abort()
    try:
        frames.write_frame(stdout, FrameType.DONE, "", where.encode("utf-8")[: frames.MAX_LOCATION_LEN])
        stdout.flush()
    except (BrokenPipeError, ConnectionResetError):
        silence(stdout)
    return EXIT_OK


def main(stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """Entry point of /etc/qubes-rpc/qubes.Backup (binary stdin/stdout carry frames)."""
    install_signal_handlers()
    return serve(stdin or sys.stdin.buffer, stdout or sys.stdout.buffer)
