"""The inner archive format's shared rules (FORMAT.md sections 7-8): block size, bounds, pax keys, entry
types and the path grammar that both the writer (tarwriter.py) and the strict reader (tarread.py) apply."""

from __future__ import annotations

import re
from typing import Any

from qubes_backup_dom0.text import has_unsafe_chars

BLOCK = 512
ZEROS = bytes(BLOCK)
OCTAL11_LIMIT = 8**11  # 12-byte ustar numeric fields hold 11 octal digits
SPARSE_DIR = "GNUSparseFile.0"
PAX_DIR = "PaxHeaders.0"
MAX_PATH = 4096
MAX_COMPONENT = 255
MAX_LINK = 4095
MAX_SPARSE_REGIONS = 1_000_000
MAX_SPARSE_MAP = 16 * 1024 * 1024
DEFAULT_READ_SIZE = 4 * 1024 * 1024
PAX_KEYS = frozenset(
    {
        "path",
        "size",
        "mtime",
        "linkpath",
        "GNU.sparse.major",
        "GNU.sparse.minor",
        "GNU.sparse.name",
        "GNU.sparse.realsize",
    }
)
DECIMAL = re.compile(rb"0|[1-9][0-9]{0,19}")
SIGNED_DECIMAL = re.compile(rb"0|-?[1-9][0-9]{0,19}")
TYPEFLAGS = {"file": b"0", "dir": b"5", "symlink": b"2"}


def path_problem(path: str) -> str | None:
    """Why ``path`` is not an acceptable relative archive path, or None.  Shared by writer and reader."""
    if not path:
        return "empty path"
    if "\0" in path:
        return "NUL in path"
    if has_unsafe_chars(path):
        return "control character in path"
    if path.startswith("/"):
        return "absolute path"
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        return "path is not valid UTF-8"
    if len(raw) > MAX_PATH:
        return "path too long"
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return f"bad path component {part!r}"
        if len(part.encode("utf-8")) > MAX_COMPONENT:
            return "path component too long"
    return None


def split(path: str) -> tuple[str, str]:
    """(dirname with trailing slash or "", basename)."""
    d, _, b = path.rpartition("/")
    return (d + "/" if d else ""), b


def sparse_name(path: str) -> str:
    d, b = split(path)
    return f"{d}{SPARSE_DIR}/{b}"


def is_sparse(f: Any) -> bool:
    return f.type == "file" and f.data < f.size



def pad(n: int) -> int:
    return -n % BLOCK
