"""Volumes of the simulated pools, as qubesd's storage drivers manage them.

- ``lvm_thin``: vid ``VG/vm-NAME-VOL``; the committed LV is that one; a running VM's ``save_on_stop`` volume
  is ``vm-NAME-VOL-snap`` (a snapshot made at start, renamed over the LV at shutdown, the old one kept as
  ``vm-NAME-VOL-TIMESTAMP-back`` up to ``revisions_to_keep``); imports go to a fresh ``vm-NAME-VOL-import``.
- ``file-reflink``: ``{dir_path}/{vid}.img``; a running VM writes ``{vid}-dirty.img``; imports go to
  ``{vid}-import.img``.
- ``file``: ``{dir_path}/{vid}.img``, imports as for file-reflink.
- ``linux-kernel``: read-only ``{dir_path}/{vid}/modules.img``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path, PurePosixPath

from lxml import etree
from qubes_backup_dom0.qubes.qubesxml import Collection, Domain, Volume

from .exc import ApiError
from .lvstore import LvError, LvStore, clone_file
from .store import Store

GiB = 1024**3
PRIVATE_SIZE = 2 * GiB
ROOT_SIZE = 10 * GiB
VOLATILE_SIZE = 10 * GiB
FILE_DRIVERS = ("file", "file-reflink")


def _sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o660)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def mapper_name(vg: str, lv: str) -> str:
    """``/dev/mapper`` name of an LV: dashes doubled, VG and LV joined by one dash."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


