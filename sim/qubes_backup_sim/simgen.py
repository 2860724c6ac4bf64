"""Build a realistic simulated Qubes system in a directory (``qubes-backup-simgen DIR``).

The simulation is what tests, the demo and the benchmarks back up and restore, so it has what makes real
systems hard: multi-GiB sparse images with scattered data (random and compressible), images ending in data
and in a hole, VMs whose template/netvm/default_dispvm come from the global defaults or are explicitly None,
a StandaloneVM, a DispVM, and a backup VM.  Everything is deterministic from ``--seed``.

Layout (see docs/SIMULATION.md): dom0's root is ``DIR/dom0`` (Qubes root ``DIR/dom0/var/lib/qubes``, home
``DIR/dom0/home/user``), VM NAME's root is ``DIR/vms/NAME``.  Pools (``--pool``): ``lvm_thin`` (a fresh R4.2
install: pool ``lvm`` on VG qubes_dom0, LVs are files under ``DIR/dom0/dev/qubes_dom0``, plus ``varlibqubes``
as a ``file`` pool; the default, of ``generate()`` and of the command line), ``file-reflink`` (a btrfs install:
``varlibqubes``), or ``file`` (legacy; what this generator made before it knew pools).  ``--running VM`` marks
a VM as running: its save_on_stop volumes then have diverging -snap LVs / -dirty images.  ``--release``
(4.3, the default, or 4.2): the Qubes release whose qubesd the simulated one is (``DIR/dom0/etc/qubes-release``).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import struct
import sys
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lxml import etree
from qubes_backup_dom0.qubes.qubesxml import Collection

from . import endpoints, policy
from .lvstore import DEFAULT_THIN_POOL, DEFAULT_VG, LvInfo, LvStore, clone_file
from .release import DEFAULT as DEFAULT_RELEASE
from .release import RELEASES, write_release
from .release import check as check_release
from .store import save_run_state, write_atomic

BLOCK = 4096
MiB = 1024 * 1024
GiB = 1024 * MiB
KERNEL = "6.6.48-1"
FILE_POOL = "varlibqubes"
LVM_POOL = "lvm"
POOL_KINDS = ("lvm_thin", "file-reflink", "file")
USER = "user"

LABELS = [
    ("red", "0xcc0000"),
    ("orange", "0xf57900"),
    ("yellow", "0xedd400"),
    ("green", "0x73d216"),
    ("gray", "0x555753"),
    ("blue", "0x3465a4"),
    ("purple", "0x75507b"),
    ("black", "0x000000"),
]


@dataclass(frozen=True)
class VmSpec:
    """One simulated VM; sizes are (apparent, data) bytes at DEFAULT scale; None = no such image."""

    name: str
    klass: str
    label: str
    props: tuple[tuple[str, str], ...] = ()
    private: tuple[int, int] | None = (2 * GiB, 8 * MiB)
    root: tuple[int, int] | None = None  # own root.img (templates, standalone)
    features: tuple[tuple[str, str], ...] = ()
    pci: str | None = None
    #: a block device assignment: (backend VM, port, options), as R4.2's qubesd stores one (read-only made yes/no)
    block: tuple[str, str, tuple[tuple[str, str], ...]] | None = None


# Order matters only for qids and readability.  Absent template/netvm mean "global default".
VMS: tuple[VmSpec, ...] = (
    VmSpec("fedora-41", "TemplateVM", "black", private=(2 * GiB, 1 * MiB), root=(10 * GiB, 40 * MiB),
           features=(("qrexec", "1"), ("gui", "1"), ("os", "Linux"))),
    VmSpec("debian-12", "TemplateVM", "black", private=(2 * GiB, 512 * 1024), root=(10 * GiB, 24 * MiB),
           features=(("qrexec", "1"), ("gui", "1"))),
    VmSpec("sys-net", "AppVM", "red", (("netvm", ""), ("provides_network", "True"), ("virt_mode", "hvm"),
                                       ("autostart", "True")),
           private=(2 * GiB, 3 * MiB), features=(("service.clocksync", "1"),), pci="00_14.3"),
    VmSpec("sys-firewall", "AppVM", "green", (("netvm", "sys-net"), ("provides_network", "True"),
                                              ("autostart", "True"), ("memory", "500")),
           private=(2 * GiB, 2 * MiB)),
    VmSpec("fedora-41-dvm", "AppVM", "red", (("template_for_dispvms", "True"),),
           private=(2 * GiB, 2 * MiB), features=(("appmenus-dispvm", "1"),)),
    VmSpec("work", "AppVM", "blue", (("memory", "800"), ("maxmem", "4000")), private=(2 * GiB, 14 * MiB),
           features=(("service.meminfo-writer", "1"),),
           block=("dom0", "loop7", (("frontend-dev", "xvdi"), ("read-only", "yes")))),
    VmSpec("personal", "AppVM", "yellow", (("template", "debian-12"), ("netvm", "sys-firewall")),
           private=(2 * GiB, 10 * MiB)),
    VmSpec("vault", "AppVM", "black", (("netvm", ""), ("virt_mode", "pv")), private=(2 * GiB, 5 * MiB)),
    VmSpec("untrusted", "AppVM", "red", (("default_dispvm", "fedora-41-dvm"),), private=(2 * GiB, 9 * MiB)),
    VmSpec("legacy-hvm", "StandaloneVM", "purple", (("virt_mode", "hvm"), ("kernel", ""), ("maxmem", "4000")),
           private=(2 * GiB, 4 * MiB), root=(10 * GiB, 24 * MiB)),
    VmSpec("disp1234", "DispVM", "red", (("template", "fedora-41-dvm"), ("include_in_backups", "False"),
                                         ("auto_cleanup", "True")), private=None),
    VmSpec("backupvm", "AppVM", "purple", (("include_in_backups", "False"), ("netvm", "sys-firewall")),
           private=(2 * GiB, 2 * MiB)),
)  # fmt: skip

GLOBAL_PROPS = (
    ("clockvm", "sys-net"),
    ("default_dispvm", "fedora-41-dvm"),
    ("default_kernel", KERNEL),
    ("default_netvm", "sys-firewall"),
    ("default_template", "fedora-41"),
    ("updatevm", "sys-firewall"),
)

# Scales: (apparent divisor, data divisor) applied to DEFAULT sizes; BENCH scales to totals instead.
# The default scale halves the apparent sizes (a restore pushes a volume's whole apparent size through the
# import pipe, holes as zeros), keeping the data amounts.
SCALES = {"small": (128, 40), "default": (2, 1)}
BENCH_DATA_MIB = 1800
BENCH_APPARENT_GIB = 7.0

_WORD_TEXT = (
    "qubes dom0 template private volume backup restore firewall network kernel xen domain disposable "
    "the of and to in is that for it as with was on be by at this from or have an they which one you "
    "config user home files documents mail password invoice report draft meeting notes project"
)
WORDS = _WORD_TEXT.split()


@dataclass
class Image:
    """One image file to write: path relative to the Qubes root, apparent and data bytes."""

    rel: str
    apparent: int
    data: int
    ends_in_data: bool = False
    data_at_start: bool = False


def _align(n: int, unit: int = BLOCK) -> int:
    return n // unit * unit


def _text_pool(rng: random.Random, size: int = 256 * 1024) -> bytes:
    """Text-like bytes (log/config-ish lines) that compress several-fold, made once per image."""
    out: list[str] = []
    n = 0
    while n < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
        line = f"{rng.randint(0, 99999):05d} {line}\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def _compressible(rng: random.Random, pool: bytes, length: int) -> bytes:
    """Slices of the text pool interleaved with hex noise: compresses roughly 3-6x, like logs or documents,
    rather than collapsing to nothing (which would flatter compressor throughput in benchmarks)."""
    parts = []
    n = 0
    while n < length:
        off = rng.randrange(0, len(pool) - BLOCK)
        parts.append(pool[off : off + rng.randint(1, 4) * 256])
        parts.append(rng.randbytes(rng.randint(16, 96)).hex().encode())
        n += len(parts[-1]) + len(parts[-2])
    return b"".join(parts)[:length]


def write_sparse_image(path: Path, img: Image, rng: random.Random, compressible: float = 0.5) -> None:
    """Write scattered 4 KiB-aligned extents with pwrite and ftruncate the rest, so holes stay holes.

    The last ~15% of every image is a hole unless ``ends_in_data``; extents never overlap.
    """
    apparent = _align(img.apparent, BLOCK)
    data = min(_align(img.data, BLOCK), _align(apparent * 85 // 100))
    usable = apparent if img.ends_in_data else _align(apparent * 85 // 100)
    max_len = max(BLOCK, min(_align(data // 12), 4 * MiB))
    lengths: list[int] = []
    left = data
    while left > 0:
        n = min(rng.randint(1, max_len // BLOCK) * BLOCK, left)
        lengths.append(n)
        left -= n
    gap_blocks = (usable - data) // BLOCK
    cuts = sorted(rng.randint(0, gap_blocks) for _ in range(len(lengths)))
    gaps = [b - a for a, b in zip([0, *cuts], [*cuts, gap_blocks], strict=True)]  # len(lengths)+1 gaps
    if img.data_at_start and lengths:
        gaps[1] += gaps[0]
        gaps[0] = 0
    if img.ends_in_data and lengths:
        gaps[-2] += gaps[-1]
        gaps[-1] = 0
    pool = _text_pool(rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o660)
    try:
        off = 0
        for gap, length in zip(gaps, lengths, strict=False):
            off += gap * BLOCK
            compress = rng.random() < compressible
            chunk = _compressible(rng, pool, length) if compress else rng.randbytes(length)
            os.pwrite(fd, chunk, off)
            off += length
        os.ftruncate(fd, apparent)
        # On disk before the image is used, as a real LV's or image's blocks are once written.  Left to the
        # kernel's writeback, the file system (ext4's delayed allocation) allocates the extent tree's blocks
        # whenever the data is flushed: st_blocks would grow by 4 KiB seconds later, in the middle of a test
        # that compares the system before and after (issue 19 item 10).
        os.fsync(fd)
    finally:
        os.close(fd)


def _png(color: str) -> bytes:
    """A 1x1 PNG in the label colour, like Qubes' per-VM icon.png (only a few bytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rgb = int(color, 16).to_bytes(3, "big")
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" + rgb))
        + chunk(b"IEND", b"")
    )


