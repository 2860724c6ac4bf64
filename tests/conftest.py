"""Shared fixtures for the CLI suites: simulated Qubes systems, the real console scripts, snapshots.

The CLI tests run ``qvm-backup`` / ``qvm-backup-restore`` from the venv as separate processes with
``QUBES_SIM`` set, so they exercise argument parsing, the one-line error path and the real agent process
exactly as a user would.  Paths given to the CLIs are inside the simulated machine: ``-p /pw`` is
``DIR/dom0/pw``; a LOCATION with ``-d backupvm`` is inside ``DIR/vms/backupvm``.

The systems are built by simgen with the default ``lvm_thin`` pool (``POOL``); the simulated qubesd owns their
qubes.xml and volumes, so snapshots of a system ignore its runtime files and compare qubes.xml semantically,
and VMs are compared through qubes.xml (properties, features, tags), their firewall and notes as the sim
qubesd serves them, and their volumes' committed data (``assert_same_vm``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from lxml import etree
from qubes_backup_dom0.format.sparse import same_content
from qubes_backup_dom0.qubes.qubesxml import FILE_DRIVERS, Collection, Domain, Volume
from qubes_backup_dom0.qubes.system import System
from qubes_backup_sim import firewall as sim_firewall
from qubes_backup_sim import launch, simgen

if TYPE_CHECKING:
    from qubes_backup_dom0.restore.repository import RepoRestore

# A test run started in the background by a non-interactive shell (`make test &`, nohup) inherits SIGINT
# ignored, and so would every command the tests start: Ctrl-C tests would then see a backup run to the end.
# A handler here is reset to the default in every child at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

BIN = Path(sys.executable).parent
# Services run as executables (the simulated admin.vm.volume.ImportWithSize: ``#!/usr/bin/env python3``) find
# the venv's interpreter first, not a slower shim (a pyenv shim costs ~0.3 s per start).
if not os.environ.get("PATH", "").startswith(f"{BIN}{os.pathsep}"):
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
PASSPHRASE = "correct horse battery staple"
KDF = ["--kdf-n", "1024", "--weak-kdf-ok"]  # the KDF is not under test here; keep every backup fast
VM_BACKUPS = "/home/user/backups"  # the backup directory inside backupvm
STAGING_PREFIX = ".qubes-backup-restore-"  # dom0 home staging (beside the home it is restored into)
IN_PROGRESS = "backup-restore-in-progress"
SMALL_FILE = 1 << 20  # snapshot hashes files up to this size; larger ones by size/mtime/blocks
POOL = "lvm_thin"  # what the CLI suites run on (a fresh install); use cases also run on the others
#: The Qubes release the suites' systems are (simgen --release): R4.3, the current one.  A test parametrized
#: with ``release`` (the fixture of that name) runs on each value given: the backup/restore/rollback use
#: cases of test_cli_restore.py and test_releases.py also run on R4.2 (RELEASES).
RELEASE = "4.3"
RELEASES = ("4.2", "4.3")
POOL_KINDS = simgen.POOL_KINDS
RUNNING_VMS = ("sys-firewall",)  # running while the session's source system is backed up
QUBES_XML = "var/lib/qubes/qubes.xml"
RUN_STATE = "var/run/qubes-sim/state.json"
#: The sim qubesd's runtime files under dom0 (socket, start lock, pid, log): not part of the system's state.
RUNTIME = ("var/run/qubesd.sock", "var/run/qubesd.lock", "var/run/qubesd-sim.pid", "var/log",
           "dev/lvm.log", "dev/thintools.log")  # the sim tools' call logs: not state
#: Identity and bookkeeping properties: never the same on a restored VM (or set by the backup itself).
IDENTITY = ("name", "qid", "uuid", "backup_timestamp")
VM_REFS = ("template", "netvm", "default_dispvm")
#: The options that restore a backup's device assignments and other settings that grant power.
ALL_SETTINGS = ("--restore-devices", "--restore-risky-settings")


@dataclass
class Sim:
    """One simulated machine set (dom0 + VMs) rooted at ``dir``."""

    dir: Path

    @property
    def system(self) -> System:
        return System(self.dir.resolve(), self.dir.resolve() / "dom0", "user")

    @property
    def dom0(self) -> Path:
        return self.dir / "dom0"

    @property
    def qubes_root(self) -> Path:
        return self.dom0 / "var/lib/qubes"

    @property
    def qubes_xml(self) -> Path:
        return self.qubes_root / "qubes.xml"

    @property
    def home(self) -> Path:
        return self.dom0 / "home/user"

    def vm_root(self, name: str) -> Path:
        return self.dir / "vms" / name

    @property
    def vm_backups(self) -> Path:
        """``/home/user/backups`` of backupvm, seen from the host."""
        return self.vm_root("backupvm") / VM_BACKUPS.lstrip("/")

    def collection(self) -> Collection:
        return Collection.load(self.qubes_xml)

    @property
    def release(self) -> str:
        """The Qubes release whose qubesd the simulated one is (DIR/dom0/etc/qubes-release)."""
        from qubes_backup_sim.release import read_release

        return read_release(self.dom0)

    @property
    def pool_kind(self) -> str:
        """The driver of the default pool (lvm_thin, file-reflink, file): what simgen built."""
        coll = self.collection()
        default = coll.global_properties.get("default_pool")
        return coll.pools[default]["driver"] if default else "file"  # R4.0-era qubes.xml: file pools

    def volume_file(self, coll: Collection, vol: Volume) -> Path:
        """The host file holding a volume's committed data (an LV file, or the clean image)."""
        pool = coll.pools[vol.pool]
        if pool["driver"] == "lvm_thin":
            return self.dom0 / "dev" / vol.vid
        assert pool["driver"] in FILE_DRIVERS, (vol, pool)
        return self.dom0 / pool["dir_path"].lstrip("/") / f"{vol.vid}.img"

    def volume_files(self, name: str) -> dict[str, Path]:
        """Volume name -> committed data of VM ``name``'s save_on_stop volumes."""
        coll = self.collection()
        return {v.name: self.volume_file(coll, v) for v in coll[name].volumes if v.save_on_stop}

    def all_volume_files(self) -> set[Path]:
        """The committed data of every save_on_stop volume of every VM."""
        coll = self.collection()
        return {self.volume_file(coll, v) for d in coll.domains for v in d.volumes if v.save_on_stop}

    def vm_dir(self, name: str) -> Path:
        """The VM's directory in the Qubes root (firewall.xml, notes.txt; images of file pools)."""
        coll = self.collection()
        return self.qubes_root / (coll.vm_dir(coll[name]) or "")

    def in_progress(self) -> list[str]:
        """VMs still tagged as being restored (a restore that did not finish)."""
        return sorted(d.name for d in self.collection().domains if IN_PROGRESS in d.tags)

    def start_qubesd(self, log: Path) -> Path:
        """Start this system's simulated qubesd with a request log (the CLIs then use that one); stops a
        running one first, so that every request from here on is logged."""
        launch.stop_qubesd(self.dir)
        return launch.ensure_qubesd(self.dir, log=log, idle=300)

    def set_global(self, prop: str, value: str) -> None:
        """Change a global property through the sim qubesd (what ``qubes-prefs`` does)."""
        from qubes_backup_dom0.qubes.adminapi import AdminAPI

        AdminAPI(self.system.admin_socket()).call("admin.property.Set", "dom0", prop, value.encode())

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_")}
        env["QUBES_SIM"] = str(self.dir)
        return env

    def popen(self, tool: str, *args: str, **kw: object) -> subprocess.Popen[str]:
        """Start a console script without waiting (for interruption tests)."""
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            [str(BIN / tool), *args], env=self.env(), text=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw,
        )  # fmt: skip

    def run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a console script to completion; stdin is not a terminal (so no prompts, no progress bar)."""
        return subprocess.run(
            [str(BIN / tool), *args], env=self.env(), text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, capture_output=True,
        )  # fmt: skip

    def backup(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("qvm-backup", "-y", "-p", "/pw", *KDF, *args)

    def restore(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A restore of everything the user can agree to (round trips compare whole VMs); what is restored
        without ``ALL_SETTINGS``: tests/test_hostile_backup.py."""
        return self.run("qvm-backup-restore", "-y", "-p", "/pw", *ALL_SETTINGS, *args)

    def backup_to_vm(self, *vms: str, extra: tuple[str, ...] = ()) -> Path:
        """Back up into backupvm's backup directory and return the host path of the one new file."""
        before = set(self.vm_backups.glob("qubes-backup-*"))
        r = self.backup(*extra, "-d", "backupvm", VM_BACKUPS, *vms)
        assert r.returncode == 0, r.stderr
        new = set(self.vm_backups.glob("qubes-backup-*")) - before
        assert len(new) == 1, new
        return new.pop()

    def snapshot(self) -> dict[str, tuple[object, ...]]:
        """State of dom0 (Qubes root, LVs, home, everything): what a failed restore must leave as it was.
        The sim qubesd's runtime files are left out, its run state compared by content and qubes.xml
        semantically (the sim qubesd rewrites it after every change, a rolled-back one included)."""
        tree = snapshot_tree(self.dom0, skip=RUNTIME)
        del tree[QUBES_XML]
        if RUN_STATE in tree:
            tree[RUN_STATE] = ("run state", json.loads((self.dom0 / RUN_STATE).read_text()))
        tree[QUBES_XML] = ("qubes.xml", canonical_xml(self.qubes_xml))
        return tree

    def staging_dirs(self) -> list[Path]:
        """dom0 home staging of restores (beside the home), and anything of ours left in the Qubes root."""
        return sorted([*self.home.glob(f"{STAGING_PREFIX}*"), *self.qubes_root.glob(f"{STAGING_PREFIX}*")])


