"""Names in a repository (docs/REPOSITORY.md): what dom0 and the agent may call the files of a repository.

A repository is a directory in the backup VM.  Its files travel under these names, both ways: in the tar
dom0 sends with a backup, in GET requests and in the MEMBER answers.  None of them carries a VM or file
name: objects are named by their keyed id, snapshot roots by their sequence number and creation time.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from construct import Array, Bytes, Const, ConstructError, Struct

REQUEST = "repository"  # the LOCATION frame's name that opens a repository session (both services)
HEADER = "repo-header"
HEADER_MAC = "repo-header.hmac"
ROOTS_DIR = "roots"
OBJECTS_DIR = "objects"
MAX_ROOTS = 100_000  # a repository lists at most this many snapshot roots
MAX_SEQ = 9_999_999_999  # ten digits

_OBJECT_RE = re.compile(r"[0-9a-f]{64}")
_ROOT_RE = re.compile(r"roots/([0-9]{10})-([0-9]{8}T[0-9]{6}Z)")


def is_object_name(name: str) -> bool:
    """An object's name: its id, 64 lowercase hex digits."""
    return _OBJECT_RE.fullmatch(name) is not None


def is_root_name(name: str) -> bool:
    """``roots/SSSSSSSSSS-YYYYMMDDTHHMMSSZ``: a snapshot root (sequence number from 1)."""
    m = _ROOT_RE.fullmatch(name)
    return m is not None and int(m.group(1)) >= 1


def root_name(seq: int, created: str) -> str:
    """The name of root ``seq`` created at ``created`` (``YYYY-MM-DDTHH:MM:SSZ``)."""
    if not 1 <= seq <= MAX_SEQ:
        raise ValueError(f"sequence number out of range: {seq}")
    compact = created.replace("-", "").replace(":", "")
    name = f"{ROOTS_DIR}/{seq:010d}-{compact}"
    if not is_root_name(name):
        raise ValueError(f"bad creation time {created!r}")
    return name


def root_seq(name: str) -> int:
    m = _ROOT_RE.fullmatch(name)
    if m is None:
        raise ValueError(f"not a root name: {name!r}")
    return int(m.group(1))


def root_created(name: str) -> str:
    """The creation time a root's name states, as ``YYYY-MM-DDTHH:MM:SSZ``."""
    m = _ROOT_RE.fullmatch(name)
    if m is None:
        raise ValueError(f"not a root name: {name!r}")
    c = m.group(2)
    return f"{c[0:4]}-{c[4:6]}-{c[6:8]}T{c[9:11]}:{c[11:13]}:{c[13:15]}Z"


def is_member_name(name: str) -> bool:
    """Any name a repository file travels under (the tar of a backup, GET, MEMBER)."""
    return name in (HEADER, HEADER_MAC) or is_object_name(name) or is_root_name(name)


# ------------------------------------------------------------------------------------- batched requests

GETS_MAX = 64  # object ids one GETS frame may name (dom0 keeps at most this many requests in flight)
#: one requested id in a GETS frame's data: 64 hex digits and LF; the data is 1 to GETS_MAX of them
GetsLine = Struct("id" / Bytes(64), Const(b"\n"))
GETS_LINE = GetsLine.sizeof()
GETS_MAX_DATA = GETS_MAX * GETS_LINE


@functools.cache
def _gets_body(count: int) -> Any:
    """The data of a GETS frame naming ``count`` ids (compiled by construct: one per count, when first used)."""
    return Array(count, GetsLine).compile()


def encode_gets(ids: list[str]) -> bytes:
    """The data of a GETS frame naming ``ids`` (1 to GETS_MAX object names), in order."""
    if not 1 <= len(ids) <= GETS_MAX or not all(is_object_name(i) for i in ids):
        raise ValueError("a GETS frame names 1 to 64 object ids")
    return bytes(_gets_body(len(ids)).build([{"id": i.encode("ascii")} for i in ids]))


def parse_gets(data: bytes | memoryview) -> list[str]:
    """The object ids a GETS frame's data names (its length was bounded by the frame layer): 1 to GETS_MAX
    lines of an object name and LF, nothing else; ValueError otherwise."""
    if not GETS_LINE <= len(data) <= GETS_MAX_DATA or len(data) % GETS_LINE:
        raise ValueError("a GETS frame names 1 to 64 object ids")
    try:
        lines = _gets_body(len(data) // GETS_LINE).parse(bytes(data))
    except ConstructError:
        raise ValueError("a GETS frame holds a malformed line") from None
    ids = [bytes(line.id).decode("ascii", "replace") for line in lines]
    if not all(is_object_name(i) for i in ids):
        raise ValueError("a GETS frame names something that is not an object id")
    return ids