FIREWALL_XML = """<?xml version='1.0' encoding='UTF-8'?>
<firewall version="2">
  <rules>
    <rule>
      <properties>
        <property name="action">accept</property>
        <property name="dsthost">{host}</property>
      </properties>
    </rule>
    <rule>
      <properties>
        <property name="action">drop</property>
      </properties>
    </rule>
  </rules>
</firewall>
"""


def _vm_dir(spec: VmSpec) -> str:
    return Collection.default_vm_dir(spec.name, spec.klass)


def _vid(pool_kind: str, name: str, klass: str, vol: str) -> str:
    if pool_kind == "lvm_thin":
        return f"{DEFAULT_VG}/vm-{name}-{vol}"
    return f"{Collection.default_vm_dir(name, klass)}/{vol}"


def _spec(name: str) -> VmSpec:
    return next(s for s in VMS if s.name == name)


def _volumes(spec: VmSpec, sizes: dict[str, int], pool_kind: str = "file") -> list[dict[str, str]]:
    """The R4 volume-config of a VM of this class, in the default pool (file pools: the VM's directory)."""
    pool = LVM_POOL if pool_kind == "lvm_thin" else FILE_POOL

    def vid(name: str, vol: str) -> str:
        return _vid(pool_kind, name, _spec(name).klass, vol)

    tpl = dict(spec.props).get("template", "fedora-41")
    own_root = spec.root is not None
    root: dict[str, str] = {"name": "root", "pool": pool, "revisions_to_keep": "0",
                            "size": str(sizes.get("root", 10 * GiB)), "vid": vid(spec.name, "root")}  # fmt: skip
    if own_root:
        root.update(rw="True", save_on_stop="True", revisions_to_keep="1")
    elif spec.klass == "DispVM":
        # A DispVM's template is its dvm template (an AppVM); the root snapshot is that one's template's.
        root.update(snap_on_start="True", source=vid(_template_of(tpl), "root"))
    else:
        root.update(snap_on_start="True", source=vid(tpl, "root"))
    private: dict[str, str] = {"name": "private", "pool": pool, "revisions_to_keep": "1", "rw": "True",
                               "size": str(sizes.get("private", 2 * GiB)),
                               "vid": vid(spec.name, "private")}  # fmt: skip
    if spec.klass == "DispVM":
        private.update(snap_on_start="True", source=vid(tpl, "private"), revisions_to_keep="0")
    else:
        private["save_on_stop"] = "True"
    volatile = {"name": "volatile", "pool": pool, "revisions_to_keep": "0", "rw": "True",
                "size": str(10 * GiB), "vid": vid(spec.name, "volatile")}  # fmt: skip
    kernel = {"name": "kernel", "pool": "linux-kernel", "revisions_to_keep": "0",
              "vid": "" if dict(spec.props).get("kernel") == "" else KERNEL}  # fmt: skip
    return [root, private, volatile, kernel]


