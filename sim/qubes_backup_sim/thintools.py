"""Stand-ins for ``dmsetup message``, ``thin_dump`` and ``thin_delta`` over the simulated thin pools:
``python -m qubes_backup_sim.thintools DEVDIR dmsetup|thin_dump|thin_delta ARGS...``.

- ``dmsetup message VG-POOL-tpool 0 reserve_metadata_snap|release_metadata_snap`` (dm names: each '-' inside
  VG and POOL doubled): the pool's metadata snapshot is the file ``DEVDIR/VG/.lvm/POOL.metasnap``; a second
  reserve is refused like the kernel does (EBUSY), a release without a reserve too (EINVAL).
- ``thin_dump --metadata-snap --dev-id ID [--format xml] DEVDIR/mapper/VG-POOL_tmeta``: thin_dump's XML for
  the LV of the pool with thin id ID (``lvs -o thin_id``), its provisioned blocks (64 KiB, Qubes' default
  chunk) derived from the sparse LV file with SEEK_DATA/SEEK_HOLE; an unknown ID gives a superblock without
  device, as the real tool does; refused without a reserved metadata snapshot.
- ``thin_delta --metadata-snap --thin1 A --thin2 B DEVDIR/mapper/VG-POOL_tmeta``: thin_delta 0.9's XML (non
  verbose: ``<diff left right>`` with ``same``/``different``/``left_only``/``right_only`` ranges of 64 KiB
  blocks; blocks unmapped in both are not listed).  The sim's sharing model: a block counts as shared ("same")
  when it is provisioned in both and holds the same bytes; the real tool compares mappings, which reports a
  superset (a block rewritten with equal bytes is "different").  Bytes known to be shared are not read: the
  same file (a snapshot hard-linked, sim LVs being replaced whole by every write), or the same physical extents
  of two reflink clones (FIEMAP: on XFS or btrfs a snapshot is a clone, and a write in place into one breaks
  the sharing of what it wrote, as in a thin pool); only the rest is compared.  An unknown id fails like the
  real tool ("Unable to find mapping tree", exit 1).

Test hook ``QUBES_SIM_THIN_FAIL=reserve|dump|release|mismatch|delta|dropdelta`` (comma-separated): that step
fails (exit 1), the dump's ``mapped_blocks`` is off by one, or the delta silently omits its first changed range
(a faulty tracker).  Every call is appended to ``DEVDIR/thintools.log``.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

from qubes_backup_sim.lvstore import data_ranges

META_DIR = ".lvm"  # lvstore's, not imported: dmsetup runs twice per map and needs no LV metadata
CHUNK = 64 * 1024
SECTORS = CHUNK // 512


def _undm(name: str) -> list[str]:
    """``a--b-c--d`` -> ``["a-b", "c-d"]``: split at single dashes."""
    parts, cur, i = [], "", 0
    while i < len(name):
        if name.startswith("--", i):
            cur, i = cur + "-", i + 2
        elif name[i] == "-":
            parts.append(cur)
            cur, i = "", i + 1
        else:
            cur, i = cur + name[i], i + 1
    return [*parts, cur]


def _fails(step: str) -> bool:
    return step in os.environ.get("QUBES_SIM_THIN_FAIL", "").split(",")


def _snap_file(devdir: Path, vg: str, pool: str) -> Path:
    return devdir / vg / META_DIR / f"{pool}.metasnap"


def dmsetup(devdir: Path, argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] != "message" or argv[2] != "0":
        print("dmsetup: only 'message DEVICE 0 reserve_metadata_snap|release_metadata_snap' is simulated",
              file=sys.stderr)  # fmt: skip
        return 1
    parts = _undm(argv[1])
    if len(parts) != 3 or parts[2] != "tpool" or not (devdir / parts[0] / META_DIR).is_dir():
        print(f"device-mapper: message ioctl on {argv[1]} failed: No such device or address", file=sys.stderr)
        return 1
    vg, pool, _ = parts
    snap = _snap_file(devdir, vg, pool)
    word = argv[3]
    err = 0
    if _fails(word.split("_")[0]):
        err = errno.EIO
    elif word == "reserve_metadata_snap":
        try:
            os.close(os.open(snap, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            err = errno.EBUSY
    elif word == "release_metadata_snap":
        try:
            snap.unlink()
        except FileNotFoundError:
            err = errno.EINVAL
    else:
        err = errno.EINVAL
    if err:
        print(f"device-mapper: message ioctl on {argv[1]}  failed: {os.strerror(err)}", file=sys.stderr)
        return 1
    return 0


def provisioned_chunks(path: Path) -> list[tuple[int, int]]:
    """(first chunk, count) of the CHUNK-sized blocks of a sparse file that hold any data: its written extents
    (FIEMAP; an unwritten extent, allocated but never written, is no data, as a thin block never written is not
    provisioned), or where FIEMAP cannot tell, SEEK_DATA (which calls an unwritten range data once its zeros
    are in the page cache: provisioned would then depend on who read the file before)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        ext = _extents(fd, size)
        spans = data_ranges(fd, size) if ext is None else [(lo, min(lo + n, size)) for lo, _p, n, unwritten in ext
                                                           if not unwritten and lo < size]  # fmt: skip
    finally:
        os.close(fd)
    return _chunk_runs(spans)


