"""Which blocks of two reflink copies of a volume may differ, from their extents (FIEMAP), per block.

On a reflink filesystem (btrfs, XFS) a copy shares its extents with the original until either is written, and a
shared extent is never written in place (copy on write).  So a block whose byte range maps to the same physical
ranges in both files holds the same bytes.  Compared **per block** (not per extent, wyng's rule): eight 4 KiB
writes into a single-extent 256 MiB image give at most eight differing blocks, not the whole file.

Guarded: both files are ours and read-only to everyone else (the base and the new copy), but the filesystem may
move extents (balance, defragmentation) while they are listed; each file's extents are listed twice, around the
other's, and any difference (or an extent flagged unknown, delayed, encoded, inline, tail-packed, unaligned, or
a listing that does not end with the last extent) means no answer: read everything.

An *unwritten* extent (allocated, reads as zeros: XFS leaves them where an allocation outgrew the write, and after
fallocate) is a mapping like another, told apart by its state: its physical offset is kept with bit 63 set
(``UNWRITTEN_BIT``), so a block compares equal only when both files map the same physical bytes in the same state.
Each file's extent record carries its own state, and a shared extent is never written in place (a write to it is
copied, its state with it), so the same physical bytes in the same state hold the same content in both.
"""

from __future__ import annotations

import fcntl
import struct

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, reserved64[2], flags, reserved[3]
LAST = 0x1
UNCERTAIN = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400  # unknown, delalloc, encoded, encrypted, not aligned,
# inline, tail
UNWRITTEN = 0x800
UNWRITTEN_BIT = 1 << 63  # set in an unwritten extent's physical offset (offsets are below 2**63)
BATCH = 512  # extents per ioctl
MAX_EXTENTS = 1 << 22  # a bound: more than this, no answer

Extent = tuple[int, int, int]  # logical, physical, length


def extents(fd: int, size: int) -> list[Extent] | None:
    """The extents of ``fd`` up to ``size`` (synced first), records contiguous both logically and physically
    merged (a filesystem may split its records when a shared extent is copied on write), or None when any is
    uncertain or FIEMAP fails."""
    out: list[Extent] = []
    start, last = 0, False
    while start < size and not last:
        buf = bytearray(_HEAD.size + BATCH * _EXTENT.size)
        _HEAD.pack_into(buf, 0, start, size - start, FIEMAP_FLAG_SYNC, 0, BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError:
            return None
        mapped = _HEAD.unpack_from(buf, 0)[3]
        if mapped == 0:
            break  # the rest is a hole
        for i in range(min(mapped, BATCH)):
            logical, physical, length, _r1, _r2, flags, *_ = _EXTENT.unpack_from(buf, _HEAD.size + i * _EXTENT.size)
            if flags & UNCERTAIN or length == 0 or physical >= UNWRITTEN_BIT or \
                    (out and logical < out[-1][0] + out[-1][2]):  # fmt: skip
                return None
            if flags & UNWRITTEN:
                physical |= UNWRITTEN_BIT
            if out and out[-1][0] + out[-1][2] == logical and out[-1][1] + out[-1][2] == physical:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + length)  # contiguous records: one mapping
            else:
                out.append((logical, physical, length))
            last = bool(flags & LAST)
            start = logical + length
        if len(out) > MAX_EXTENTS:
            return None
    return out


def _per_block(ext: list[Extent], size: int, bs: int) -> dict[int, tuple[Extent, ...]]:
    """Block number -> the physical pieces of its byte range, relative to the block (holes: absent)."""
    out: dict[int, list[Extent]] = {}
    for logical, physical, length in ext:
        end = min(logical + length, size)
        pos = logical
        while pos < end:
            i = pos // bs
            stop = min(end, (i + 1) * bs)
            pieces = out.setdefault(i, [])
            rel, phys, n = pos - i * bs, physical + pos - logical, stop - pos
            if pieces and pieces[-1][0] + pieces[-1][2] == rel and pieces[-1][1] + pieces[-1][2] == phys:
                pieces[-1] = (pieces[-1][0], pieces[-1][1], pieces[-1][2] + n)  # contiguous: one piece
            else:
                pieces.append((rel, phys, n))
            pos = stop
    return {i: tuple(v) for i, v in out.items()}


def changed(base_fd: int, new_fd: int, size: int, bs: int) -> list[tuple[int, int]] | None:
    """Byte ranges (whole blocks of ``bs``) of the new copy that may differ from the base, or None: unknown."""
    base1 = extents(base_fd, size)
    new1 = extents(new_fd, size)
    base2 = extents(base_fd, size)
    new2 = extents(new_fd, size)
    if base1 is None or new1 is None or base1 != base2 or new1 != new2:
        return None
    a, b = _per_block(base1, size, bs), _per_block(new1, size, bs)
    out: list[tuple[int, int]] = []
    for i in sorted(set(a) | set(b)):
        if a.get(i) == b.get(i):
            continue
        start, end = i * bs, min((i + 1) * bs, size)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start, end - start))
    return out
