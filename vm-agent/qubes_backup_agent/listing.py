"""qubes.Restore's listing request (docs/PROTOCOL.md section 5a): which backups a directory holds.

For each regular file named like a backup (``names.is_listed_file_name``: as dom0 names ours, or as Qubes OS'
own qvm-backup names its backups in a dom0 directory), the last MAX_LIST_ENTRIES by name, one ENTRY frame:
the file name and the content of its first member when that is a ``backup-header`` of at most
MAX_LIST_HEADER bytes (else empty; a pax header before it, as GNU tar --posix writes for Qubes' backups, is
read as ``outer_tar`` allows).  Then END.  Nothing here is trusted by dom0: it parses the
header text strictly and shows it as unauthenticated.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

from qubes_backup_protocol import frames, names
from qubes_backup_protocol.frames import FrameType

from . import confine
from .outer_tar import OuterReader
from .storage import StorageError, classify
from .storage.directory import describe_oserror, open_file


def backup_files(directory: Path, root: Path) -> list[str]:
    try:
        entries = os.listdir(directory)
    except OSError as exc:
        raise StorageError(describe_oserror(exc, "listing", confine.vm_view(directory, root))) from None
    found = []
    for name in entries:
        if not names.is_listed_file_name(name):
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(directory / name).st_mode):
                found.append(name)
    return sorted(found)[-names.MAX_LIST_ENTRIES :]


def header_member(path: Path, root: Path) -> bytes:
    """The file's first member's content if it is a backup header within the bound, else b""."""
    try:
        with open_file(path, root) as f:
            tar = OuterReader(f, seekable=True)
            member = tar.next()
            if member is None or member.name != names.HEADER or member.size > names.MAX_LIST_HEADER:
                return b""
            data = b""
            while len(data) < member.size:
                piece = tar.read(member.size - len(data))
                if not piece:
                    return b""
                data += piece
            return data
    except (StorageError, OSError):
        return b""


def serve_listing(location: str, root: Path, out: BinaryIO) -> None:
    loc = classify(location, root, want_dir=True)
    if loc.kind != "path" or loc.path is None or not loc.path.is_dir():
        raise StorageError(f"listing backups needs a directory in the backup VM: {location}")
    for name in backup_files(loc.path, root):
        frames.write_frame(out, FrameType.ENTRY, name, header_member(loc.path / name, root))
    frames.write_frame(out, FrameType.END)
    out.flush()
