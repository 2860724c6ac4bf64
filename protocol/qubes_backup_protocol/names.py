"""Grammar of outer member names (docs/FORMAT.md section 1).

The names carry no VM or file name: ``vmN`` is an archive number, ``CCCCCC`` a chunk position.
"""

from __future__ import annotations

import re

MAX_NAME_LEN = 64

HEADER = "backup-header"
MANIFEST = "manifest"
HMAC_SUFFIX = ".hmac"
TRAILER = "trailer"

_ARCHIVE = r"vm(?:0|[1-9][0-9]{0,4})"
_MEMBER_RE = re.compile(rf"(?:backup-header|manifest|{_ARCHIVE}/(?:[0-9]{{6}}|trailer))(?:\.hmac)?")
_ARCHIVE_RE = re.compile(_ARCHIVE)
MAX_CHUNKS = 1_000_000  # six digits
# The file name dom0 gives a backup (docs/PROTOCOL.md section 2); listing a location shows only these.
_BACKUP_FILE_RE = re.compile(r"qubes-backup-[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{6}")
# The file name Qubes OS' own qvm-backup gives a backup in a directory (qubes/backup.py: "qubes-%Y-%m-%dT%H%M%S").
_QUBES_FILE_RE = re.compile(r"qubes-[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{6}")
LIST_REQUEST = "list"  # the LOCATION frame's name that asks qubes.Restore for a listing (PROTOCOL.md 5a)
MAX_LIST_ENTRIES = 1000  # a listing holds at most this many backups (the newest, by name)
MAX_LIST_HEADER = 4096  # an ENTRY frame carries at most this much of a backup's header member


def is_member_name(name: str) -> bool:
    """True if ``name`` is a well-formed outer member name."""
    return len(name) <= MAX_NAME_LEN and _MEMBER_RE.fullmatch(name) is not None


def is_archive_name(name: str) -> bool:
    """True if ``name`` is a well-formed archive prefix such as ``vm3``."""
    return len(name) <= MAX_NAME_LEN and _ARCHIVE_RE.fullmatch(name) is not None


def is_backup_file_name(name: str) -> bool:
    """True if ``name`` is a backup file name as dom0 chooses it (``qubes-backup-YYYY-MM-DDTHHMMSS``)."""
    return _BACKUP_FILE_RE.fullmatch(name) is not None


def is_qubes_backup_file_name(name: str) -> bool:
    """True if ``name`` is a backup file name as Qubes OS' own qvm-backup chooses it (``qubes-YYYY-MM-DDTHHMMSS``)."""
    return _QUBES_FILE_RE.fullmatch(name) is not None


def is_listed_file_name(name: str) -> bool:
    """True if a listing shows the file: named as dom0 or as Qubes OS' own qvm-backup names a backup."""
    return is_backup_file_name(name) or is_qubes_backup_file_name(name)


def archive_name(number: int) -> str:
    if not 0 <= number <= 99999:
        raise ValueError(f"archive number out of range: {number}")
    return f"vm{number}"


def chunk_name(archive: str, index: int) -> str:
    if not 0 <= index < MAX_CHUNKS:
        raise ValueError(f"chunk index out of range: {index}")
    return f"{archive}/{index:06d}"


def trailer_name(archive: str) -> str:
    return f"{archive}/{TRAILER}"


def mac_name(name: str) -> str:
    return name + HMAC_SUFFIX


def archive_of(name: str) -> str | None:
    """The archive prefix of a member name (``vm3/000001.hmac`` -> ``vm3``), None for header/manifest."""
    head, sep, _ = name.partition("/")
    return head if sep else None
