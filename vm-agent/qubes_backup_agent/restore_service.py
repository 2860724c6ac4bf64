"""qubes.Restore: LOCATION in; MEMBER... (pause for WANT... WANT_END after manifest.hmac) ... END out.

The VM may parse tar (it is the untrusted side anyway); dom0 parses only frames.  Unwanted archives are
skipped at the source: seeks over a file, an S3 object or an ssh file (ranged reads), reading through only
for a hook's stream.

For a backup file held in dom0 this process runs in dom0 (confined by bubblewrap only when it is
installed), so its memory must be bounded whatever the file contains: the tar is read by the strict
reader of ``outer_tar`` (one 512-byte header and one copy piece at a time, never a pax or GNU header),
and when reading a file the process caps its own address space (``MEMORY_LIMIT``).
"""

from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path
from typing import BinaryIO

from qubes_backup_protocol import frames, names
from qubes_backup_protocol import repo as repo_names
from qubes_backup_protocol.frames import FrameType

from . import confine
from .common import EXIT_FAILED, EXIT_OK, install_signal_handlers, send_error, silence
from .outer_tar import MAX_MEMBER_SIZE, ForeignFormatError, Member, OuterReader, TarError, TruncatedError
from .storage import StorageError, classify
from .storage.command import CommandSource
from .storage.directory import open_file

__all__ = ["MAX_MEMBER_SIZE", "MEMORY_LIMIT", "main", "serve", "stream_members"]

COPY_PIECE = 4 << 20
# Address-space cap of the agent while it reads a stored file (RLIMIT_AS; defence in depth behind the
# strict reader): the interpreter, one copy piece and the frame buffers need a few tens of MiB.
MEMORY_LIMIT = 256 << 20
MANIFEST_MAC = names.mac_name(names.MANIFEST)

_LOCATION = {FrameType.LOCATION: (len(repo_names.REQUEST), frames.MAX_LOCATION_LEN)}
_WANT = {FrameType.WANT: (names.MAX_NAME_LEN, 0), FrameType.WANT_END: (0, 0)}


class PeerGone(Exception):
    """dom0 closed its side: it has what it needs, or the user cancelled."""


class MidFrameError(Exception):
    """Failure after a MEMBER header went out: an ERROR frame would be read as member data."""


def read_wants(stdin: BinaryIO) -> set[str]:
    wanted: set[str] = set()
    while True:
        frame = frames.read_frame(stdin, _WANT, names.is_archive_name)
        if frame is None:
            raise PeerGone
        if frame.type == FrameType.WANT_END:
            return wanted
        if not frame.name:
            raise frames.ProtocolError("WANT without an archive name")
        wanted.add(frame.name)


def _copy_member(tar: OuterReader, member: Member, out: BinaryIO) -> None:
    raw_name = member.name.encode("ascii")
    out.write(frames.encode_header(FrameType.MEMBER, len(raw_name), member.size) + raw_name)
    left = member.size
    try:
        while left:
            piece = tar.read(min(COPY_PIECE, left))
            out.write(piece)
            left -= len(piece)
    except (OSError, StorageError) as exc:
        if isinstance(exc, BrokenPipeError | ConnectionResetError):
            raise
        if isinstance(exc, TruncatedError):
            raise MidFrameError(str(exc)) from None
        raise MidFrameError(f"reading member {member.name} failed: {exc}") from None
    tar.read(1)  # the frame is complete; this checks the member's padding


