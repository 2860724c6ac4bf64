"""Reading a volume in its committed state (what Qubes' own backup reads), per storage pool driver.

- ``lvm_thin``: a read-only, activated thin snapshot of the committed LV ``VG/vm-NAME-VOL`` (a running VM
  writes ``...-snap``), tagged ``qubes-backup-snapshot`` and named ``qbackup-PID-RAND-N`` (never ending in
  ``-snap``, ``-back`` or ``-import``, which qubesd treats as its own), read from ``DEV_DIR/VG/NAME`` and
  always removed (a ``SnapshotRemover`` removes an archive's snapshots with one ``lvremove``).  Read as a block
  device, only its provisioned ranges are scanned (thinmap.py; without a map, all of it).  Leftovers of a
  killed run (tagged ours, their pid dead) are removed, all in one lvremove, when a backup starts.
- ``file-reflink``: a reflink clone (FICLONE into an O_TMPFILE beside the image: nothing left behind) of the
  clean image ``DIR_PATH/VID.img``, else an open descriptor of it (qubesd replaces the clean image by rename
  when a VM stops, so the descriptor keeps what was committed).  The ``-dirty`` image is never read.
- ``file``: the image ``DIR_PATH/VID.img``, only while the VM is halted.
- any other driver: one clear error naming VM, volume and pool.

Each reader is a context manager yielding an open fd, its apparent size and an ``identity`` of the committed
state: a backup scans a volume while planning and reads it later through a second reader, and refuses to
continue when the identity changed in between (the VM was stopped or started: its committed state moved).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import secrets
import stat
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from qubes_backup_protocol.frames import safe_text

from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.format import sparse
from qubes_backup_dom0.qubes import thinmap
from qubes_backup_dom0.qubes.lvm import run_lvm
from qubes_backup_dom0.qubes.qubesxml import QubesXmlError, _check_vid
from qubes_backup_dom0.qubes.system import System

SNAPSHOT_TAG = "qubes-backup-snapshot"
SNAPSHOT_RE = re.compile(r"^qbackup-([0-9]{1,10})-[0-9a-f]{8}-[0-9]{1,6}$")
FICLONE = 0x40049409
_LV_PART_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,127}$")
_counter = itertools.count(1)

Identity = tuple[object, ...]


@dataclass(frozen=True)
class VolumeRef:
    """What planning knows about one volume to back up."""

    vm: str
    vm_state: str
    volume: str
    pool: str
    vid: str
    pool_info: Mapping[str, str]

    @property
    def driver(self) -> str:
        return self.pool_info.get("driver", "")

    @property
    def label(self) -> str:
        return f"volume '{self.volume}' of {self.vm}"


@dataclass(frozen=True)
class Committed:
    """An open, immutable view of a volume's committed state."""

    fd: int
    size: int
    identity: Identity
    provisioned: list[tuple[int, int]] | None = None  # a thin LV's provisioned ranges (thinmap), if known


class SnapshotRemover:
    """Snapshots whose readers are closed, removed together by one ``lvremove`` (a process per call)."""

    def __init__(self, system: System) -> None:
        self.system = system
        self._pending: list[str] = []
        self._lock = threading.Lock()

    def add(self, vg: str, name: str) -> None:
        with self._lock:
            self._pending.append(f"{vg}/{name}")

    def flush(self) -> None:
        """Remove every pending snapshot (one lvm process); failing while already failing is a warning."""
        with self._lock:
            names, self._pending = self._pending, []
        if names:
            _remove_snapshots(self.system, names)


def committed(
    system: System, ref: VolumeRef, remover: SnapshotRemover | None = None
) -> contextlib.AbstractContextManager[Committed]:
    """The reader for ``ref``'s pool driver (see the module docstring); it always cleans up (an lvm snapshot
    is handed to ``remover`` when given, whose ``flush`` the caller guarantees, else removed at once)."""
    if ref.driver == "lvm_thin":
        return _lvm_thin(system, ref, remover)
    if ref.driver == "file-reflink":
        return _file_image(system, ref, reflink=True)
    if ref.driver == "file":
        if ref.vm_state != "Halted":
            raise BackupError(
                f"cannot back up {ref.vm}: volume '{ref.volume}' is in pool '{ref.pool}' (driver file), which "
                f"can only be read while the VM is halted (it is {ref.vm_state}); shut it down first"
            )
        return _file_image(system, ref, reflink=False)
    raise BackupError(
        f"cannot back up {ref.vm}: volume '{ref.volume}' is in pool '{ref.pool}' with driver "
        f"'{ref.driver or 'unknown'}', which cannot be read (supported: lvm_thin, file-reflink, file)"
    )


# ------------------------------------------------------------------------------------------------ lvm


def _lv_path(vid: str, ref: VolumeRef) -> tuple[str, str]:
    vg, sep, lv = vid.partition("/")
    if not sep or not _LV_PART_RE.match(vg) or not _LV_PART_RE.match(lv) or lv.startswith("-"):
        raise BackupError(f"cannot back up {ref.vm}: {ref.label} has an unexpected lvm vid {safe_text(vid)!r}")
    expected = ref.pool_info.get("volume_group")
    if expected and expected != vg:
        raise BackupError(f"cannot back up {ref.vm}: {ref.label} is not in volume group {expected}")
    return vg, lv


