"""Simulated LVM logical volumes on disk, shared by the ``lvm`` stand-in and the simulated qubesd.

An LV ``VG/LV`` is the regular (sparse) file ``DEVDIR/VG/LV``; its metadata (thin pool, origin, tags,
permission) is ``DEVDIR/VG/.lvm/LV.json``.  A snapshot is a reflink clone (FICLONE) of its origin or, where the
filesystem cannot clone, a hard link: sim LVs are never written in place -- an import, a VM's commit or
simgen's "running VM" data always make a new file and rename it over the LV -- so a hard link is as
consistent as a thin snapshot and just as instant.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_VG = "qubes_dom0"
DEFAULT_THIN_POOL = "vm-pool"
META_DIR = ".lvm"
FICLONE = 0x40049409  # _IOW(0x94, 9, int)
_NAME_RE = re.compile(r"^[A-Za-z0-9_+.][A-Za-z0-9_+.-]{0,126}$")


class LvError(Exception):
    """An LVM-style failure: ``message`` is what lvm would print, ``code`` its exit status."""

    def __init__(self, message: str, code: int = 5) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class LvInfo:
    vg: str
    name: str
    thin_pool: str = DEFAULT_THIN_POOL
    origin: str = ""
    tags: list[str] = field(default_factory=list)
    readonly: bool = False
    thin_id: int | None = None  # the thin device id in its pool (assigned when the LV is first written)
    active: bool = True  # lvchange --activate=n (sim LVs stay readable; only recorded)

    def to_json(self) -> dict[str, object]:
        return {"thin_pool": self.thin_pool, "origin": self.origin, "tags": self.tags, "readonly": self.readonly,
                "thin_id": self.thin_id, "active": self.active}  # fmt: skip


def check_name(name: str, what: str = "logical volume") -> str:
    if not _NAME_RE.match(name) or name in (".", "..") or name == META_DIR:
        raise LvError(f'  Invalid {what} name "{name}".', 3)
    return name


def split_vg_lv(spec: str) -> tuple[str, str]:
    """``VG/LV`` -> (VG, LV), both checked (they become file names)."""
    vg, sep, lv = spec.partition("/")
    if not sep or not vg or not lv:
        raise LvError(f'  Invalid logical volume path "{spec}" (expected VG/LV).', 3)
    return check_name(vg, "volume group"), check_name(lv)


class LvStore:
    """The LVs of all volume groups under one device directory (``DIR/dom0/dev``)."""

    def __init__(self, devdir: Path) -> None:
        self.devdir = Path(devdir)

    def path(self, vg: str, lv: str) -> Path:
        return self.devdir / check_name(vg, "volume group") / check_name(lv)

    def _meta(self, vg: str, lv: str) -> Path:
        return self.devdir / vg / META_DIR / f"{check_name(lv)}.json"

    def exists(self, vg: str, lv: str) -> bool:
        return self.path(vg, lv).is_file()

    def info(self, vg: str, lv: str) -> LvInfo:
        if not self.exists(vg, lv):
            raise LvError(f'  Failed to find logical volume "{vg}/{lv}"')
        try:
            raw = json.loads(self._meta(vg, lv).read_text())
        except (FileNotFoundError, ValueError):
            raw = {}
        thin_id = raw.get("thin_id")
        return LvInfo(vg, lv, str(raw.get("thin_pool", DEFAULT_THIN_POOL)), str(raw.get("origin", "")),
                      [str(t) for t in raw.get("tags", [])], bool(raw.get("readonly", False)),
                      thin_id if isinstance(thin_id, int) else None, bool(raw.get("active", True)))  # fmt: skip

    def _new_thin_id(self, vg: str) -> int:
        """One more than the largest thin device id in the volume group (ids stay unique across its pools; no
        counter file: an LV created and removed again leaves nothing behind).  Callers hold the VG lock."""
        top = 0
        for meta in (self.devdir / vg / META_DIR).glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                value = json.loads(meta.read_text()).get("thin_id")
                if isinstance(value, int):
                    top = max(top, value)
        return top + 1

    def write_meta(self, info: LvInfo) -> None:
        meta = self._meta(info.vg, info.name)
        meta.parent.mkdir(parents=True, exist_ok=True)
        if info.thin_id is None:
            info.thin_id = self._new_thin_id(info.vg)
        tmp = meta.with_name(f".{meta.name}.tmp")
        tmp.write_text(json.dumps(info.to_json(), sort_keys=True))
        os.replace(tmp, meta)

    def lock(self, vg: str) -> _VgLock:
        return _VgLock(self.devdir / check_name(vg, "volume group"))

    def create(self, vg: str, lv: str, size: int, *, thin_pool: str = DEFAULT_THIN_POOL,
               tags: tuple[str, ...] = ()) -> Path:  # fmt: skip
        """A new thin LV reading as zeros (a sparse file); refuses an existing name like lvcreate."""
        path = self.path(vg, lv)
        if path.exists():
            raise LvError(f'  Logical Volume "{lv}" already exists in volume group "{vg}"')
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        self.write_meta(LvInfo(vg, lv, thin_pool, "", list(tags), False))
        return path

    def snapshot(self, vg: str, origin: str, new: str, *, tags: tuple[str, ...] = (),
                 readonly: bool = False) -> Path:  # fmt: skip
        src_info = self.info(vg, origin)
        dst = self.path(vg, new)
        if dst.exists():
            raise LvError(f'  Logical Volume "{new}" already exists in volume group "{vg}"')
        clone_file(self.path(vg, origin), dst)
        self.write_meta(LvInfo(vg, new, src_info.thin_pool, origin, list(tags), readonly))
        return dst

    def remove(self, vg: str, lv: str) -> None:
        path = self.path(vg, lv)
        if not path.is_file():
            raise LvError(f'  Failed to find logical volume "{vg}/{lv}"')
        path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self._meta(vg, lv).unlink()

    def rename(self, vg: str, old: str, new: str, *, replace: bool = False) -> None:
        """Rename an LV (``replace``: over an existing one, as qubesd's commit does in two lvm steps)."""
        src, dst = self.path(vg, old), self.path(vg, new)
        if not src.is_file():
            raise LvError(f'  Failed to find logical volume "{vg}/{old}"')
        if dst.exists() and not replace:
            raise LvError(f'  Logical Volume "{new}" already exists in volume group "{vg}"')
        info = self.info(vg, old)
        info.name = new
        self.write_meta(info)
        os.replace(src, dst)
        with contextlib.suppress(FileNotFoundError):
            self._meta(vg, old).unlink()

    def vgs(self) -> list[str]:
        if not self.devdir.is_dir():
            return []
        return sorted(p.name for p in self.devdir.iterdir() if p.is_dir() and (p / META_DIR).is_dir())

    def lvs(self, vg: str | None = None) -> list[LvInfo]:
        out = []
        for g in [check_name(vg, "volume group")] if vg else self.vgs():
            d = self.devdir / g
            if vg and not (d / META_DIR).is_dir():
                raise LvError(f'  Volume group "{g}" not found', 5)
            for p in sorted(d.iterdir()):
                if p.is_file() and not p.name.startswith("."):
                    out.append(self.info(g, p.name))
        return out

    def init_vg(self, vg: str) -> None:
        (self.devdir / check_name(vg, "volume group") / META_DIR).mkdir(parents=True, exist_ok=True)


class _VgLock:
    """An exclusive flock on a volume group (qubesd and lvm commands change the same directory)."""

    def __init__(self, vgdir: Path) -> None:
        self.vgdir = vgdir
        self.fd = -1

    def __enter__(self) -> _VgLock:
        (self.vgdir / META_DIR).mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.vgdir / META_DIR / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def clone_file(src: Path, dst: Path) -> None:
    """``dst`` = instant copy of ``src``: reflink where the filesystem can, else a hard link (see module doc)."""
    sfd = os.open(src, os.O_RDONLY)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660)
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
        except OSError:
            os.close(dfd)
            dfd = -1
            os.unlink(dst)
            os.link(src, dst)
        finally:
            if dfd >= 0:
                os.close(dfd)
    finally:
        os.close(sfd)


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the data ranges of ``fd`` below ``size``, as SEEK_DATA / SEEK_HOLE give them."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        pos = end
    return out


def reflink_or_copy(src: Path, dst: Path) -> None:
    """A file copy that is independent of ``src`` (reflink, else a sparse copy): for files written later."""
    sfd = os.open(src, os.O_RDONLY)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660)
        try:
            try:
                fcntl.ioctl(dfd, FICLONE, sfd)
                return
            except OSError:
                pass
            size = os.fstat(sfd).st_size
            for start, end in data_ranges(sfd, size):
                pos = start
                while pos < end:
                    n = os.copy_file_range(sfd, dfd, end - pos, pos, pos)
                    if n <= 0:
                        break
                    pos += n
            os.ftruncate(dfd, size)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