class Storage:
    def __init__(self, store: Store, host_paths: bool = False) -> None:
        self.store = store
        self.host_paths = host_paths
        self.lvs = LvStore(store.devdir)

    @property
    def coll(self) -> Collection:
        return self.store.coll

    # -- pools ---------------------------------------------------------------------------------------------
    def pool(self, name: str) -> dict[str, str]:
        pool = self.coll.pools.get(name)
        if pool is None:
            raise ApiError("QubesException", f"No such pool: {name!r}")
        return pool

    def _dom0_dir(self, pool: dict[str, str]) -> PurePosixPath:
        p = PurePosixPath(pool.get("dir_path") or "/var/lib/qubes")
        if not p.is_absolute() or ".." in p.parts:
            raise ApiError("QubesException", f"pool {pool.get('name')!r}: bad dir_path")
        return p

    def shown(self, dom0_path: PurePosixPath | str) -> str:
        """A dom0 path as reported to clients (host path with --host-paths)."""
        return str(self.store.host(dom0_path)) if self.host_paths else str(dom0_path)

    def pool_info(self, name: str) -> dict[str, str]:
        pool = self.pool(name)
        info = {k: v for k, v in pool.items() if k != "name"}
        if "dir_path" in info:
            info["dir_path"] = self.shown(self._dom0_dir(pool))
        st = os.statvfs(self.store.dom0)
        info["size"] = str(st.f_blocks * st.f_frsize)
        usage = 0
        for dom in self.coll.domains:
            for vol in dom.volumes:
                if vol.pool == name:
                    with contextlib.suppress(ApiError, OSError, ValueError):
                        usage += self.data_path(dom, vol).stat().st_blocks * 512
        info["usage"] = str(usage)
        return info

    # -- paths ---------------------------------------------------------------------------------------------
    def lv_of(self, vol: Volume) -> tuple[str, str]:
        vg, sep, lv = vol.vid.partition("/")
        if not sep or "/" in lv:
            raise ApiError("QubesException", f"bad lvm volume id {vol.vid!r}")
        return vg, lv

    def img(self, vol: Volume, suffix: str = "", vid: str | None = None) -> Path:
        """Host path of a file-pool image (``suffix`` '-dirty' / '-import')."""
        dom0 = self._dom0_dir(self.pool(vol.pool)) / f"{vid or vol.vid}{suffix}.img"
        if ".." in dom0.parts:
            raise ApiError("QubesException", f"bad volume id {vol.vid!r}")
        return self.store.host(dom0)

    def driver(self, vol: Volume) -> str:
        return self.pool(vol.pool).get("driver", "")

    def data_path(self, dom: Domain, vol: Volume) -> Path:
        """Host path of the committed data (for usage figures)."""
        drv = self.driver(vol)
        if drv == "lvm_thin":
            return self.lvs.path(*self.lv_of(vol))
        if drv in FILE_DRIVERS:
            return self.img(vol)
        raise ValueError(drv)

    def info_path(self, dom: Domain, vol: Volume) -> str:
        """What qubesd reports as ``path``: not necessarily the data to read (see module doc)."""
        drv = self.driver(vol)
        if drv == "lvm_thin":
            return self.shown(f"/dev/mapper/{mapper_name(*self.lv_of(vol))}")
        if not vol.vid:
            return ""
        base = self._dom0_dir(self.pool(vol.pool)) / vol.vid
        if drv == "file-reflink":
            return self.shown(f"{base}-dirty.img")
        if drv == "linux-kernel":
            return self.shown(base / "modules.img")
        return self.shown(f"{base}.img")

    def volume_info(self, dom: Domain, vol: Volume) -> str:
        try:
            usage = self.data_path(dom, vol).stat().st_blocks * 512
        except (OSError, ValueError, LvError):
            usage = 0
        attrs = vol.attrib
        fields = [
            ("pool", vol.pool), ("vid", vol.vid), ("size", str(vol.size or 0)), ("usage", str(usage)),
            ("rw", str(vol.rw)), ("source", vol.source or ""), ("path", self.info_path(dom, vol)),
            ("save_on_stop", str(vol.save_on_stop)), ("snap_on_start", str(vol.snap_on_start)),
            ("revisions_to_keep", attrs.get("revisions_to_keep", "0")), ("ephemeral", "False"),
            ("is_outdated", "False"),
        ]  # fmt: skip
        return "".join(f"{k}={v}\n" for k, v in fields)

    # -- create / remove ----------------------------------------------------------------------------------
    def vid_for(self, pool: str, name: str, klass: str, vol: str) -> str:
        drv = self.pool(pool).get("driver")
        if drv == "lvm_thin":
            return f"{self.pool(pool).get('volume_group', 'qubes_dom0')}/vm-{name}-{vol}"
        return f"{Collection.default_vm_dir(name, klass)}/{vol}"

    def volume_config(self, name: str, klass: str, template: Domain | None,
                      pools: dict[str, str]) -> list[dict[str, str]]:  # fmt: skip
        """The volume-config qubesd gives a new VM (pools: volume name -> pool)."""

        def tvol(dom: Domain | None, vname: str) -> Volume | None:
            return dom.volume(vname) if dom is not None else None

        def rev(pool: str) -> str:
            return self.pool(pool).get("revisions_to_keep", "1")

        troot = tvol(template, "root")
        if klass == "DispVM" and template is not None:
            troot = tvol(self.coll.get(template.template or "") or None, "root") or troot
        vols: list[dict[str, str]] = []
        if klass in ("AppVM", "DispVM"):
            if troot is None:
                raise ApiError("QubesException", f"template of {name!r} has no root volume")
            vols.append({"name": "root", "pool": troot.pool, "revisions_to_keep": "0", "snap_on_start": "True",
                         "size": str(troot.size or ROOT_SIZE), "source": troot.vid,
                         "vid": self.vid_for(troot.pool, name, klass, "root")})  # fmt: skip
        else:
            size = troot.size if troot is not None and troot.size else ROOT_SIZE
            vols.append({"name": "root", "pool": pools["root"], "revisions_to_keep": rev(pools["root"]), "rw": "True",
                         "save_on_stop": "True", "size": str(size),
                         "vid": self.vid_for(pools["root"], name, klass, "root")})  # fmt: skip
        tpriv = tvol(template, "private")
        if klass == "DispVM" and tpriv is not None:
            vols.append({"name": "private", "pool": tpriv.pool, "revisions_to_keep": "0", "rw": "True",
                         "snap_on_start": "True", "size": str(tpriv.size or PRIVATE_SIZE), "source": tpriv.vid,
                         "vid": self.vid_for(tpriv.pool, name, klass, "private")})  # fmt: skip
        else:
            vols.append({"name": "private", "pool": pools["private"], "revisions_to_keep": rev(pools["private"]),
                         "rw": "True", "save_on_stop": "True", "size": str(PRIVATE_SIZE),
                         "vid": self.vid_for(pools["private"], name, klass, "private")})  # fmt: skip
        vols.append({"name": "volatile", "pool": pools["volatile"], "revisions_to_keep": "0", "rw": "True",
                     "size": str(VOLATILE_SIZE),
                     "vid": self.vid_for(pools["volatile"], name, klass, "volatile")})  # fmt: skip
        return vols

    def create_data(self, dom: Domain, template: Domain | None) -> None:
        """Make the data of a new VM's own save_on_stop volumes (empty, or a clone of the template's root)."""
        for vol in dom.volumes:
            if not vol.save_on_stop:
                continue
            src = template.volume(vol.name) if template is not None and vol.name == "root" else None
            drv = self.driver(vol)
            if drv == "lvm_thin":
                vg, lv = self.lv_of(vol)
                with self.lvs.lock(vg):
                    if src is not None and self.driver(src) == "lvm_thin":
                        self.lvs.snapshot(vg, self.lv_of(src)[1], lv)
                    else:
                        self.lvs.create(vg, lv, vol.size or 0, thin_pool=self.pool(vol.pool).get("thin_pool", ""))
            elif drv in FILE_DRIVERS:
                path = self.img(vol)
                if src is not None and self.driver(src) in FILE_DRIVERS:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    clone_file(self.img(src), path)
                else:
                    _sparse(path, vol.size or 0)

    def _own_lvs(self, vol: Volume) -> list[tuple[str, str]]:
        vg, lv = self.lv_of(vol)
        pat = re.compile(rf"^{re.escape(lv)}(-snap|-import|-[0-9]+-back)?$")
        return [(i.vg, i.name) for i in self.lvs.lvs() if i.vg == vg and pat.match(i.name)]

    def remove_data(self, dom: Domain) -> None:
        """Delete a removed VM's volumes and its directories."""
        dirs = {Collection.default_vm_dir(dom.name, dom.klass)}
        for vol in dom.volumes:
            drv = self.pool(vol.pool).get("driver") if vol.pool in self.coll.pools else None
            if drv == "lvm_thin" and vol.vid:
                for vg, lv in self._own_lvs(vol):
                    with self.lvs.lock(vg):
                        self.lvs.remove(vg, lv)
            elif drv in FILE_DRIVERS and vol.vid:
                for suffix in ("", "-dirty", "-import"):
                    with contextlib.suppress(FileNotFoundError):
                        self.img(vol, suffix).unlink()
                dirs.add(str(PurePosixPath(vol.vid).parent))
        for d in dirs:
            path = self.store.dom0 / "var/lib/qubes" / d
            if len(PurePosixPath(d).parts) == 2 and path.is_dir():
                shutil.rmtree(path)

    # -- start / shutdown ---------------------------------------------------------------------------------
    def start(self, dom: Domain) -> None:
        for vol in dom.volumes:
            if not (vol.save_on_stop or vol.snap_on_start):
                continue
            drv = self.driver(vol)
            if drv == "lvm_thin":
                vg, lv = self.lv_of(vol)
                origin = lv if vol.save_on_stop else self.lv_of(_source(vol))[1]
                with self.lvs.lock(vg):
                    if self.lvs.exists(vg, f"{lv}-snap"):
                        self.lvs.remove(vg, f"{lv}-snap")
                    self.lvs.snapshot(vg, origin, f"{lv}-snap")
            elif drv == "file-reflink":
                src = self.img(vol) if vol.save_on_stop else self.img(vol, vid=_source(vol).vid)
                dirty = self.img(vol, "-dirty")
                with contextlib.suppress(FileNotFoundError):
                    dirty.unlink()
                dirty.parent.mkdir(parents=True, exist_ok=True)
                clone_file(src, dirty)

    def shutdown(self, dom: Domain) -> None:
        for vol in dom.volumes:
            if not (vol.save_on_stop or vol.snap_on_start):
                continue
            drv = self.driver(vol)
            if drv == "lvm_thin":
                vg, lv = self.lv_of(vol)
                if not self.lvs.exists(vg, f"{lv}-snap"):
                    continue
                with self.lvs.lock(vg):
                    if vol.save_on_stop:
                        self._replace_lv(vol, vg, lv, f"{lv}-snap")
                    else:
                        self.lvs.remove(vg, f"{lv}-snap")
            elif drv == "file-reflink":
                dirty = self.img(vol, "-dirty")
                if vol.save_on_stop and dirty.exists():
                    os.replace(dirty, self.img(vol))
                else:
                    with contextlib.suppress(FileNotFoundError):
                        dirty.unlink()

    def _replace_lv(self, vol: Volume, vg: str, lv: str, new: str) -> None:
        """Commit ``new`` as the volume ``lv``: the old one becomes a -back revision or is dropped."""
        keep = int(vol.attrib.get("revisions_to_keep", "0") or 0)
        if self.lvs.exists(vg, lv):
            if keep > 0:
                back = f"{lv}-{int(time.time() * 1000)}-back"
                self.lvs.rename(vg, lv, back)
            else:
                self.lvs.remove(vg, lv)
        self.lvs.rename(vg, new, lv)
        backs = sorted(n for v, n in self._own_lvs(vol) if n.endswith("-back"))
        for name in backs[: max(0, len(backs) - keep)]:
            self.lvs.remove(vg, name)

    # -- import -------------------------------------------------------------------------------------------
    def import_begin(self, dom: Domain, vol: Volume, size: int) -> Path:
        drv = self.driver(vol)
        if drv == "lvm_thin":
            vg, lv = self.lv_of(vol)
            with self.lvs.lock(vg):
                if self.lvs.exists(vg, f"{lv}-import"):
                    self.lvs.remove(vg, f"{lv}-import")
                return self.lvs.create(vg, f"{lv}-import", size, thin_pool=self.pool(vol.pool).get("thin_pool", ""))
        if drv in FILE_DRIVERS:
            path = self.img(vol, "-import")
            _sparse(path, size)
            return path
        raise ApiError("QubesException", f"volume {vol.name!r} of {dom.name!r}: pool {vol.pool!r} cannot import")

    def import_end(self, dom: Domain, vol: Volume, ok: bool) -> None:
        drv = self.driver(vol)
        if drv == "lvm_thin":
            vg, lv = self.lv_of(vol)
            with self.lvs.lock(vg):
                if not self.lvs.exists(vg, f"{lv}-import"):
                    raise ApiError("QubesException", f"no import in progress for {dom.name}:{vol.name}")
                size = self.lvs.path(vg, f"{lv}-import").stat().st_size
                if ok:
                    self._replace_lv(vol, vg, lv, f"{lv}-import")
                else:
                    self.lvs.remove(vg, f"{lv}-import")
        else:
            path = self.img(vol, "-import")
            if not path.exists():
                raise ApiError("QubesException", f"no import in progress for {dom.name}:{vol.name}")
            size = path.stat().st_size
            if ok:
                os.replace(path, self.img(vol))
            else:
                path.unlink()
        if ok:
            set_volume_attr(dom, vol.name, "size", str(size))


def _source(vol: Volume) -> Volume:
    if not vol.source:
        raise ApiError("QubesException", f"volume {vol.name!r} has no source")
    return Volume(vol.name, vol.pool, vol.source, vol.size, True, False, True, None, {})


def set_volume_attr(dom: Domain, vname: str, key: str, value: str) -> None:
    vc = dom.element.find("volume-config")
    for el in [] if vc is None else vc.findall("volume"):
        if el.get("name") == vname:
            el.set(key, value)


def write_volume_config(dom: Domain, vols: list[dict[str, str]], kernel: str | None) -> None:
    vc = dom.element.find("volume-config")
    if vc is None:
        vc = etree.SubElement(dom.element, "volume-config")
    for v in vols:
        etree.SubElement(vc, "volume", attrib=v)
    etree.SubElement(vc, "volume", name="kernel", pool="linux-kernel", revisions_to_keep="0", vid=kernel or "")
