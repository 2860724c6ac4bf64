"""Where things live: a real Qubes dom0, or the simulation selected by QUBES_SIM=DIR.

In simulation dom0's filesystem root is ``DIR/dom0`` and VM NAME's is ``DIR/vms/NAME``.  Every path a user
gives is interpreted inside the machine it belongs to, so the same command line works on both.

Endpoints (environment overrides; the defaults are a real dom0's):

- ``QUBES_ADMIN_SOCKET``: qubesd's socket (``/var/run/qubesd.sock``; simulation: ``DIR/dom0/var/run/qubesd.sock``,
  where the simulated qubesd is started on demand);
- ``QUBES_RPC_DIR``: where ``admin.vm.volume.ImportWithSize`` is (``/etc/qubes-rpc``; simulation: the sim's);
- ``QUBES_LVM``: the command run for LVM operations, split like shell words (``lvm``; simulation: the sim's
  stand-in over ``DIR/dom0/dev``);
- ``QUBES_DEV_DIR``: where ``VG/LV`` device nodes are (``/dev``; simulation: ``DIR/dom0/dev``), and the thin
  pools' ``mapper/VG-POOL_tmeta``;
- ``QUBES_DMSETUP``, ``QUBES_THIN_DUMP``, ``QUBES_THIN_DELTA``: the commands for a thin pool's metadata
  snapshot, its dump and the difference of two thin devices (``dmsetup``, ``thin_dump``, ``thin_delta``;
  simulation: the sim's stand-ins over ``DIR/dom0/dev``), see thinmap.py and bases.py.

The simulation is reached through these endpoints only, never imported (it is not installed in dom0): its
generator writes them into ``DIR/sim-endpoints.json`` (``SimEndpoints``), which this module reads.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import socket
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from qubes_backup_dom0.errors import BackupError, NeedsRoot
from qubes_backup_dom0.qubes.dom0user import real_user, sim_user

QUBES_ROOT = "/var/lib/qubes"
REAL_ADMIN_SOCKET = "/var/run/qubesd.sock"
REAL_RPC_DIR = "/etc/qubes-rpc"
REAL_DEV_DIR = "/dev"
SIM_ENDPOINTS = "sim-endpoints.json"  # in DIR, written by the simulation's generator (qubes-backup-simgen)
SIM_ENDPOINTS_MAX = 64 << 10
SIM_START_TIMEOUT = 60.0


@dataclass(frozen=True)
class SimEndpoints:
    """A simulated system's endpoints (``DIR/sim-endpoints.json``; the sim package's endpoints.py writes it).

    ``qubesd``: argv starting the simulated qubesd of DIR (DIR appended) if none answers on ``socket`` (relative
    to DIR/dom0); ``lvm``: the lvm stand-in (DIR/dom0/dev appended); ``thintools``: the dmsetup and thin_dump
    stand-ins (DIR/dom0/dev and the tool's name appended); ``rpc_dir``: the simulated dom0's qrexec services;
    ``vm_rpc_dir``: services a simulated VM offers besides the agent's."""

    qubesd: tuple[str, ...]
    socket: str
    lvm: tuple[str, ...]
    thintools: tuple[str, ...]
    rpc_dir: str
    vm_rpc_dir: str


@functools.lru_cache(maxsize=16)
def sim_endpoints(sim_dir: Path) -> SimEndpoints:
    """The endpoints of the simulated system in ``sim_dir`` (read once per process)."""
    path = sim_dir / SIM_ENDPOINTS
    bad = f"QUBES_SIM={sim_dir}: {path}"
    try:
        with open(path, "rb") as f:
            raw = f.read(SIM_ENDPOINTS_MAX + 1)
    except FileNotFoundError:
        raise BackupError(f"{bad} is missing: not a simulated system made by qubes-backup-simgen") from None
    except OSError as exc:
        raise BackupError(f"{bad}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(raw) if len(raw) <= SIM_ENDPOINTS_MAX else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise BackupError(f"{bad} is not a version 1 endpoints file (regenerate the system with qubes-backup-simgen)")

    def argv(key: str) -> tuple[str, ...]:
        value = doc.get(key)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise BackupError(f"{bad}: {key!r} is not a command (a list of words)")
        return tuple(value)

    def text(key: str) -> str:
        value = doc.get(key)
        if not isinstance(value, str) or not value:
            raise BackupError(f"{bad}: {key!r} is not a path")
        return value

    return SimEndpoints(argv("qubesd"), text("socket"), argv("lvm"), argv("thintools"), text("rpc_dir"),
                        text("vm_rpc_dir"))  # fmt: skip


def _answers(path: Path) -> bool:
    """Something accepts connections on the Unix socket ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2.0)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


@dataclass(frozen=True)
class System:
    sim_dir: Path | None  # None on a real Qubes system
    dom0_root: Path  # "/" on a real system
    user: str
    # Endpoint overrides from the environment (None: the default for a real or simulated system).
    admin_socket_override: str | None = None
    rpc_dir_override: str | None = None
    lvm_override: str | None = None
    dev_dir_override: str | None = None
    dmsetup_override: str | None = None
    thin_dump_override: str | None = None
    thin_delta_override: str | None = None
    home: str | None = None  # dom0's home as passwd says (a dom0 path); None: /home/USER

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> System:
        env = dict(os.environ) if env is None else env
        names = ("QUBES_ADMIN_SOCKET", "QUBES_RPC_DIR", "QUBES_LVM", "QUBES_DEV_DIR", "QUBES_DMSETUP",
                 "QUBES_THIN_DUMP", "QUBES_THIN_DELTA")
        overrides = tuple(env.get(k) or None for k in names)
        sim = env.get("QUBES_SIM")
        if sim:
            sim_dir = Path(sim).resolve()
            found = sim_user(env, sim_dir / "dom0")
            return replace(cls(sim_dir, sim_dir / "dom0", found.name, *overrides), home=found.home)
        found = real_user(env)  # as Qubes finds it: qubes/dom0user.py
        return replace(cls(None, Path("/"), found.name, *overrides), home=found.home)

    # -- endpoints ----------------------------------------------------------------------------------------
    def admin_socket(self, start: bool = True) -> Path:
        """qubesd's socket.  In simulation (without an override) the simulated qubesd is started on demand,
        by the command its endpoints name."""
        if self.admin_socket_override:
            return Path(self.admin_socket_override)
        if self.sim_dir is None:
            return Path(REAL_ADMIN_SOCKET)
        ends = sim_endpoints(self.sim_dir)
        sock = self.dom0_root / ends.socket
        if not start or _answers(sock):
            return sock
        try:
            r = subprocess.run([*ends.qubesd, str(self.sim_dir)], stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=SIM_START_TIMEOUT)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackupError(f"cannot start the simulated qubesd of {self.sim_dir}: {exc}") from None
        if r.returncode:
            said = r.stderr.decode(errors="replace").strip().splitlines()
            why = said[-1] if said else f"exit status {r.returncode}"
            raise BackupError(f"cannot start the simulated qubesd of {self.sim_dir}: {why}")
        return sock

    @property
    def rpc_dir(self) -> Path:
        """Where dom0's qrexec services are (``admin.vm.volume.ImportWithSize``)."""
        if self.rpc_dir_override:
            return Path(self.rpc_dir_override)
        if self.sim_dir is None:
            return Path(REAL_RPC_DIR)
        return Path(sim_endpoints(self.sim_dir).rpc_dir)

    @property
    def vm_rpc_dir(self) -> Path | None:
        """Simulation only: services a simulated VM offers besides the agent's (``qubes.BackupPassphrase``)."""
        return None if self.sim_dir is None else Path(sim_endpoints(self.sim_dir).vm_rpc_dir)

    def _command(self, override: str | None, variable: str, real: str, sim: tuple[str, ...], *args: str) -> list[str]:
        """The override (split like shell words), else the real command, else in simulation the endpoint's
        command with ``args`` (the simulated system's dev dir ...) appended."""
        if override:
            try:
                argv = shlex.split(override)
            except ValueError as exc:
                raise BackupError(f"{variable} cannot be split into words: {exc}") from None
            if not argv:
                raise BackupError(f"{variable} is empty")
            return argv
        return [real] if self.sim_dir is None else [*sim, *args]

    @property
    def lvm_argv(self) -> list[str]:
        """The command run for LVM operations (several words allowed, never a shell)."""
        sim = () if self.lvm_override or self.sim_dir is None else sim_endpoints(self.sim_dir).lvm
        return self._command(self.lvm_override, "QUBES_LVM", "lvm", sim, str(self.dom0_root / "dev"))

    @property
    def dmsetup_argv(self) -> list[str]:
        """``dmsetup`` (only its ``message POOL-tpool 0 reserve/release_metadata_snap`` is used)."""
        return self._thintool(self.dmsetup_override, "QUBES_DMSETUP", "dmsetup")

    @property
    def thin_dump_argv(self) -> list[str]:
        return self._thintool(self.thin_dump_override, "QUBES_THIN_DUMP", "thin_dump")

    @property
    def thin_delta_argv(self) -> list[str]:
        return self._thintool(self.thin_delta_override, "QUBES_THIN_DELTA", "thin_delta")

    def _thintool(self, override: str | None, variable: str, tool: str) -> list[str]:
        sim = () if override or self.sim_dir is None else sim_endpoints(self.sim_dir).thintools
        return self._command(override, variable, tool, sim, str(self.dom0_root / "dev"), tool)

    @property
    def dev_dir(self) -> Path:
        if self.dev_dir_override:
            return Path(self.dev_dir_override)
        return Path(REAL_DEV_DIR) if self.sim_dir is None else self.dom0_root / "dev"

    def check_root(self, why: str, override: str | None) -> None:
        """On a real dom0 some things need root (lvm, writing VM volumes): raise NeedsRoot (``why``: what needs
        it) when not run as root.  Not in simulation, nor when the endpoint it uses is overridden
        (``override``: its QUBES_* value; a stand-in needs no root)."""
        if self.sim_dir is None and not override and os.geteuid() != 0:
            raise NeedsRoot(why)

    @property
    def simulated(self) -> bool:
        return self.sim_dir is not None

    def dom0_path(self, path: str | os.PathLike[str]) -> Path:
        """A dom0 path as given by the user (absolute, or relative to dom0's working directory), or as
        qubesd reports it (a pool's dir_path): in simulation, absolute paths are inside ``DIR/dom0``."""
        p = Path(path)
        if self.sim_dir is None:
            return p.absolute()
        if not p.is_absolute():
            # Relative paths in simulation are relative to the real working directory, as a user expects.
            return p.absolute()
        return self.dom0_root / p.relative_to("/")

    @property
    def qubes_root(self) -> Path:
        return self.dom0_root / QUBES_ROOT.lstrip("/")

    @property
    def qubes_xml(self) -> Path:
        return self.qubes_root / "qubes.xml"

    @property
    def home_dir(self) -> Path:
        return self.dom0_path(self.home) if self.home else self.dom0_root / "home" / self.user

    def vm_root(self, name: str) -> Path:
        """The filesystem root of VM ``name`` in simulation."""
        if self.sim_dir is None:
            raise RuntimeError("vm_root is only meaningful in simulation")
        return self.sim_dir / "vms" / name
