"""Base copies of file-reflink volumes for change tracking (docs/CHANGE-TRACKING.md section 6).

A base is a reflink copy (FICLONE: no data copied, extents shared) of what the last successful repository backup
read of ``DIR/VID.img``, kept in the pool's own filesystem under ``DIR/.qubes-backup-bases/`` (never beside
Qubes' images, never one of them):

- ``next-PID/KEY.img``: the copy a running backup reads (KEY = the vid with ``/`` as ``%``); removed at the next
  start when PID is gone, and when its run fails;
- ``REPO-ID/KEY.img`` + ``REPO-ID/KEY.json`` (``{"root", "bs", "vm", "size"}``): a promoted base.  The JSON is
  written only after its image is in place and removed before the image is touched, so a JSON always describes
  its image; an image without JSON is not a base (removed at start).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

BASES_DIR = ".qubes-backup-bases"
FICLONE = 0x40049409
POOL_LIMIT = 90.0  # percent of the filesystem in use above which no base is kept
_REPO = re.compile(r"[0-9a-f]{32}")
_NEXT = re.compile(r"next-([0-9]{1,10})")
_KEY = re.compile(r"[A-Za-z0-9_.%+-]{1,255}")
MAX_META = 4096


@dataclass(frozen=True)
class Base:
    image: Path
    root: str
    block_size: int
    vm: str | None
    size: int


def key(vid: str) -> str:
    return vid.replace("/", "%")


def bases_dir(pool_dir: Path) -> Path:
    return pool_dir / BASES_DIR


def load(pool_dir: Path, repo_id: str, vid: str) -> Base | None:
    """The promoted base of ``vid`` for repository ``repo_id``, or None (absent, damaged: no base)."""
    d = bases_dir(pool_dir) / repo_id
    try:
        with open(d / f"{key(vid)}.json", "rb") as f:
            doc = json.loads(f.read(MAX_META + 1)[:MAX_META])
        base = Base(d / f"{key(vid)}.img", str(doc["root"]), int(doc["bs"]),
                    None if doc["vm"] is None else str(doc["vm"]), int(doc["size"]))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return base if base.image.is_file() else None


def clone_next(pool_dir: Path, vid: str, src_fd: int) -> tuple[Path, int] | None:
    """A reflink copy of ``src_fd`` at ``next-PID/KEY.img`` (read-only) and an fd of it, or None (no reflink)."""
    d = bases_dir(pool_dir) / f"next-{os.getpid()}"
    path = d / f"{key(vid)}.img"
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
    except OSError:
        return None
    try:
        fcntl.ioctl(fd, FICLONE, src_fd)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        return None
    return path, fd


def promote(pool_dir: Path, repo_id: str, vid: str, image: Path, base: Base) -> None:
    """``image`` (a next copy) becomes the base of ``vid``: old JSON removed, image renamed, then new JSON."""
    d = bases_dir(pool_dir) / repo_id
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    meta = d / f"{key(vid)}.json"
    meta.unlink(missing_ok=True)
    os.replace(image, d / f"{key(vid)}.img")
    tmp = d / f".{key(vid)}.json.tmp"
    tmp.write_text(json.dumps({"root": base.root, "bs": base.block_size, "vm": base.vm, "size": base.size}))
    os.replace(tmp, meta)


def remove_next(image: Path) -> None:
    with contextlib.suppress(OSError):
        image.unlink()
    with contextlib.suppress(OSError):
        image.parent.rmdir()  # when it was the last


def usage(pool_dir: Path) -> float | None:
    try:
        st = os.statvfs(pool_dir)
    except OSError:
        return None
    return 100.0 * (1 - st.f_bavail / st.f_blocks) if st.f_blocks else None


def cleanup(pool_dir: Path, alive: object, keep_all: bool = True) -> list[str]:
    """Remove copies of killed runs (``next-PID`` of a dead PID), images without JSON, and bases whose volume
    image is gone (the VM was removed); with ``keep_all`` False, every base.  Returns what was removed."""
    root = bases_dir(pool_dir)
    removed: list[str] = []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return removed
    for d in entries:
        m = _NEXT.fullmatch(d.name)
        if m is not None:
            if not alive(int(m.group(1))):  # type: ignore[operator]
                shutil.rmtree(d, ignore_errors=True)
                removed.append(str(d))
            continue
        if not _REPO.fullmatch(d.name) or not d.is_dir():
            continue
        for img in sorted(d.glob("*.img")):
            k = img.name[: -len(".img")]
            vid = k.replace("%", "/")
            orphan = not (d / f"{k}.json").is_file() or not (pool_dir / f"{vid}.img").is_file()
            if _KEY.fullmatch(k) and (orphan or not keep_all):
                (d / f"{k}.json").unlink(missing_ok=True)
                img.unlink(missing_ok=True)
                removed.append(str(img))
        if not keep_all:  # --release-bases: the repository's directory too, once empty
            with contextlib.suppress(OSError):
                d.rmdir()
    if not keep_all:
        with contextlib.suppress(OSError):
            root.rmdir()
    return removed
