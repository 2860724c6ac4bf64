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
import os
import re
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

from qubes_backup_dom0.qubes.lvm import run_lvm
from qubes_backup_dom0.qubes.system import System

MAP_TIMEOUT = 300.0
MAX_DUMP = 1 << 30  # bytes of XML read at most: a bound on time (it is streamed: memory is the map's)
READ = 1 << 20
SECTOR = 512
_NUM = re.compile(r"0|[1-9][0-9]{0,19}")
_LV_PART = re.compile(r"^[A-Za-z0-9_.+-]{1,127}$")
EXIT_RESERVE, EXIT_DUMP, EXIT_RELEASE, EXIT_BOTH = 10, 11, 12, 13
_POOL_LOCKS: dict[str, threading.Lock] = {}  # one reservation per pool at a time within this process
_LOCKS_LOCK = threading.Lock()

# The child: reserve, dump to stdout, release in a finally; it ignores the signals a dying parent's terminal
# or session sends, so the release always runs.  Standard library only (run with ``python -S``).
# While it holds the reservation, a marker file (its pid) says the reservation is ours: a child killed with
# SIGKILL leaves it, and the next backup releases that reservation (``release_stale``), never another's.
_HELPER = """
import json, os, signal, subprocess, sys
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
if a["marker"]:
    try:
        with open(a["marker"], "w") as f:
            f.write(str(os.getpid()))
    except OSError:
        pass
dumped = False
try:
    if "tools" in a:  # several tools on one reservation: each one's exit status, length and output in turn
        out = sys.stdout.buffer
        for tool in a["tools"]:
            try:
                r = subprocess.run(tool, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, timeout=a["timeout"])
                rc, data = r.returncode, r.stdout[: a["max"] + 1]
            except Exception:
                rc, data = 255, b""
            out.write(b"%d %d\\n" % (min(max(rc, 0), 255), len(data)) + data)
            out.flush()
        dumped = True
    else:
        dumped = subprocess.run(a["thin_dump"], stdin=subprocess.DEVNULL, timeout=a["timeout"]).returncode == 0
except Exception:
    pass
finally:
    try:
        released = msg("release_metadata_snap")
    except Exception:
        released = False
    if released and a["marker"]:
        try:
            os.unlink(a["marker"])
        except OSError:
            pass
sys.exit((0 if released else 12) if dumped else (11 if released else 13))
"""


