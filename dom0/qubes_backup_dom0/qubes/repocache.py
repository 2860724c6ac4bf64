"""dom0's cache of the newest snapshot's maps (docs/REPOSITORY.md sections 8 and 14): what the segments of the
last snapshot dom0 wrote said, so the next backup need not fetch them from the backup VM again.

``/var/lib/qubes-backup/repositories/<repo-id>.maps``, beside dom0's record (``repostate``), 0600, written
atomically.  It is dom0's own data, trusted as dom0 wrote it, but only for the snapshot it was written for:
the file names the repository id, the root id and the block size, and a backup uses it only when the newest
root it just verified from the backup VM is that root (a snapshot another dom0 wrote, or a cache left from an
older snapshot, is never used: dom0 then fetches the segments, as without a cache).  A damaged file (its
SHA-256 trailer does not match, a bad length or count) is ignored, never half used.

Binary, compact (about 34 bytes per stored block; section 14 gives the measured figure):

    magic "qubes-backup-maps 2\\n" || repo id (16) || root id (32) || block size (u32 BE) || count (u32 BE)
    per segment: segment id (32) || n (u16 BE, 1..4096) || n × (k (u16 BE, 0..4095, ascending) || data id (32))
    SHA-256 of everything before it (32)

The block numbers within the segment are kept beside the ids: dedup needs only the set of ids the parent's
file holds, but change tracking (backup/tracking.py) takes the id of each block it does not read from the
parent's map at that block's position.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from collections.abc import Mapping
from pathlib import Path

from qubes_backup_dom0.format import repo
from qubes_backup_dom0.qubes.repostate import record_path, state_dir
from qubes_backup_dom0.qubes.system import System

MAGIC = b"qubes-backup-maps 2\n"
_HEAD = struct.Struct(">16s32sII")
MAX_CACHE = 1 << 30  # 32 M blocks: far beyond any Qubes system; a larger file is not read


def cache_path(system: System, repo_id: str) -> Path:
    return record_path(system, repo_id).with_suffix(".maps")


Blocks = list[tuple[int, str]]  # a segment's (block number within it, data id), ascending


def render(repo_id: str, root_id: str, block_size: int, segments: Mapping[str, Blocks]) -> bytes:
    out = bytearray(MAGIC)
    out += _HEAD.pack(bytes.fromhex(repo_id), bytes.fromhex(root_id), block_size, len(segments))
    for sid in sorted(segments):
        blocks = segments[sid]
        out += bytes.fromhex(sid) + struct.pack(">H", len(blocks))
        out += b"".join(struct.pack(">H", k) + bytes.fromhex(d) for k, d in blocks)
    out += hashlib.sha256(out).digest()
    return bytes(out)


def parse(data: bytes, repo_id: str, root_id: str, block_size: int) -> dict[str, Blocks] | None:
    """The segments (id -> blocks) if ``data`` is an intact cache of exactly this repository, root and block
    size; None otherwise."""
    start = len(MAGIC) + _HEAD.size
    if len(data) < start + 32 or not data.startswith(MAGIC) or hashlib.sha256(data[:-32]).digest() != data[-32:]:
        return None
    rid, root, bs, count = _HEAD.unpack_from(data, len(MAGIC))
    if rid.hex() != repo_id or root.hex() != root_id or bs != block_size:
        return None
    out: dict[str, Blocks] = {}
    pos, end = start, len(data) - 32
    for _ in range(count):
        if pos + 34 > end:
            return None
        sid = data[pos : pos + 32].hex()
        (n,) = struct.unpack_from(">H", data, pos + 32)
        pos += 34
        if not 1 <= n <= repo.SEGMENT_BLOCKS or pos + 34 * n > end or sid in out:
            return None
        blocks = [(int.from_bytes(data[p : p + 2], "big"), data[p + 2 : p + 34].hex())
                  for p in range(pos, pos + 34 * n, 34)]  # fmt: skip
        numbers = [k for k, _ in blocks]
        if numbers != sorted(set(numbers)) or numbers[-1] >= repo.SEGMENT_BLOCKS:
            return None
        out[sid] = blocks
        pos += 34 * n
    return out if pos == end else None


def load(system: System, repo_id: str, root_id: str, block_size: int) -> dict[str, Blocks] | None:
    """The cached segments of root ``root_id``, or None (no cache, another root, damaged, unreadable)."""
    try:
        path = cache_path(system, repo_id)
        with open(path, "rb") as f:
            data = f.read(MAX_CACHE + 1)
    except (OSError, ValueError):
        return None
    if len(data) > MAX_CACHE:
        return None
    return parse(data, repo_id, root_id, block_size)


def save(system: System, repo_id: str, root_id: str, block_size: int, segments: Mapping[str, Blocks]) -> None:
    """Write the cache atomically (0600); a failure removes the old one (it would be stale) and is not an
    error: the cache only saves fetching."""
    directory = state_dir(system)
    path = cache_path(system, repo_id)
    tmp = directory / f".{repo_id}.{os.getpid()}.maps.tmp"
    try:
        data = render(repo_id, root_id, block_size, segments)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        drop(system, repo_id)


def drop(system: System, repo_id: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        cache_path(system, repo_id).unlink()
