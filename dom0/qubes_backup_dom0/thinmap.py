"""Which ranges of a thin LV are provisioned in its pool, from the pool's metadata (dom0, as root).

A thin LV read as a block device reports all of its size as data, so without a map its scan reads every
byte, mostly the zeros of unprovisioned blocks (docs/PERFORMANCE.md).  The map of our read-only snapshot:

1. ``lvm lvs --noheadings --separator=| -o thin_id,pool_lv VG/SNAP``: its thin device id and pool;
2. in one child in its own session (it survives qvm-backup being killed, and always releases):
   ``dmsetup message VG-POOL-tpool 0 reserve_metadata_snap``, then
   ``thin_dump --metadata-snap --dev-id ID --format xml /dev/mapper/VG-POOL_tmeta``, then always
   ``dmsetup message VG-POOL-tpool 0 release_metadata_snap`` (dm names double each '-' of VG and LV);
3. the XML parsed strictly: anything unexpected (device missing, mapped_blocks not the sum of the mappings,
   a block beyond the LV, overlaps, an unknown block size) is no map.

No map (tools missing, not root, a metadata snapshot already reserved, an old lvm without thin_id...) means
the full scan, as before; only a failed release is reported (a warning: the pool keeps a metadata snapshot).
Provisioned ranges are still zero-scanned; unprovisioned blocks read as zeros by definition.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

from .system import System

MAP_TIMEOUT = 300.0
MAX_DUMP = 512 << 20  # bytes of XML: ~8M single mappings, far beyond a 64 GiB LV's 1M chunks of 64 KiB
SECTOR = 512
_NUM = re.compile(r"0|[1-9][0-9]{0,19}")
_LV_PART = re.compile(r"^[A-Za-z0-9_.+-]{1,127}$")
EXIT_RESERVE, EXIT_DUMP, EXIT_RELEASE, EXIT_BOTH = 10, 11, 12, 13

# The child: reserve, dump to stdout, release in a finally; it ignores the signals a dying parent's terminal
# or session sends, so the release always runs.  Standard library only (run with ``python -S``).
_HELPER = """
import json, signal, subprocess, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
a = json.loads(sys.argv[1])
def msg(word):
    return subprocess.run(a["dmsetup"] + ["message", a["pool"], "0", word], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, timeout=a["timeout"]).returncode == 0
try:
    if not msg("reserve_metadata_snap"):
        sys.exit(10)
except Exception:
    sys.exit(10)
dumped = False
try:
    dumped = subprocess.run(a["thin_dump"], stdin=subprocess.DEVNULL, timeout=a["timeout"]).returncode == 0
except Exception:
    pass
finally:
    try:
        released = msg("release_metadata_snap")
    except Exception:
        released = False
sys.exit((0 if released else 12) if dumped else (11 if released else 13))
"""


def dm_name(vg: str, lv: str) -> str:
    """device-mapper's name of ``VG/LV``: each '-' inside a name doubled, then joined with '-'."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def _thin_id(system: System, vg: str, lv: str) -> tuple[int, str] | None:
    from .errors import BackupError
    from .pools import run_lvm

    try:
        out = run_lvm(system, ["lvs", "--noheadings", "--separator=|", "-o", "thin_id,pool_lv", f"{vg}/{lv}"],
                      "thin map")  # fmt: skip
    except BackupError:
        return None
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    if len(lines) != 1 or lines[0].count("|") != 1:
        return None
    dev_id, pool = (p.strip() for p in lines[0].split("|"))
    if not _NUM.fullmatch(dev_id) or not _LV_PART.match(pool) or pool.startswith("-"):
        return None
    return int(dev_id), pool


def dump(system: System, vg: str, pool: str, dev_id: int) -> bytes | None:
    """The XML of ``dev_id``'s mappings in a metadata snapshot of ``VG/POOL`` (reserved, dumped and released by
    one child in its own session), or None.  A failed release is a warning on stderr."""
    name = dm_name(vg, pool)
    args = {"dmsetup": system.dmsetup_argv, "pool": f"{name}-tpool", "timeout": MAP_TIMEOUT,
            "thin_dump": [*system.thin_dump_argv, "--metadata-snap", "--dev-id", str(dev_id), "--format", "xml",
                          f"{system.dev_dir}/mapper/{name}_tmeta"]}  # fmt: skip
    try:
        proc = subprocess.Popen([sys.executable, "-S", "-c", _HELPER, json.dumps(args)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    except OSError:
        return None
    assert proc.stdout is not None
    with proc.stdout:
        data = proc.stdout.read(MAX_DUMP + 1)  # the child ends on its own (a broken pipe at worst), releasing
    rc = proc.wait()
    if rc in (EXIT_RELEASE, EXIT_BOTH):
        print(f"warning: cannot release the metadata snapshot of thin pool {vg}/{pool} (dmsetup message "
              f"{name}-tpool 0 release_metadata_snap)", file=sys.stderr)  # fmt: skip
    if rc not in (0, EXIT_RELEASE) or len(data) > MAX_DUMP:
        return None
    return data


def _num(el: ET.Element, attr: str) -> int:
    value = el.get(attr)
    if value is None or not _NUM.fullmatch(value):
        raise ValueError(f"{el.tag}: bad {attr}")
    return int(value)


def parse(xml: bytes, dev_id: int, size: int) -> list[tuple[int, int]] | None:
    """Merged provisioned byte ranges ``(offset, length)`` of device ``dev_id`` (apparent ``size``) in a
    ``thin_dump`` XML, clipped to ``size``; None when anything is unexpected."""
    if b"<!" in xml:  # no DOCTYPE, entities or comments: thin_dump writes none
        return None
    try:
        root = ET.fromstring(xml)
        if root.tag != "superblock":
            return None
        bs = _num(root, "data_block_size") * SECTOR
        if not bs or bs % 4096:
            return None
        devices = [d for d in root if d.tag == "device" and _num(d, "dev_id") == dev_id]
        if len(devices) != 1:
            return None  # never "not found" as "unallocated"
        blocks = []
        for m in devices[0]:
            if m.tag == "range_mapping":
                blocks.append((_num(m, "origin_begin"), _num(m, "length")))
            elif m.tag == "single_mapping":
                blocks.append((_num(m, "origin_block"), 1))
            else:
                return None
        if sum(n for _, n in blocks) != _num(devices[0], "mapped_blocks"):
            return None
    except (ET.ParseError, ValueError):
        return None
    return _ranges(blocks, bs, size)


def _ranges(blocks: list[tuple[int, int]], bs: int, size: int) -> list[tuple[int, int]] | None:
    """Sorted, merged byte ranges of ``(first block, count)`` mappings; None if any overlap or lies beyond
    ``size`` (the last block may extend past an LV size that is not a multiple of the block size)."""
    out: list[tuple[int, int]] = []
    next_free = 0
    for first, n in sorted(blocks):
        if n < 1 or first < next_free or (first + n - 1) * bs >= size:
            return None
        start, end = first * bs, min((first + n) * bs, size)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start, end - start))
        next_free = first + n
    return out


def provisioned(system: System, vg: str, lv: str, size: int) -> list[tuple[int, int]] | None:
    """The provisioned ranges of thin LV ``VG/LV`` (an immutable snapshot), or None: scan everything."""
    found = _thin_id(system, vg, lv)
    if found is None:
        return None
    dev_id, pool = found
    xml = dump(system, vg, pool, dev_id)
    return None if xml is None else parse(xml, dev_id, size)

