"""Names in a repository (docs/REPOSITORY.md): what dom0 and the agent may call the files of a repository.

A repository is a directory in the backup VM.  Its files travel under these names, both ways: in the tar
dom0 sends with a backup, in GET requests and in the MEMBER answers.  None of them carries a VM or file
name: objects are named by their keyed id, snapshot roots by their sequence number and creation time.
"""

from __future__ import annotations

import re

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
