"""Shared fixtures for the CLI suites: simulated Qubes systems, the real console scripts, snapshots.

The CLI tests run ``qvm-backup`` / ``qvm-backup-restore`` from the venv as separate processes with
``QUBES_SIM`` set, so they exercise argument parsing, the one-line error path and the real agent process
exactly as a user would.  Paths given to the CLIs are inside the simulated machine: ``-p /pw`` is
``DIR/dom0/pw``; a LOCATION with ``-d backupvm`` is inside ``DIR/vms/backupvm``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from qubes_backup_dom0.inner import same_content
from qubes_backup_dom0.qubesxml import Collection
from qubes_backup_dom0.system import System
from qubes_backup_sim import simgen
from qubes_backup_sim.store import write_atomic

BIN = Path(sys.executable).parent
PASSPHRASE = "correct horse battery staple"
KDF = ["--kdf-n", "1024", "--weak-kdf-ok"]  # the KDF is not under test here; keep every backup fast
VM_BACKUPS = "/home/user/backups"  # the backup directory inside backupvm
STAGING_PREFIX = ".qubes-backup-restore-"
SMALL_FILE = 1 << 20  # snapshot hashes files up to this size; larger ones by size/mtime/blocks


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
        return self.run("qvm-backup-restore", "-y", "-p", "/pw", *args)

    def backup_to_vm(self, *vms: str, extra: tuple[str, ...] = ()) -> Path:
        """Back up into backupvm's backup directory and return the host path of the one new file."""
        before = set(self.vm_backups.glob("qubes-backup-*"))
        r = self.backup(*extra, "-d", "backupvm", VM_BACKUPS, *vms)
        assert r.returncode == 0, r.stderr
        new = set(self.vm_backups.glob("qubes-backup-*")) - before
        assert len(new) == 1, new
        return new.pop()

    def snapshot(self) -> dict[str, tuple[object, ...]]:
        """State of dom0's Qubes root and home: what a failed restore must leave exactly as it was."""
        return snapshot_tree(self.dom0 / "var/lib/qubes") | {
            f"~/{k}": v for k, v in snapshot_tree(self.home).items()
        }

    def staging_dirs(self) -> list[Path]:
        return sorted(self.qubes_root.glob(f"{STAGING_PREFIX}*"))


def snapshot_tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Path -> (kind, size, mtime, blocks, hash of small files) for everything under ``root``."""
    out: dict[str, tuple[object, ...]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", st.st_mode)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if st.st_size <= SMALL_FILE else ""
                out[rel] = ("file", st.st_mode, st.st_size, st.st_mtime_ns, st.st_blocks, digest)
    return out


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def assert_restored_like(src: Path, dst: Path) -> None:
    """``dst`` has the same bytes as ``src`` and keeps its holes (allocation within a small margin)."""
    assert same_content(src, dst), f"{dst} differs from {src}"
    a, b = allocated(src), allocated(dst)
    assert abs(a - b) <= max(64 << 10, a // 20), f"{dst}: {b} bytes allocated, original {a}"


def make_fresh(base: Path, source: Sim, keep: tuple[str, ...] = ("dom0", "backupvm")) -> Sim:
    """A freshly installed second system: the source's qubes.xml reduced to ``keep``, empty home, and an
    empty backupvm (see scripts/demo.py step 4)."""
    fresh = Sim(base)
    coll = source.collection()
    for dom in list(coll.domains):
        if dom.name not in keep:
            dom.element.getparent().remove(dom.element)
    fresh.qubes_root.mkdir(parents=True)
    fresh.home.mkdir(parents=True)
    write_atomic(coll, fresh.qubes_xml)
    (fresh.dom0 / "pw").write_text(PASSPHRASE + "\n")
    fresh.vm_backups.mkdir(parents=True)
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


def new_sim(path: Path, **kw: object) -> Sim:
    simgen.generate(path, "small", seed=0, **kw)  # type: ignore[arg-type]
    sim = Sim(path)
    (sim.dom0 / "pw").write_text(PASSPHRASE + "\n")
    return sim


@pytest.fixture
def sim(tmp_path: Path) -> Sim:
    """A small simulated system (deterministic: every test gets the same bytes) with ``/pw`` in dom0."""
    return new_sim(tmp_path / "sim")


@pytest.fixture(scope="session")
def source_backup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Sim, Path]:
    """One full backup of the small system, made once: restore tests treat both as read-only."""
    src = new_sim(tmp_path_factory.mktemp("source") / "sim")
    return src, src.backup_to_vm()


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
    other = new_sim(tmp_path / "same")
    share_backup(backup, other)
    return other, f"{VM_BACKUPS}/{backup.name}"


class Unchanged:
    """Snapshot of a system before an operation that must fail; ``check()`` asserts nothing changed."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.before = sim.snapshot()
        self.xml = sim.qubes_xml.read_bytes()

    def check(self) -> None:
        assert self.sim.qubes_xml.read_bytes() == self.xml
        assert self.sim.snapshot() == self.before
        assert self.sim.staging_dirs() == []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How much fuzzing ``make test`` did (hypothesis inputs through each parser dom0 exposes to the VM)."""
    from fuzz.targets import RUNS

    if RUNS:
        detail = ", ".join(f"{n} {name}" for name, n in sorted(RUNS.items()))
        terminalreporter.write_line(f"fuzz: {sum(RUNS.values())} generated inputs ({detail})")