def snapshot_tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[object, ...]]:
    """Path -> (kind, size, mtime, blocks, hash of small files) for everything under ``root`` (except the
    relative paths in ``skip`` and what is below them; sockets are skipped, locks are not state)."""
    out: dict[str, tuple[object, ...]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            rel = path.relative_to(root).as_posix()
            if rel in skip or any(rel.startswith(s + "/") for s in skip) or stat.S_ISSOCK(st.st_mode):
                continue
            if path.name == "lock" and path.parent.name == ".lvm":
                continue  # the sim LVM's flock file (made on first use): no state
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", st.st_mode)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if st.st_size <= SMALL_FILE else ""
                out[rel] = ("file", st.st_mode, st.st_size, st.st_mtime_ns, st.st_blocks, digest)
    return out


def canonical_xml(path: Path) -> bytes:
    """qubes.xml in canonical form: the same document, however the writer laid it out."""
    parser = etree.XMLParser(remove_blank_text=True, resolve_entities=False, no_network=True)
    return etree.tostring(etree.parse(str(path), parser), method="c14n")


def copy_sim(src: Path, dst: Path) -> None:
    """Copy a simulated system (its sim qubesd's socket is not copied: the copy gets its own)."""

    def sockets(dirpath: str, names: list[str]) -> list[str]:
        return [n for n in names if stat.S_ISSOCK(os.lstat(os.path.join(dirpath, n)).st_mode)]

    shutil.copytree(src, dst, symlinks=True, ignore=sockets)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def assert_restored_like(src: Path, dst: Path) -> None:
    """``dst`` has the same bytes as ``src`` and keeps its holes (allocation within a small margin)."""
    assert same_content(src, dst), f"{dst} differs from {src}"
    a, b = allocated(src), allocated(dst)
    assert abs(a - b) <= max(64 << 10, a // 20), f"{dst}: {b} bytes allocated, original {a}"


def make_fresh(base: Path, source: Sim, keep: tuple[str, ...] = ("dom0", "backupvm"), seed: int = 0,
               release: str | None = None) -> Sim:  # fmt: skip
    """A freshly installed second system of the source's pool kind and release (or ``release``) with only
    the VMs in ``keep`` (simgen keep=: consistent, no global default names a VM it lacks), an empty home and
    an empty backupvm (see scripts/demo.py).  ``seed`` other than the source's gives the kept VMs other data."""
    fresh = Sim(base)
    simgen.generate(base, "small", seed=seed, pool=source.pool_kind, keep=[k for k in keep if k != "dom0"],
                    release=release or source.release)  # fmt: skip
    settle(base)
    (fresh.dom0 / "pw").write_text(PASSPHRASE + "\n")
    return fresh


def share_backup(backup: Path, other: Sim) -> Path:
    """Hard-link a backup file into ``other``'s backupvm (same bytes, no copy)."""
    other.vm_backups.mkdir(parents=True, exist_ok=True)
    target = other.vm_backups / backup.name
    os.link(backup, target)
    return target


def one_error_line(stderr: str) -> str:
    """The CLI's single error line (fails if there is a traceback or more than one line)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if ": error: " in line or ": interrupted" in line]
    assert len(errors) == 1, stderr
    return errors[0]


def settle(path: Path) -> None:
    """fsync every file of a just generated system: its block counts are final once written back (ext4 adds
    an extent block to a file with many extents at writeback), so snapshots taken now stay equal."""
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def new_sim(path: Path, **kw: object) -> Sim:
    kw.setdefault("pool", POOL)
    kw.setdefault("release", RELEASE)
    simgen.generate(path, "small", seed=0, **kw)  # type: ignore[arg-type]
    settle(path)
    sim = Sim(path)
    (sim.dom0 / "pw").write_text(PASSPHRASE + "\n")
    return sim


@pytest.fixture
def release() -> str:
    """The Qubes release of the test's systems (RELEASE unless the test is parametrized with ``release``)."""
    return RELEASE


@pytest.fixture
def sim(tmp_path: Path, release: str) -> Sim:
    """A small simulated system (deterministic: every test gets the same bytes) with ``/pw`` in dom0."""
    return new_sim(tmp_path / "sim", release=release)


SourceBackups = Callable[[str], tuple[Sim, Path]]


@pytest.fixture(scope="session")
def source_backups(tmp_path_factory: pytest.TempPathFactory) -> SourceBackups:
    """One full backup of the small system of each release, made once (on first use): restore tests treat
    both as read-only."""
    made: dict[str, tuple[Sim, Path]] = {}

    def get(release: str) -> tuple[Sim, Path]:
        if release not in made:
            src = new_sim(tmp_path_factory.mktemp(f"source-r{release}") / "sim", running=RUNNING_VMS, release=release)
            made[release] = src, src.backup_to_vm()
        return made[release]

    return get


@pytest.fixture
def source_backup(source_backups: SourceBackups, release: str) -> tuple[Sim, Path]:
    """The full backup of the small system of the test's release (made once)."""
    return source_backups(release)


@pytest.fixture
def fresh(tmp_path: Path, source_backup: tuple[Sim, Path]) -> tuple[Sim, str]:
    """A fresh second system with the session backup hard-linked into its backupvm; returns the system and
    the backup's path inside backupvm."""
    src, backup = source_backup
    other = make_fresh(tmp_path / "fresh", src)
    share_backup(backup, other)
    return other, f"{VM_BACKUPS}/{backup.name}"


@pytest.fixture
def same(tmp_path: Path, source_backup: tuple[Sim, Path]) -> tuple[Sim, str]:
    """The same system as the backup's source (regenerated from the same seed) with the backup linked in."""
    _src, backup = source_backup
    other = new_sim(tmp_path / "same", running=RUNNING_VMS)
    share_backup(backup, other)
    return other, f"{VM_BACKUPS}/{backup.name}"


class Unchanged:
    """Snapshot of a system before an operation that must fail; ``check()`` asserts nothing changed."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.before = sim.snapshot()
        self.names = sorted(sim.collection().names())

    def check(self) -> None:
        assert sorted(self.sim.collection().names()) == self.names
        after = self.sim.snapshot()
        changed = {k for k in self.before.keys() | after.keys() if self.before.get(k) != after.get(k)}
        assert not changed, sorted(changed)
        assert self.sim.staging_dirs() == []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How much fuzzing ``make test`` did (hypothesis inputs through each parser dom0 exposes to the VM)."""
    from fuzz.targets import RUNS

    if RUNS:
        detail = ", ".join(f"{n} {name}" for name, n in sorted(RUNS.items()))
        terminalreporter.write_line(f"fuzz: {sum(RUNS.values())} generated inputs ({detail})")


# ---------------------------------------------------------------------------------------------- comparing VMs

def _devices(dom: Domain) -> list[tuple[str, ...]]:
    out = []
    for devs in dom.element.iterfind("devices"):
        for dev in devs.iterfind("device"):
            opts = tuple(sorted((o.get("name", ""), o.text or "") for o in dev.iterfind("option")))
            # R4.3's qubes.xml has the mode and the device identity too (an R4.2 one: neither)
            out.append((devs.get("class", ""), dev.get("backend-domain", ""), dev.get("id", ""),
                        dev.get("mode", ""), dev.get("identity", ""), repr(opts)))  # fmt: skip
    return sorted(out)


def vm_metadata(sim: Sim, name: str, renames: dict[str, str] | None = None) -> dict[str, object]:
    """What a restore must carry over of VM ``name``: class, label, non-default properties (VM references
    mapped through ``renames``; the template as the effective one, since a restore pins an inherited
    template it restores with the VM), features, tags (but Qubes' created-by-*), device assignments,
    firewall rules and notes as the sim qubesd serves them, and each save_on_stop volume's size."""
    renames = renames or {}
    coll = sim.collection()
    dom = coll[name]
    props = {k: v for k, v in dom.properties.items() if k not in IDENTITY and k != "template"}
    for ref in ("netvm", "default_dispvm"):
        if props.get(ref):
            props[ref] = renames.get(props[ref], props[ref])
    template = coll.effective_template(dom)
    vm_dir = sim.vm_dir(name)
    notes = vm_dir / "notes.txt"
    return {
        "class": dom.klass,
        "label": dom.label,
        "template": renames.get(template, template) if template else None,
        "properties": props,
        "features": dom.features,
        "tags": sorted(t for t in dom.tags if not t.startswith("created-by-")),
        "devices": _devices(dom),
        "firewall": sim_firewall.load(vm_dir / "firewall.xml"),
        "notes": notes.read_text() if notes.is_file() else None,
        "volumes": {v.name: v.size for v in dom.volumes if v.save_on_stop},
    }


def assert_same_vm(src: Sim, name: str, dst: Sim, new_name: str | None = None,
                   renames: dict[str, str] | None = None) -> None:  # fmt: skip
    """VM ``name`` of ``src`` is in ``dst`` (as ``new_name``): same metadata (``vm_metadata``) and every
    save_on_stop volume's committed data byte-exact with its holes kept.  A running VM's volumes are compared
    with its committed data (what the backup must read), never with what it wrote since it started."""
    renames = {**(renames or {}), **({name: new_name} if new_name else {})}
    want, got = vm_metadata(src, name, renames), vm_metadata(dst, new_name or name)
    assert got == want, (name, {k: (want[k], got[k]) for k in want if want[k] != got[k]})
    a, b = src.volume_files(name), dst.volume_files(new_name or name)
    assert a.keys() == b.keys() and a, (name, a, b)
    for vol, path in a.items():
        assert_restored_like(path, b[vol])


# ------------------------------------------------------------------------------------- repository backups

def run_repo_backup(system: Any, vms: Iterable[str], repo: str = "/home/user/repo", *,
                    passphrase: bytes = PASSPHRASE.encode(), zeros: bool = False, **options: Any) -> Any:  # fmt: skip
    """One repository backup of ``vms`` into backupvm:``repo`` as qvm-backup --repo runs it (no change tracking;
    planned without the zero scan unless ``zeros``): planned, connected, run and closed; ``options``:
    RepoOptions' (a weak KDF by default).  The result."""
    from qubes_backup_dom0.backup.plan import plan_backup
    from qubes_backup_dom0.backup.repository import RepoBackup, RepoOptions

    plan = plan_backup(system, list(vms), zeros=zeros)
    job = RepoBackup(system, plan, "backupvm", repo, RepoOptions(**{"kdf_n": 1024, **options}))
    try:
        job.connect()
        return job.run(passphrase)
    finally:
        job.close()
        plan.close()


# ------------------------------------------------------------------------------------- repository restores

def run_repo_restore(*args: Any, **kw: Any) -> RepoRestore:
    """A repository restore (``RepoRestore(*args, **kw)``) opened, planned (no plan errors), run and closed; the
    job, for what it restored."""
    from qubes_backup_dom0.restore.repository import RepoRestore

    job = RepoRestore(*args, **kw)
    try:
        job.open()
        plan = job.plan()
        assert not plan.errors, plan.errors
        job.run()
    finally:
        job.close()
    return job