def _template_of(name: str) -> str:
    spec = next(s for s in VMS if s.name == name)
    return dict(spec.props).get("template", "fedora-41")


def _sizes(
    scale: str, data_mib: float | None, apparent_gib: float | None
) -> dict[tuple[str, str], tuple[int, int]]:
    """(vm, volume) -> (apparent, data) for the chosen scale."""
    base = {}
    for s in VMS:
        for vol, sz in (("private", s.private), ("root", s.root)):
            if sz is not None:
                base[(s.name, vol)] = sz
    if scale == "bench":
        data_mib = BENCH_DATA_MIB if data_mib is None else data_mib
        apparent_gib = BENCH_APPARENT_GIB if apparent_gib is None else apparent_gib
    if scale in SCALES:
        adiv, ddiv = SCALES[scale]
        out = {k: (_align(a // adiv, MiB), _align(d // ddiv)) for k, (a, d) in base.items()}
    elif scale != "bench":
        raise ValueError(f"unknown scale {scale!r} (small, default, bench)")
    else:
        out = dict(base)
    if data_mib is not None or apparent_gib is not None:
        tot_a = sum(a for a, _ in out.values())
        tot_d = sum(d for _, d in out.values())
        fa = (apparent_gib * GiB / tot_a) if apparent_gib is not None else 1.0
        fd = (data_mib * MiB / tot_d) if data_mib is not None else 1.0
        out = {k: (max(MiB, _align(int(a * fa), MiB)), _align(int(d * fd))) for k, (a, d) in out.items()}
    return out


def _device(parent: etree._Element, backend: str, port: str, options: Iterable[tuple[str, str]],
            release: str) -> None:  # fmt: skip
    """A persistent assignment as the release's qubes.xml holds it (R4.3: mode and identity too)."""
    el = etree.SubElement(parent, "device", id=port)
    el.set("backend-domain", backend)
    if release == "4.3":
        el.set("mode", "required")
        el.set("identity", "*")
    for k, v in options:
        etree.SubElement(el, "option", name=k).text = v


def _build_xml(
    sizes: dict[tuple[str, str], tuple[int, int]], rng: random.Random, pool_kind: str = "file",
    release: str = DEFAULT_RELEASE,
) -> Collection:
    root = etree.Element("qubes")
    labels = etree.SubElement(root, "labels")
    label_ids = {}
    for i, (name, color) in enumerate(LABELS, 1):
        etree.SubElement(labels, "label", color=color, id=f"label-{i}").text = name
        label_ids[name] = f"label-{i}"
    pools = etree.SubElement(root, "pools")
    etree.SubElement(pools, "pool", dir_path="/var/lib/qubes/vm-kernels", driver="linux-kernel",
                     name="linux-kernel")  # fmt: skip
    if pool_kind == "lvm_thin":
        etree.SubElement(pools, "pool", driver="lvm_thin", name=LVM_POOL, revisions_to_keep="1",
                         thin_pool=DEFAULT_THIN_POOL, volume_group=DEFAULT_VG)  # fmt: skip
    file_driver = "file-reflink" if pool_kind == "file-reflink" else "file"
    etree.SubElement(pools, "pool", dir_path="/var/lib/qubes", driver=file_driver, name=FILE_POOL,
                     revisions_to_keep="1")  # fmt: skip
    props = etree.SubElement(root, "properties")
    default_pool = LVM_POOL if pool_kind == "lvm_thin" else FILE_POOL
    for k, v in sorted([*GLOBAL_PROPS, ("default_pool", default_pool)]):
        etree.SubElement(props, "property", name=k).text = v
    domains = etree.SubElement(root, "domains")
    dom0 = etree.SubElement(domains, "domain", id="domain-0")
    dom0.set("class", "AdminVM")
    etree.SubElement(etree.SubElement(dom0, "properties"), "property", name="label").text = label_ids["black"]
    etree.SubElement(dom0, "features")
    for cls in ("pci", "block", "usb"):
        etree.SubElement(dom0, "devices").set("class", cls)
    etree.SubElement(dom0, "tags")
    for qid, spec in enumerate(VMS, 1):
        el = etree.SubElement(domains, "domain", id=f"domain-{qid}")
        el.set("class", spec.klass)
        p = etree.SubElement(el, "properties")
        base = [("label", label_ids[spec.label]), ("name", spec.name), ("qid", str(qid)),
                ("uuid", str(uuid.UUID(int=rng.getrandbits(128), version=4)))]  # fmt: skip
        for k, v in [*base, *spec.props]:
            etree.SubElement(p, "property", name=k).text = v
        f = etree.SubElement(el, "features")
        for k, v in spec.features:
            etree.SubElement(f, "feature", name=k).text = v
        pci = etree.SubElement(el, "devices")
        pci.set("class", "pci")
        if spec.pci:
            _device(pci, "dom0", spec.pci, (), release)
        block = etree.SubElement(el, "devices")
        block.set("class", "block")
        if spec.block:
            _device(block, spec.block[0], spec.block[1], spec.block[2], release)
        tags = etree.SubElement(el, "tags")
        etree.SubElement(tags, "tag", name="created-by-dom0")
        vc = etree.SubElement(el, "volume-config")
        vsz = {vol: sizes[(spec.name, vol)][0] for vol in ("private", "root") if (spec.name, vol) in sizes}
        for attrs in _volumes(spec, vsz, pool_kind):
            etree.SubElement(vc, "volume", {k: attrs[k] for k in sorted(attrs)})
    return Collection(root)


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)


def _make_home(home: Path, rng: random.Random) -> None:
    """dom0's home: dotfiles, a subdirectory, a symlink and a small sparse file (kinds tar must keep)."""
    _write(home / ".bashrc", "# .bashrc\n[ -f /etc/bashrc ] && . /etc/bashrc\nexport EDITOR=vim\n")
    _write(home / ".bash_profile", "[ -f ~/.bashrc ] && . ~/.bashrc\n")
    _write(home / ".config/xfce4/xfconf/xfce-perchannel-xml/xsettings.xml",
           '<?xml version="1.0" encoding="UTF-8"?>\n<channel name="xsettings" version="1.0"/>\n')  # fmt: skip
    _write(home / "Documents/notes-2026.txt", "".join(f"note {i}: {rng.choice(WORDS)}\n" for i in range(50)))
    _write(home / "Documents/keys.txt", "not really a key\n", 0o600)
    os.symlink("notes-2026.txt", home / "Documents/latest.txt")
    sparse = home / "Documents/sparse.bin"
    fd = os.open(sparse, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, rng.randbytes(BLOCK), 256 * 1024)
        os.ftruncate(fd, 1 * MiB)
        os.fsync(fd)  # as write_sparse_image: allocated now, not at writeback
    finally:
        os.close(fd)


@dataclass
class Summary:
    vms: int
    images: int
    apparent: int
    allocated: int

    def __str__(self) -> str:
        return (
            f"{self.vms} VMs (+dom0), {self.images} images: apparent {self.apparent / GiB:.2f} GiB, "
            f"allocated {self.allocated / MiB:.1f} MiB"
        )


def summarize(sim_dir: Path) -> Summary:
    """Apparent vs allocated size of the committed images and LVs in a simulation (what a sparse-aware backup
    must keep; a running VM's -snap / -dirty data is not counted)."""
    qroot = Path(sim_dir) / "dom0/var/lib/qubes"
    coll = Collection.load(qroot / "qubes.xml")
    lvs = LvStore(Path(sim_dir) / "dom0/dev")
    files = sorted(qroot.rglob("*.img")) + [lvs.path(i.vg, i.name) for i in lvs.lvs()]
    files = [f for f in files if not f.name.removesuffix(".img").endswith(("-snap", "-dirty", "-import", "-back"))]
    apparent = allocated = 0
    for img in files:
        st = img.stat()
        apparent += st.st_size
        allocated += st.st_blocks * 512
    return Summary(len(coll.domains) - 1, len(files), apparent, allocated)


def _clear(dir: Path, force: bool) -> None:
    if dir.exists() and any(dir.iterdir()):
        if not force:
            raise FileExistsError(f"{dir} is not empty (use --force to replace the simulation in it)")
        for sub in ("dom0", "vms"):
            if (dir / sub).is_symlink() or (dir / sub).is_file():
                (dir / sub).unlink()
            elif (dir / sub).exists():
                shutil.rmtree(dir / sub)
    dir.mkdir(parents=True, exist_ok=True)


class _Volumes:
    """Where a volume's data goes for the chosen pool kind (LV files with metadata, or images)."""

    def __init__(self, dir: Path, pool_kind: str) -> None:
        self.kind = pool_kind
        self.qroot = dir / "dom0/var/lib/qubes"
        self.lvs = LvStore(dir / "dom0/dev")
        if pool_kind == "lvm_thin":
            self.lvs.init_vg(DEFAULT_VG)

    def path(self, spec: VmSpec, vol: str, suffix: str = "") -> Path:
        if self.kind == "lvm_thin":
            return self.lvs.path(DEFAULT_VG, f"vm-{spec.name}-{vol}{suffix}")
        return self.qroot / _vm_dir(spec) / f"{vol}{suffix}.img"

    def written(self, spec: VmSpec, vol: str, suffix: str = "", origin: str = "") -> None:
        """Record LV metadata for a data file just written (no-op for file pools)."""
        if self.kind == "lvm_thin":
            lv = f"vm-{spec.name}-{vol}{suffix}"
            self.lvs.write_meta(LvInfo(DEFAULT_VG, lv, DEFAULT_THIN_POOL, origin))


def _write_volumes(vols: _Volumes, sizes: dict[tuple[str, str], tuple[int, int]], seed: int, compressible: float,
                   running: set[str]) -> None:  # fmt: skip
    for spec in VMS:
        for vol in ("private", "root"):
            if (spec.name, vol) not in sizes:
                continue
            apparent, data = sizes[(spec.name, vol)]
            # work's private ends in data, every other image ends in a hole; roots start with a "label".
            img = Image("", apparent, data, ends_in_data=(spec.name, vol) == ("work", "private"),
                        data_at_start=vol == "root")  # fmt: skip
            img_rng = random.Random(f"qubes-backup-simgen:{seed}:{spec.name}:{vol}")
            write_sparse_image(vols.path(spec, vol), img, img_rng, compressible)
            vols.written(spec, vol)
            if spec.name in running and vols.kind != "file":
                # what the running VM wrote since its start: the -snap LV / -dirty image differs
                suffix = "-snap" if vols.kind == "lvm_thin" else "-dirty"
                run_rng = random.Random(f"qubes-backup-simgen:{seed}:{spec.name}:{vol}:running")
                write_sparse_image(vols.path(spec, vol, suffix), img, run_rng, compressible)
                vols.written(spec, vol, suffix, origin=f"vm-{spec.name}-{vol}")
    for name in sorted(running):
        spec = _spec(name)
        if spec.root is None and spec.klass == "AppVM" and vols.kind != "file":
            # snap_on_start root: a snapshot of the template's root taken at start
            tpl = _spec(dict(spec.props).get("template", "fedora-41"))
            suffix = "-snap" if vols.kind == "lvm_thin" else "-dirty"
            dst = vols.path(spec, "root", suffix)
            dst.parent.mkdir(parents=True, exist_ok=True)
            clone_file(vols.path(tpl, "root"), dst)
            vols.written(spec, "root", suffix, origin=f"vm-{tpl.name}-root")


def generate(
    dir: Path,
    scale: str = "small",
    seed: int = 0,
    *,
    force: bool = False,
    data_mib: float | None = None,
    apparent_gib: float | None = None,
    compressible: float = 0.5,
    pool: str = "lvm_thin",
    running: tuple[str, ...] | list[str] = (),
    keep: Iterable[str] | None = None,
    release: str = DEFAULT_RELEASE,
) -> None:
    """Create the simulation in ``dir``; refuses a non-empty ``dir`` unless ``force`` (then only
    ``dir/dom0``, ``dir/vms`` and ``dir/sim-endpoints.json`` are replaced, nothing else in ``dir`` is touched).

    ``pool``: lvm_thin (the default, as a fresh install and the command line), file-reflink or file (what
    older versions built); ``running``: VMs to mark as running; ``keep``: build only these VMs (and dom0) —
    a freshly installed system to restore into; references to the others are dropped, as they would not
    exist there; ``release``: the Qubes release (4.3, the default, or 4.2) whose qubesd the simulated one is
    (``DIR/dom0/etc/qubes-release``), and whose qubes.xml and files it starts from (R4.2: no notes)."""
    scale = scale.lower()
    check_release(release)
    if pool not in POOL_KINDS:
        raise ValueError(f"unknown pool kind {pool!r} ({', '.join(POOL_KINDS)})")
    runnable = {s.name for s in VMS if s.klass != "DispVM"}
    bad = [n for n in running if n not in runnable]
    if bad:
        raise ValueError(f"cannot mark {bad[0]!r} as running (one of: {', '.join(sorted(runnable))})")
    sizes = _sizes(scale, data_mib, apparent_gib)
    kept = {s.name for s in VMS} if keep is None else set(keep)
    sizes = {k: v for k, v in sizes.items() if k[0] in kept}
    dir = Path(dir)
    _clear(dir, force)
    rng = random.Random(f"qubes-backup-simgen:{seed}")
    qroot = dir / "dom0/var/lib/qubes"
    qroot.mkdir(parents=True)
    (qroot / "vm-kernels" / KERNEL).mkdir(parents=True)
    for sub in ("appvms", "vm-templates"):  # there on every install, even without VMs of that kind
        (qroot / sub).mkdir()
    coll = _build_xml(sizes, rng, pool, release)
    if keep is not None:
        _reduce(coll, kept)
    write_atomic(coll, qroot / "qubes.xml")
    write_release(dir / "dom0", release)

    colors = dict(LABELS)
    for spec in (s for s in VMS if s.name in kept):
        vdir = qroot / _vm_dir(spec)
        vdir.mkdir(parents=True, exist_ok=True)
        _write(vdir / "icon.png", _png(colors[spec.label]))
        if spec.klass != "DispVM":
            _write(vdir / "firewall.xml", FIREWALL_XML.format(host=f"{spec.name}.example.org"))
            if release != "4.2":  # notes came with R4.3
                _write(vdir / "notes.txt", f"{spec.name}: {spec.klass}, simulated by qubes-backup-simgen\n")
    _write_volumes(_Volumes(dir, pool), sizes, seed, compressible, set(running))
    save_run_state(dir / "dom0", set(running))
    policy.install_shipped(dir / "dom0")  # /etc/qubes/policy.d as Qubes ships it (the restore rules)

    if keep is None:
        _make_home(dir / "dom0/home" / USER, rng)
    else:  # a fresh install: an empty home
        (dir / "dom0/home" / USER).mkdir(parents=True)
    (dir / "vms/backupvm/home/user/backups").mkdir(parents=True)
    # dom0's accounts, as an installer makes them: the user is the first member of group qubes (how Qubes' own
    # backup, and ours without a sudo/login user, find whose home is dom0's home)
    _write(dir / "dom0/etc/passwd", f"root:x:0:0:root:/root:/bin/bash\n{USER}:x:1000:1000::/home/{USER}:/bin/bash\n")
    _write(dir / "dom0/etc/group", f"root:x:0:\nwheel:x:10:{USER}\nqubes:x:98:{USER}\n{USER}:x:1000:\n")
    endpoints.write(dir)  # how dom0's code reaches this system's programs (it never imports this package)


def _reduce(coll: Collection, kept: set[str]) -> None:
    """Only the kept VMs (and dom0); what referred to the others falls back to none."""
    for dom in list(coll.domains):
        if not dom.is_admin and dom.name not in kept:
            dom.element.getparent().remove(dom.element)  # type: ignore[union-attr]
    names = set(coll.names())
    for dom in coll.domains:
        for dev in dom.element.findall("devices/device"):  # qubesd drops an assignment to a VM it lacks
            if dev.get("backend-domain") not in names:
                dev.getparent().remove(dev)  # type: ignore[union-attr]
        for prop in ("template", "netvm", "default_dispvm"):
            if dom.raw_property(prop) and dom.raw_property(prop) not in names:
                dom.set_property(prop, None)
    props = coll.root.find("properties")
    assert props is not None
    for el in list(props):
        if el.get("name") in ("clockvm", "default_dispvm", "default_netvm", "default_template", "updatevm",
                              "default_guivm", "default_audiovm", "management_dispvm") and el.text not in names:
            props.remove(el)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qubes-backup-simgen", description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="directory for the simulation (use with QUBES_SIM=DIR)")
    ap.add_argument("--scale", default="default", type=str.lower, choices=["small", "default", "bench"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-mib", type=float, help=f"total image data (bench default {BENCH_DATA_MIB})")
    ap.add_argument(
        "--apparent-gib", type=float, help=f"total apparent size (bench default {BENCH_APPARENT_GIB})"
    )
    ap.add_argument("--compressible", type=float, default=0.5, help="fraction of data extents that compress")
    ap.add_argument("--force", action="store_true", help="replace an existing simulation in DIR")
    ap.add_argument("--pool", choices=POOL_KINDS, default="lvm_thin",
                    help="storage of the VMs' volumes (default lvm_thin, as a fresh install)")  # fmt: skip
    ap.add_argument("--release", choices=RELEASES, default=DEFAULT_RELEASE,
                    help="the Qubes release the simulated qubesd is (default %(default)s)")  # fmt: skip
    ap.add_argument("--only", action="append", metavar="VM",
                    help="build only these VMs (repeatable): a freshly installed system to restore into")  # fmt: skip
    ap.add_argument("--running", action="append", metavar="VM",
                    help="mark VM as running (repeatable; default: sys-firewall; 'none' for none)")  # fmt: skip
    args = ap.parse_args(argv)
    default_running = ["sys-firewall"] if args.only is None or "sys-firewall" in args.only else []
    running = [r for r in (args.running or default_running) if r != "none"]
    try:
        generate(args.dir, args.scale, args.seed, force=args.force, data_mib=args.data_mib,
                 apparent_gib=args.apparent_gib, compressible=args.compressible, pool=args.pool,
                 running=running, keep=args.only, release=args.release)  # fmt: skip
    except (FileExistsError, ValueError) as e:
        print(f"qubes-backup-simgen: {e}", file=sys.stderr)
        return 2
    print(f"{args.dir}: {summarize(args.dir)}")
    print(f"use it with: QUBES_SIM={args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
