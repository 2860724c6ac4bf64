"""qubes.Restore: LOCATION in; MEMBER... (pause for WANT... WANT_END after manifest.hmac) ... END out.

The VM may parse tar (it is the untrusted side anyway); dom0 parses only frames.  Unwanted archives are
skipped at the source: seeks over a file, an S3 object or an ssh file (ranged reads), reading through only
for a hook's stream.
"""

from __future__ import annotations

import contextlib
import sys
import tarfile
from typing import BinaryIO

from qubes_backup_protocol import frames, names
from qubes_backup_protocol.frames import FrameType

from . import confine
from .common import EXIT_FAILED, EXIT_OK, install_signal_handlers, send_error, silence
from .storage import StorageError, classify
from .storage.command import CommandSource
from .storage.directory import open_file

# The largest member a valid backup has: a chunk of the maximal chunk size (256 MiB) plus its 16-byte IV.
MAX_MEMBER_SIZE = (256 << 20) + 16
COPY_PIECE = 4 << 20
MANIFEST_MAC = names.mac_name(names.MANIFEST)

_LOCATION = {FrameType.LOCATION: (0, frames.MAX_LOCATION_LEN)}
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


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, out: BinaryIO) -> None:
    src = tar.extractfile(member)
    if src is None:
        raise StorageError(f"cannot read member {member.name}")
    raw_name = member.name.encode("ascii")
    out.write(frames.encode_header(FrameType.MEMBER, len(raw_name), member.size) + raw_name)
    left = member.size
    try:
        while left:
            piece = src.read(min(COPY_PIECE, left))
            if not piece:
                raise MidFrameError(f"backup truncated inside member {member.name}")
            out.write(piece)
            left -= len(piece)
    except (tarfile.TarError, OSError, StorageError) as exc:
        if isinstance(exc, BrokenPipeError | ConnectionResetError):
            raise
        raise MidFrameError(f"reading member {member.name} failed: {exc}") from None


def check_member(member: tarfile.TarInfo) -> None:
    shown = frames.safe_text(member.name, limit=80)
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise StorageError(f"backup contains a non-regular member: {shown}")
    if not names.is_member_name(member.name):
        raise StorageError(f"backup contains an unexpected member name: {shown}")
    if not 0 <= member.size <= MAX_MEMBER_SIZE:
        raise StorageError(f"backup member too large: {shown} ({member.size} bytes)")


def stream_members(tar: tarfile.TarFile, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Send members in archive order; after manifest.hmac ask dom0 which archives it wants."""
    wanted: set[str] | None = None
    while True:
        member = tar.next()
        if member is None:
            break
        tar.members.clear()  # type: ignore[attr-defined]  # tarfile remembers every member; we never look back
        check_member(member)
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


def serve(stdin: BinaryIO, stdout: BinaryIO) -> int:
    try:
        first = frames.read_frame(stdin, _LOCATION)
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
    source: CommandSource | None = None
    fileobj: BinaryIO | None = None
    try:
        loc = classify(location, root, want_dir=False)
        if loc.kind == "command":
            source = CommandSource(loc.argv, confine.home_dir(root))
            fileobj, mode = source.stdout, "r|"
        elif loc.kind == "s3":
            from .storage.s3 import open_object

            fileobj, mode = open_object(loc.url), "r:"
        elif loc.kind == "ssh":
            from .storage.ssh import open_remote

            fileobj, mode = open_remote(loc.url, root), "r:"
        else:
            assert loc.path is not None
            fileobj, mode = open_file(loc.path, root), "r:"
        try:
            tar = tarfile.open(fileobj=fileobj, mode=mode)  # type: ignore[call-overload]  # noqa: SIM115
        except tarfile.TarError as exc:
            raise StorageError(f"not a readable tar archive: {location} ({exc})") from None
        try:
            stream_members(tar, stdin, stdout)
        except tarfile.TarError as exc:
            raise StorageError(f"damaged tar archive: {exc}") from None
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
        send_error(stdout, str(exc))
        return EXIT_FAILED
    except frames.ProtocolError as exc:
        send_error(stdout, f"bad request: {exc}")
        return EXIT_FAILED
    except OSError as exc:
        send_error(stdout, f"reading the backup failed: {exc.strerror or exc}")
        return EXIT_FAILED
    finally:
        if source is not None:
            source.kill()
        if fileobj is not None:
            with contextlib.suppress(OSError):
                fileobj.close()


def main(stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """Entry point of /etc/qubes-rpc/qubes.Restore (binary stdin/stdout carry frames)."""
    install_signal_handlers()
    return serve(stdin or sys.stdin.buffer, stdout or sys.stdout.buffer)
