"""Where a file or volume holds data: SEEK_DATA/SEEK_HOLE regions, all-zero runs (64 KiB granules) found by
reading, block devices read with O_DIRECT (several threads for large regions), and a byte-exact comparison
of sparse files for the demo and tests.  Holes found here are never read again and never stored."""


from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from qubes_backup_dom0.errors import BackupError

# --------------------------------------------------------------------------------------------- scanning


def scan_fd(fd: int, size: int) -> list[tuple[int, int]]:
    """Data regions of an open file of apparent ``size``, via SEEK_DATA/SEEK_HOLE; holes are never read."""
    regions: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                break
            if e.errno == errno.EINVAL:  # filesystem without SEEK_DATA: treat as all data
                return [(0, size)] if size else []
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end <= start:
            break
        if regions and regions[-1][0] + regions[-1][1] == start:
            regions[-1] = (regions[-1][0], end - regions[-1][0])
        else:
            regions.append((start, end - start))
        pos = end
    return regions


def scan(path: Path) -> tuple[int, list[tuple[int, int]]]:
    """Apparent size and merged data regions ``(offset, length)`` of a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        return size, scan_fd(fd, size)
    finally:
        os.close(fd)


ZERO_GRANULE = 64 * 1024  # all-zero runs this long (aligned) become holes
SCAN_READ = 4 * 1024 * 1024  # a multiple of ZERO_GRANULE
_ZERO_GRANULE = memoryview(bytes(ZERO_GRANULE))
_ZERO_READ_BYTES = bytes(SCAN_READ)
_ZERO_READ = memoryview(_ZERO_READ_BYTES)


def _add_run(out: list[tuple[int, int]], start: int, length: int) -> None:
    if out and out[-1][0] + out[-1][1] == start:
        out[-1] = (out[-1][0], out[-1][1] + length)
    else:
        out.append((start, length))


def _nonzero_runs(buf: bytearray, n: int, base: int, out: list[tuple[int, int]], at: int = 0) -> None:
    """Append the non-zero granules of ``buf[at:at + n]`` (file offset ``base``) to ``out``: whole blocks
    compared against a zero buffer (memcmp speed), never a loop over bytes."""
    if n == SCAN_READ and at == 0 and len(buf) == SCAN_READ:
        if buf == _ZERO_READ_BYTES:  # the common case of a thin volume: one memcmp, no slicing
            return
    elif buf.startswith(_ZERO_READ[:n], at):
        return
    pos, end = base, base + n
    while pos < end:
        gend = min((pos // ZERO_GRANULE + 1) * ZERO_GRANULE, end)
        if not buf.startswith(_ZERO_GRANULE[: gend - pos], at + pos - base):
            _add_run(out, pos, gend - pos)
        pos = gend


BLOCKDEV_ENV = "QUBES_SIM_BLOCKDEV"


def _model_block_device() -> bool:
    """Simulation only: ``QUBES_SIM_BLOCKDEV=1`` (with ``QUBES_SIM`` set) makes volumes read like a real block
    device, which reports its whole apparent size as data: no SEEK_DATA/SEEK_HOLE shortcut, every byte is
    read and zero-scanned (docs/PERFORMANCE.md, the 64 GiB thin-volume case)."""
    return bool(os.environ.get("QUBES_SIM")) and os.environ.get(BLOCKDEV_ENV) == "1"


def reads_as_block_device(fd: int) -> bool:
    """A block device (a real LV: no SEEK_DATA), or a simulated LV read like one (``QUBES_SIM_BLOCKDEV=1``)."""
    return _model_block_device() or stat.S_ISBLK(os.fstat(fd).st_mode)


SCANNED = [0]  # bytes read by scan_zeros in this process (observable by tests and the bench)
SCAN_PARALLEL_MIN = 256 * 1024 * 1024  # regions at least this large are scanned by several threads


DIRECT_ALIGN = 4096


def _direct_fd(fd: int) -> int | None:
    """``fd`` opened again with O_DIRECT, or None.  A block device's scan reads its whole size, mostly the
    zeros of unallocated thin blocks: through the page cache that costs a page allocation per 4 KiB
    (measured 0.4 GB/s on a cold sparse file, docs/PERFORMANCE.md) and evicts everything else; O_DIRECT
    reads them at memory speed and caches nothing."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except (OSError, AttributeError):
        return None


def _aligned(size: int) -> tuple[bytearray, int]:
    """A buffer with ``size`` bytes starting at a DIRECT_ALIGN boundary: (buffer, offset of that start)."""
    import ctypes

    buf = bytearray(size + DIRECT_ALIGN)
    return buf, -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % DIRECT_ALIGN