def stream_members(tar: OuterReader, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Send members in archive order; after manifest.hmac ask dom0 which archives it wants."""
    wanted: set[str] | None = None
    while True:
        member = tar.next()
        if member is None:
            break
        if wanted is not None:
            archive = names.archive_of(member.name)
            if archive is None or archive not in wanted:
                continue  # not read: the next tar.next() seeks (or reads through, for a stream) past it
        _copy_member(tar, member, stdout)
        if wanted is None and member.name == MANIFEST_MAC:
            stdout.flush()
            wanted = read_wants(stdin)
    frames.write_frame(stdout, FrameType.END)
    stdout.flush()


def limit_memory(limit: int = MEMORY_LIMIT) -> None:
    """Cap this process's address space (never raise an existing lower cap)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft == resource.RLIM_INFINITY or soft > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def serve(stdin: BinaryIO, stdout: BinaryIO) -> int:
    try:
        first = frames.read_frame(stdin, _LOCATION, lambda n: n in (names.LIST_REQUEST, repo_names.REQUEST))
    except frames.ProtocolError as exc:
        send_error(stdout, f"bad request: {exc}")
        return EXIT_FAILED
    if first is None:
        return EXIT_FAILED
    try:
        location = bytes(first.data).decode("utf-8")
    except UnicodeDecodeError:
        send_error(stdout, "bad request: location is not UTF-8")
        return EXIT_FAILED
    root = confine.agent_root()
    if first.name == names.LIST_REQUEST:
        return _listing(location, root, stdout)
    if first.name == repo_names.REQUEST:  # a repository (docs/REPOSITORY.md section 9)
        from .repository import serve_restore

        limit_memory()
        return serve_restore(location, root, stdin, stdout)
    source: CommandSource | None = None
    fileobj: BinaryIO | None = None
    try:
        loc = classify(location, root, want_dir=False)
        if loc.kind == "command":
            source = CommandSource(loc.argv, confine.home_dir(root))
            fileobj, seekable = source.stdout, False
        elif loc.kind == "s3":
            from .storage.s3 import open_object

            fileobj, seekable = open_object(loc.url), True
        elif loc.kind == "ssh":
            from .storage.ssh import open_remote

            fileobj, seekable = open_remote(loc.url, root), True
        else:
            assert loc.path is not None
            fileobj, seekable = open_file(loc.path, root), True
            # A file is read by this process alone (no hook, no boto3): its needs are known and small.
            limit_memory()
        stream_members(OuterReader(fileobj, seekable), stdin, stdout)  # TarError is a StorageError
        if source is not None:
            src, source = source, None
            src.finish()
        return EXIT_OK
    except (PeerGone, BrokenPipeError, ConnectionResetError):
        silence(stdout)
        return EXIT_OK
    except MidFrameError as exc:
        # dom0 sees the stream end inside a frame; the reason goes to stderr, which dom0 shows.
        print(f"qubes-backup-agent: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except StorageError as exc:
        # TarError: the backup is malformed (dom0: "the backup is damaged", exit 3), unless a hook command gave
        # the bytes: its failure (a dead connection) looks just like that, so it stays a plain failure.
        damaged = isinstance(exc, TarError) and not isinstance(exc, ForeignFormatError) and source is None
        send_error(stdout, str(exc), damaged=damaged)
        return EXIT_FAILED
    except frames.ProtocolError as exc:
        send_error(stdout, f"bad request: {exc}")
        return EXIT_FAILED
    except OSError as exc:
        send_error(stdout, f"reading the backup failed: {exc.strerror or exc}")
        return EXIT_FAILED
    except MemoryError:
        send_error(stdout, "out of memory reading the backup")
        return EXIT_FAILED
    finally:
        if source is not None:
            source.kill()
        if fileobj is not None:
            with contextlib.suppress(OSError):
                fileobj.close()


def _listing(location: str, root: Path, stdout: BinaryIO) -> int:
    from .listing import serve_listing

    try:
        limit_memory()
        serve_listing(location, root, stdout)
        return EXIT_OK
    except (BrokenPipeError, ConnectionResetError):
        silence(stdout)  # dom0 had what it needed (a location check reads one frame)
        return EXIT_OK
    except StorageError as exc:
        send_error(stdout, str(exc))
        return EXIT_FAILED


def main(stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """Entry point of /etc/qubes-rpc/qubes.Restore (binary stdin/stdout carry frames)."""
    install_signal_handlers()
    return serve(stdin or sys.stdin.buffer, stdout or sys.stdout.buffer)