def _chunk_runs(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(first chunk, count) of the chunks that ascending byte ranges ``(start, end)`` touch, merged."""
    out: list[tuple[int, int]] = []
    for start, end in spans:
        first, last = start // CHUNK, -(-end // CHUNK)
        if out and out[-1][0] + out[-1][1] >= first:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], last) - out[-1][0])
        else:
            out.append((first, last - first))
    return out


def _device_xml(devdir: Path, vg: str, pool: str, dev_id: int) -> list[str]:
    from .lvstore import LvStore

    store = LvStore(devdir)
    for info in store.lvs(vg):
        if info.thin_pool == pool and info.thin_id == dev_id:
            chunks = provisioned_chunks(store.path(vg, info.name))
            mapped = sum(n for _, n in chunks) + _fails("mismatch")
            lines = [f'  <device dev_id="{dev_id}" mapped_blocks="{mapped}" transaction="0" creation_time="0" '
                     'snap_time="0">']  # fmt: skip
            data = 0
            for first, n in chunks:
                if n == 1:
                    lines.append(f'    <single_mapping origin_block="{first}" data_block="{data}" time="0"/>')
                else:
                    lines.append(f'    <range_mapping origin_begin="{first}" data_begin="{data}" length="{n}" '
                                 'time="0"/>')  # fmt: skip
                data += n
            return [*lines, "  </device>"]
    return []


def thin_dump(devdir: Path, argv: list[str]) -> int:
    if len(argv) not in (4, 6) or argv[:2] != ["--metadata-snap", "--dev-id"] or not argv[2].isdigit() or \
            (len(argv) == 6 and argv[3:5] != ["--format", "xml"]):  # fmt: skip
        print("thin_dump: only '--metadata-snap --dev-id ID [--format xml] TMETA' is simulated", file=sys.stderr)
        return 1
    parts = _undm(Path(argv[-1]).name)
    if len(parts) != 2 or not parts[1].endswith("_tmeta") or not (devdir / parts[0] / META_DIR).is_dir():
        print(f"{argv[-1]}: No such file or directory", file=sys.stderr)
        return 1
    vg, pool = parts[0], parts[1][: -len("_tmeta")]
    if _fails("dump") or not _snap_file(devdir, vg, pool).exists():
        print("no current metadata snap", file=sys.stderr)
        return 1
    lines = [f'<superblock uuid="" time="0" transaction="1" flags="0" version="2" data_block_size="{SECTORS}" '
             'nr_data_blocks="0">', *_device_xml(devdir, vg, pool, int(argv[2])), "</superblock>"]  # fmt: skip
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


_FIEMAP = 0xC020660B
_FIEMAP_HEAD = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")


def _extents(fd: int, size: int) -> list[tuple[int, int, int, bool]] | None:
    """(logical, physical, length, unwritten) of every extent of ``fd`` (FIEMAP, synced first), or None if
    unknown: the sim's own, independent of dom0's qubes/fiemap.py (the tools run without dom0's package).  An
    unwritten extent (allocated, reads as zeros: XFS leaves them where an allocation was larger than the write)
    is a mapping like another, told apart by its flag: a shared extent is never written in place, so the same
    physical bytes in the same state hold the same content in both files."""
    out: list[tuple[int, int, int, bool]] = []
    start = 0
    while start < size:
        buf = bytearray(_FIEMAP_HEAD.size + 256 * _FIEMAP_EXTENT.size)
        _FIEMAP_HEAD.pack_into(buf, 0, start, size - start, 1, 0, 256, 0)
        try:
            fcntl.ioctl(fd, _FIEMAP, buf)
        except OSError:
            return None
        mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
        if mapped == 0:
            return out
        for i in range(mapped):
            logical, physical, length, _a, _b, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)  # fmt: skip
            if flags & 0x78E or length == 0:  # unknown, delayed, encoded, encrypted, unaligned, inline, tail
                return None
            out.append((logical, physical, length, bool(flags & 0x800)))
            start = logical + length
            if flags & 1:  # the last extent
                return out
    return out


def _differing_chunks(a: Path, b: Path) -> list[tuple[int, int]] | None:
    """(first chunk, count) of the chunks whose bytes do *not* map to the same places in both LVs, or None when
    that is unknown.  The same file (a hard-linked snapshot) maps everything the same; reflink clones share
    physical extents until written (FIEMAP, as a thin snapshot shares pool blocks until written).  Chunks
    outside the returned ranges hold the same bytes in both without being read."""
    sa, sb = os.stat(a), os.stat(b)
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        ea, eb = _extents(fa.fileno(), sa.st_size), _extents(fb.fileno(), sb.st_size)
    if ea is None or eb is None:
        return None
    cuts = sorted({0, max(sa.st_size, sb.st_size)} | {x for lo, _p, n, _u in ea + eb for x in (lo, lo + n)})

    def mapping(ext: list[tuple[int, int, int, bool]], i: int, pos: int) -> tuple[int, tuple[int, bool] | None]:
        while i < len(ext) and ext[i][0] + ext[i][2] <= pos:
            i += 1
        if i < len(ext) and ext[i][0] <= pos:
            return i, (ext[i][1] - ext[i][0], ext[i][3])  # physical offset of logical byte 0, unwritten
        return i, None

    differ: list[tuple[int, int]] = []
    ia = ib = 0
    for lo, hi in itertools.pairwise(cuts):
        ia, ma = mapping(ea, ia, lo)
        ib, mb = mapping(eb, ib, lo)
        if ma != mb:  # else both holes, or the same physical bytes
            differ.append((lo, hi))
    return _chunk_runs(differ)


def _chunk_kinds(a: Path, b: Path) -> list[tuple[str, int, int]]:
    """Runs ``(kind, first chunk, count)`` over the 64 KiB blocks mapped in either LV: same, different,
    left_only or right_only (the sharing model above), ascending.  Chunks that map to the same places in both
    (``_differing_chunks``) are "same" without being read; the others provisioned in both are compared."""
    left, right = provisioned_chunks(a), provisioned_chunks(b)
    differ = _differing_chunks(a, b)
    if differ is None:
        differ = [(0, -(-max(a.stat().st_size, b.stat().st_size) // CHUNK))]
    sets = (left, right, differ)
    cuts = sorted({x for ranges in sets for first, n in ranges for x in (first, first + n)})
    idx = [0, 0, 0]

    def inside(k: int, c: int) -> bool:
        ranges = sets[k]
        while idx[k] < len(ranges) and ranges[idx[k]][0] + ranges[idx[k]][1] <= c:
            idx[k] += 1
        return idx[k] < len(ranges) and ranges[idx[k]][0] <= c

    runs: list[tuple[str, int, int]] = []

    def add(kind: str, c: int, n: int) -> None:
        if runs and runs[-1][0] == kind and runs[-1][1] + runs[-1][2] == c:
            runs[-1] = (kind, runs[-1][1], runs[-1][2] + n)
        else:
            runs.append((kind, c, n))

    with open(a, "rb") as fa, open(b, "rb") as fb:
        for lo, hi in itertools.pairwise(cuts):
            in_l, in_r = inside(0, lo), inside(1, lo)
            if in_l and in_r and inside(2, lo):
                for c in range(lo, hi):
                    fa.seek(c * CHUNK)
                    fb.seek(c * CHUNK)
                    add("same" if fa.read(CHUNK) == fb.read(CHUNK) else "different", c, 1)
            elif in_l or in_r:
                add("same" if in_l and in_r else "left_only" if in_l else "right_only", lo, hi - lo)
    return runs


def thin_delta(devdir: Path, argv: list[str]) -> int:
    from .lvstore import LvStore

    args = [a for a in argv if a not in ("--metadata-snap", "-m")]
    if len(args) != 5 or args[0] not in ("--thin1", "--snap1") or args[2] not in ("--thin2", "--snap2") or \
            not args[1].isdigit() or not args[3].isdigit():  # fmt: skip
        print("thin_delta: only '--metadata-snap --thin1 A --thin2 B TMETA' is simulated", file=sys.stderr)
        return 1
    parts = _undm(Path(args[4]).name)
    if len(parts) != 2 or not parts[1].endswith("_tmeta") or not (devdir / parts[0] / META_DIR).is_dir():
        print(f"{args[4]}: No such file or directory", file=sys.stderr)
        return 1
    vg, pool = parts[0], parts[1][: -len("_tmeta")]
    if _fails("delta") or not _snap_file(devdir, vg, pool).exists():
        print("no current metadata snap", file=sys.stderr)
        return 1
    store = LvStore(devdir)
    paths = {info.thin_id: store.path(vg, info.name) for info in store.lvs(vg) if info.thin_pool == pool}
    left, right = int(args[1]), int(args[3])
    for which, dev in (("snap1", left), ("snap2", right)):
        if dev not in paths:
            print(f"Unable to find mapping tree for {which} ({dev})", file=sys.stderr)
            return 1
    runs = _chunk_kinds(paths[left], paths[right])
    if _fails("dropdelta"):
        changed = [r for r in runs if r[0] != "same"]
        if changed:
            runs.remove(changed[0])
    lines = [
        f'<superblock uuid="" time="1" transaction="2" data_block_size="{SECTORS}" nr_data_blocks="0">',
        f'  <diff left="{left}" right="{right}">',
        *(f'    <{k} begin="{b}" length="{n}"/>' for k, b, n in runs),
        "  </diff>",
        "</superblock>",
    ]
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


TOOLS = {"dmsetup": dmsetup, "thin_dump": thin_dump, "thin_delta": thin_delta}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[1] not in TOOLS:
        print("usage: python -m qubes_backup_sim.thintools DEVDIR dmsetup|thin_dump|thin_delta ARGS...",
              file=sys.stderr)  # fmt: skip
        return 3
    devdir = Path(argv[0])
    with open(devdir / "thintools.log", "a") as log:
        log.write(json.dumps(argv[1:]) + "\n")
    return TOOLS[argv[1]](devdir, argv[2:])


if __name__ == "__main__":
    sys.exit(main())