def _dev_identity(path: Path) -> Identity:
    """Who the committed LV is right now: its device (qubesd replaces it by a rename when a VM stops)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ("inactive",)
    except OSError as exc:
        raise BackupError(f"cannot stat {path}: {exc.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        return ("blk", st.st_rdev)
    return ("file", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def snapshot_name() -> str:
    return f"qbackup-{os.getpid()}-{secrets.token_hex(4)}-{next(_counter)}"


@contextlib.contextmanager
def _lvm_thin(system: System, ref: VolumeRef, remover: SnapshotRemover | None) -> Iterator[Committed]:
    vg, origin = _lv_path(ref.vid, ref)
    name = snapshot_name()
    origin_dev = system.dev_dir / vg / origin
    before = _dev_identity(origin_dev)
    run_lvm(
        system,
        ["lvcreate", "--setactivationskip=n", "--activate=y", "--snapshot", "--type=thin", "--permission=r",
         f"--addtag={SNAPSHOT_TAG}", f"--name={name}", "--", f"{vg}/{origin}"],
        f"cannot back up {ref.vm}: snapshot of {ref.label} ({vg}/{origin})",
    )  # fmt: skip
    try:
        after = _dev_identity(origin_dev)
        if before != after:
            raise BackupError(f"cannot back up {ref.vm}: {ref.label} changed while it was snapshotted; try again")
        fd = _open_snapshot(system.dev_dir / vg / name, ref)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            mapped = thinmap.provisioned(system, vg, name, size) if sparse.reads_as_block_device(fd) else None
            yield Committed(fd, size, ("lvm", vg, origin, after), mapped)
        finally:
            os.close(fd)
    finally:
        if remover is not None:
            remover.add(vg, name)
        else:
            _remove_snapshots(system, [f"{vg}/{name}"])


def _open_snapshot(path: Path, ref: VolumeRef) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise BackupError(f"cannot back up {ref.vm}: cannot open the snapshot {path} of {ref.label}: "
                          f"{exc.strerror}") from None  # fmt: skip


def _remove_snapshots(system: System, names: list[str]) -> None:
    """``lvremove -f VG/A VG/B ...`` (one process); a failure while already failing is only a warning."""
    what = f"cannot remove the backup snapshot{'s' if len(names) > 1 else ''} {', '.join(names)}"
    try:
        run_lvm(system, ["lvremove", "-f", *names], what)
    except BackupError as exc:
        if sys.exc_info()[0] is not None:  # already failing: keep that error, report this one
            print(f"warning: {exc} (the next backup removes it)", file=sys.stderr)
            return
        raise


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftover_snapshots(system: System) -> list[str]:
    """Remove our snapshots (tagged, named ``qbackup-PID-...``) whose backup process is gone."""
    out = run_lvm(
        system, ["lvs", "--noheadings", "--separator=|", "-o", "vg_name,lv_name,lv_tags"],
        "cannot list logical volumes (looking for leftover backup snapshots)",
    )  # fmt: skip
    removed: list[str] = []
    for line in out.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 3:
            raise BackupError(f"lvm lvs: unexpected output line {safe_text(line)!r}")
        vg, lv, tags = parts
        m = SNAPSHOT_RE.match(lv)
        if m is None or SNAPSHOT_TAG not in tags.split(",") or not _LV_PART_RE.match(vg):
            continue
        if _pid_alive(int(m.group(1))):
            continue
        removed.append(f"{vg}/{lv}")
    if removed:  # all in one lvm process
        run_lvm(system, ["lvremove", "-f", *removed], f"cannot remove the leftover snapshots {', '.join(removed)}")
    return removed


# ------------------------------------------------------------------------------------------ file pools


def image_path(system: System, ref: VolumeRef) -> Path:
    """The clean image ``DIR_PATH/VID.img`` (as a dom0 path, mapped in simulation)."""
    dir_path = ref.pool_info.get("dir_path", "")
    if not dir_path.startswith("/"):
        raise BackupError(f"cannot back up {ref.vm}: pool '{ref.pool}' has no absolute dir_path")
    try:
        rel = _check_vid(ref.vid)
    except QubesXmlError as exc:
        raise BackupError(f"cannot back up {ref.vm}: {ref.label}: {exc}") from None
    return system.dom0_path(dir_path) / rel.parent / f"{rel.name}.img"


def _reflink_clone(src_fd: int, directory: Path) -> int | None:
    """An anonymous reflink copy of ``src_fd`` in ``directory`` (same filesystem), or None if impossible."""
    try:
        tmp = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        fcntl.ioctl(tmp, FICLONE, src_fd)
    except OSError:  # EOPNOTSUPP, EXDEV, EINVAL...: not a reflink filesystem; read the image itself
        os.close(tmp)
        return None
    return tmp


@contextlib.contextmanager
def _file_image(system: System, ref: VolumeRef, reflink: bool) -> Iterator[Committed]:
    path = image_path(system, ref)
    try:
        src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise BackupError(f"cannot back up {ref.vm}: cannot open {path} ({ref.label}): {exc.strerror}") from None
    clone: int | None = None
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise BackupError(f"cannot back up {ref.vm}: {path} is not a regular file")
        identity: Identity = ("file", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if reflink:
            clone = _reflink_clone(src, path.parent)
        fd = src if clone is None else clone
        yield Committed(fd, st.st_size, identity)
    finally:
        if clone is not None:
            os.close(clone)
        os.close(src)