def dm_name(vg: str, lv: str) -> str:
    """device-mapper's name of ``VG/LV``: each '-' inside a name doubled, then joined with '-'."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def _thin_id(system: System, vg: str, lv: str) -> tuple[int, str] | None:
    from qubes_backup_dom0.errors import BackupError

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


RESERVATIONS = "/var/lib/qubes-backup/thin-reservations"  # markers: DM-NAME-OF-POOL (its pid inside)


def _marker(system: System, name: str) -> str | None:
    directory = system.dom0_path(RESERVATIONS)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return str(directory / name)


def release_stale(system: System, alive: Callable[[int], bool]) -> list[str]:
    """Release the metadata snapshots our reserve/release children reserved and could not release (killed
    with SIGKILL: their marker names a dead process); returns the pools' dm names.  Another tool's reservation
    has no marker of ours and is never touched."""
    directory = system.dom0_path(RESERVATIONS)
    try:
        markers = sorted(p for p in directory.iterdir() if _LV_PART.match(p.name))
    except OSError:
        return []
    released = []
    for marker in markers:
        try:
            text = marker.read_text()[:20]
        except OSError:
            continue
        if _NUM.fullmatch(text) and alive(int(text)):
            continue
        try:
            rc = subprocess.run([*system.dmsetup_argv, "message", f"{marker.name}-tpool", "0",
                                 "release_metadata_snap"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, timeout=MAP_TIMEOUT).returncode  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            continue
        marker.unlink(missing_ok=True)  # released now, or not reserved any more (EINVAL)
        if rc == 0:
            released.append(marker.name)
    return released


def dump(system: System, vg: str, pool: str, dev_id: int, consume: Callable[[bytes], bool]) -> bool:
    """Feed ``consume`` the XML of ``dev_id``'s mappings in a metadata snapshot of ``VG/POOL`` (reserved, dumped
    and released by one child in its own session) until it returns False; True if the dump succeeded.  A
    failed release is a warning on stderr."""
    name = dm_name(vg, pool)
    return on_metadata_snapshot(system, vg, pool, [*system.thin_dump_argv, "--metadata-snap", "--dev-id",
                                str(dev_id), "--format", "xml", f"{system.dev_dir}/mapper/{name}_tmeta"], consume)


def on_metadata_snapshot(system: System, vg: str, pool: str, tool: list[str], consume: Callable[[bytes], bool]) -> bool:
    """Run ``tool`` (thin_dump or thin_delta on the pool's tmeta) on a reserved metadata snapshot of ``VG/POOL``
    (reserved, run and released by one child in its own session), feeding ``consume`` its output until it
    returns False; True if the tool succeeded.  A failed release is a warning on stderr."""
    name = dm_name(vg, pool)
    with _pool_lock(name):  # planning threads of one backup wait for each other instead of failing with EBUSY
        return _run_reserved(system, vg, pool, name, tool, consume)


def _pool_lock(name: str) -> threading.Lock:
    """The lock that keeps this process to one reservation of pool ``name`` at a time."""
    with _LOCKS_LOCK:
        return _POOL_LOCKS.setdefault(name, threading.Lock())


def on_metadata_snapshot_many(system: System, vg: str, pool: str, tools: list[list[str]]) -> list[bytes | None]:
    """Run each of ``tools`` (thin_delta on the pool's tmeta) in turn on one reserved metadata snapshot of
    ``VG/POOL`` (one reservation for all: a backup's volumes of one pool cost one reserve and one release); the
    output of each tool that succeeded, None for the others (or for all, when the reservation failed).  Each
    output is bounded by MAX_DUMP, the whole by MAX_DUMP too."""
    if not tools:
        return []
    name = dm_name(vg, pool)
    chunks: list[bytes] = []
    total = 0

    def consume(piece: bytes) -> bool:
        nonlocal total
        total += len(piece)
        chunks.append(piece)
        return total <= MAX_DUMP

    with _pool_lock(name):
        ok = _run_reserved(system, vg, pool, name, tools, consume, many=True)
    results: list[bytes | None] = [None] * len(tools)
    if not ok:
        return results
    data, pos = b"".join(chunks), 0
    for i in range(len(tools)):
        end = data.find(b"\n", pos, pos + 32)
        head = data[pos:end].split(b" ") if end >= 0 else []
        if len(head) != 2 or not all(_NUM.fullmatch(h.decode("ascii", "replace")) for h in head):
            return [None] * len(tools)
        rc, n = int(head[0]), int(head[1])
        if end + 1 + n > len(data) or n > MAX_DUMP:
            return [None] * len(tools)
        results[i] = data[end + 1 : end + 1 + n] if rc == 0 else None
        pos = end + 1 + n
    return results if pos == len(data) else [None] * len(tools)


def _run_reserved(system: System, vg: str, pool: str, name: str, tool: list[str] | list[list[str]],
                  consume: Callable[[bytes], bool], many: bool = False) -> bool:  # fmt: skip
    args: dict[str, Any] = {"dmsetup": system.dmsetup_argv, "pool": f"{name}-tpool", "timeout": MAP_TIMEOUT,
                            "marker": _marker(system, name)}  # fmt: skip
    if many:
        args.update(tools=tool, max=MAX_DUMP)
    else:
        args["thin_dump"] = tool
    try:
        proc = subprocess.Popen([sys.executable, "-S", "-c", _HELPER, json.dumps(args)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    except OSError:
        return False
    assert proc.stdout is not None
    total, wanted = 0, True
    with proc.stdout:  # closed early, the child ends on its own (a broken pipe), releasing
        while wanted and (piece := os.read(proc.stdout.fileno(), READ)):
            total += len(piece)
            wanted = total <= MAX_DUMP and consume(piece)
    rc = proc.wait()
    if rc in (EXIT_RELEASE, EXIT_BOTH):
        print(f"warning: cannot release the metadata snapshot of thin pool {vg}/{pool} (dmsetup message "
              f"{name}-tpool 0 release_metadata_snap)", file=sys.stderr)  # fmt: skip
    return wanted and rc in (0, EXIT_RELEASE)


def _num(el: ET.Element, attr: str) -> int:
    value = el.get(attr)
    if value is None or not _NUM.fullmatch(value):
        raise ValueError(f"{el.tag}: bad {attr}")
    return int(value)


class ThinXml:
    """The XML a thin tool writes (thin_dump, thin_delta), fed piecewise and parsed strictly: no DOCTYPE,
    entities or comments (the tools write none); a ``superblock`` first, giving the data block size; elements
    dropped once read, so memory is the result's; ranges of blocks that must come ascending, not overlapping,
    within ``size``, merged into byte ranges (``out``).  Subclasses say which elements they accept
    (``_element``) and what makes the document complete (``finish``)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._xml: Any = ET.XMLPullParser(events=("start", "end"))
        self._tail = b""
        self._path: list[ET.Element] = []
        self.bs = self.next_free = 0
        self.out: list[tuple[int, int]] = []
        self.failed = False

    def feed(self, data: bytes) -> bool:
        """Parse more; False once anything is unexpected (the rest need not be read)."""
        if b"<!" in self._tail + data:
            self.failed = True
        self._tail = data[-1:]
        try:
            if not self.failed:
                self._xml.feed(data)
                for event, el in self._xml.read_events():
                    if event == "start":
                        self._start(el)
                    else:
                        self._end(el)
        except (ET.ParseError, ValueError):
            self.failed = True
        return not self.failed

    def _start(self, el: ET.Element) -> None:
        depth = len(self._path)
        if (depth, el.tag) == (0, "superblock"):
            self.bs = _num(el, "data_block_size") * SECTOR
            if not self.bs or self.bs % 4096:
                raise ValueError("unusable data_block_size")
        elif depth == 0 or not self._element(depth, el):
            raise ValueError(f"unexpected element {el.tag}")
        self._path.append(el)

    def _element(self, depth: int, el: ET.Element) -> bool:
        """Take element ``el`` at ``depth`` (1: below the superblock); False: not one this tool writes."""
        raise NotImplementedError

    def _end(self, el: ET.Element) -> None:
        self._path.pop()
        if self._path:
            self._path[-1].remove(el)  # read: keep no tree

    def _range(self, first: int, n: int, keep: bool = True) -> None:
        """Blocks ``first`` to ``first + n - 1``; in ``out`` (clipped to ``size``) if ``keep``."""
        if n < 1 or first < self.next_free or (first + n - 1) * self.bs >= self.size:
            raise ValueError("empty, out of order, overlapping or beyond the volume")
        self.next_free = first + n
        if not keep:
            return
        start, end = first * self.bs, min((first + n) * self.bs, self.size)
        if self.out and self.out[-1][0] + self.out[-1][1] == start:
            self.out[-1] = (self.out[-1][0], end - self.out[-1][0])
        else:
            self.out.append((start, end - start))

    def _close(self) -> bool:
        try:
            if not self.failed:
                self._xml.close()
        except ET.ParseError:
            self.failed = True
        return not self.failed


class MapParser(ThinXml):
    """thin_dump's XML: superblock > device > range_mapping | single_mapping, nothing else.  Only device
    ``dev_id``'s mappings are kept (thin_dump lists them by ascending origin block)."""

    def __init__(self, dev_id: int, size: int) -> None:
        super().__init__(size)
        self.dev_id = dev_id
        self.found = self.mapped = 0
        self.expected = -1
        self._wanted = False  # inside device dev_id

    def _element(self, depth: int, el: ET.Element) -> bool:
        if (depth, el.tag) == (1, "device"):
            self._wanted = _num(el, "dev_id") == self.dev_id
            if self._wanted:
                self.found += 1
                self.expected = _num(el, "mapped_blocks")
        elif depth == 2 and el.tag in ("range_mapping", "single_mapping"):
            if self._wanted:
                first, n = ((_num(el, "origin_begin"), _num(el, "length")) if el.tag == "range_mapping"
                            else (_num(el, "origin_block"), 1))  # fmt: skip
                self._range(first, n)
                self.mapped += n
        else:
            return False
        return True

    def finish(self) -> list[tuple[int, int]] | None:
        """The merged byte ranges, clipped to the LV's size, or None (never "not found" as "unallocated")."""
        if not self._close() or self.found != 1 or self.mapped != self.expected:
            return None
        return self.out


def parse(xml: bytes, dev_id: int, size: int) -> list[tuple[int, int]] | None:
    """Provisioned byte ranges ``(offset, length)`` of device ``dev_id`` (apparent ``size``) in a thin_dump XML."""
    parser = MapParser(dev_id, size)
    parser.feed(xml)
    return parser.finish()


def provisioned(system: System, vg: str, lv: str, size: int) -> list[tuple[int, int]] | None:
    """The provisioned ranges of thin LV ``VG/LV`` (an immutable snapshot), or None: scan everything."""
    found = _thin_id(system, vg, lv)
    if found is None:
        return None
    dev_id, pool = found
    parser = MapParser(dev_id, size)
    if not dump(system, vg, pool, dev_id, parser.feed):
        return None
    return parser.finish()