def _scan_part(fd: int, ranges: list[tuple[int, int]], what: str, direct: int | None = None) -> list[tuple[int, int]]:
    """The non-zero granules of ``ranges`` (offset, length), read with preadv into one reused buffer (through
    ``direct``, an O_DIRECT descriptor of the same file, where the kernel accepts it)."""
    out: list[tuple[int, int]] = []
    buf, at = _aligned(SCAN_READ) if direct is not None else (bytearray(SCAN_READ), 0)
    view = memoryview(buf)[at : at + SCAN_READ]
    for off, length in ranges:
        pos, end = off, off + length
        while pos < end:
            n = min(end, (pos // SCAN_READ + 1) * SCAN_READ) - pos
            got = -1
            if direct is not None and not (pos | n) % DIRECT_ALIGN:
                try:
                    got = os.preadv(direct, [view[:n]], pos)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    direct = None  # not possible here after all: the page cache it is
            if got < 0:
                got = os.preadv(fd, [view[:n]], pos)
            if got != n:
                raise BackupError(f"cannot read {what}: short read at offset {pos + max(got, 0)}")
            _nonzero_runs(buf, n, pos, out, at)
            pos += n
    return out


def _split_even(regions: list[tuple[int, int]], parts: int) -> list[list[tuple[int, int]]]:
    """``regions`` cut into ``parts`` consecutive pieces of about equal bytes, at SCAN_READ boundaries."""
    total = sum(n for _, n in regions)
    share = -(-total // parts // SCAN_READ) * SCAN_READ
    out: list[list[tuple[int, int]]] = [[]]
    room = share
    for off, length in regions:
        while length:
            take = min(length, room)
            out[-1].append((off, take))
            off, length, room = off + take, length - take, room - take
            if room == 0 and len(out) < parts:
                out.append([])
                room = share
    return [p for p in out if p]


def data_map(fd: int, size: int, provisioned: list[tuple[int, int]] | None = None) -> list[tuple[int, int]] | None:
    """Where an open file or block device of apparent ``size`` may hold data, known without reading it:
    ``provisioned`` (a thin LV's map) when given, else the SEEK_DATA/SEEK_HOLE map of a regular file; None for
    a block device without a map (all of it reads as data: only ``scan_zeros`` finds its zeros)."""
    if provisioned is not None:
        return provisioned
    if reads_as_block_device(fd):
        return None
    return scan_fd(fd, size)


def allocated_or_scanned(
    fd: int, size: int, what: str = "volume", provisioned: list[tuple[int, int]] | None = None
) -> list[tuple[int, int]]:
    """The regions a repository backup reads of a volume read in full: its allocation map (``data_map``), not
    read now (the backup drops the all-zero blocks it reads); ``scan_zeros`` only where no map is known."""
    try:
        mapped = data_map(fd, size, provisioned)
    except OSError as e:
        raise BackupError(f"cannot read {what}: {e.strerror or e}") from None
    return mapped if mapped is not None else scan_zeros(fd, size, what, provisioned)


def scan_zeros(
    fd: int, size: int, what: str = "volume", provisioned: list[tuple[int, int]] | None = None
) -> list[tuple[int, int]]:
    """Data regions of an open file or block device of apparent ``size``: the SEEK_DATA/SEEK_HOLE map (a block
    device reports all data) or, when given, ``provisioned`` (a thin LV's map: the rest reads as zeros), then
    all-zero runs inside it (``ZERO_GRANULE`` granularity) become holes.  ``SCANNED`` counts the bytes read.

    The zero test is a memcmp per 4 MiB block (tens of GB/s); reading is what costs (preadv copies every
    byte, also the zeros of a thin volume's unallocated blocks), so large volumes are read by one thread
    per core (preadv and the compare run outside the GIL or briefly inside it), and a block device is read
    with O_DIRECT (see ``_direct_fd``)."""
    blockdev = reads_as_block_device(fd)
    # O_DIRECT for the zeros of a block device read whole; a thin LV's provisioned ranges go through the page
    # cache, where the archive's read of the same bytes right after finds them.
    direct = _direct_fd(fd) if blockdev and provisioned is None else None
    try:
        if provisioned is not None:
            regions = provisioned
        else:
            regions = [(0, size)] if size and _model_block_device() else scan_fd(fd, size)
        SCANNED[0] += sum(n for _, n in regions)
        parts = min(os.cpu_count() or 1, 4)
        if parts < 2 or sum(n for _, n in regions) < SCAN_PARALLEL_MIN:
            return _scan_part(fd, regions, what, direct)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=parts, thread_name_prefix="scan") as pool:
            results = list(pool.map(lambda r: _scan_part(fd, r, what, direct), _split_even(regions, parts)))
    except OSError as e:
        raise BackupError(f"cannot read {what}: {e.strerror or e}") from None
    finally:
        if direct is not None:
            os.close(direct)
    out: list[tuple[int, int]] = []
    for runs in results:
        for start, length in runs:
            _add_run(out, start, length)
    return out



def same_content(a: Path, b: Path) -> bool:
    """Byte-exact comparison of a restored file ``b`` with its original ``a`` (demo, tests), reading only data:
    the sizes must match, ``b`` must equal ``a`` over ``a``'s data regions, and ``a`` must equal ``b`` over
    ``b``'s (so ``b`` holds zeros wherever ``a`` has a hole)."""
    size_a, regions_a = scan(a)
    size_b, regions_b = scan(b)
    if size_a != size_b:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for regions in (regions_a, regions_b):
            for offset, length in regions:
                for pos in range(offset, offset + length, 1 << 22):
                    n = min(1 << 22, offset + length - pos)
                    if os.pread(fa.fileno(), n, pos) != os.pread(fb.fileno(), n, pos):
                        return False
    return True
