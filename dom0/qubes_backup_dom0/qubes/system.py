"""Where things live: a real Qubes dom0, or the simulation selected by QUBES_SIM=DIR.

In simulation dom0's filesystem root is ``DIR/dom0`` and VM NAME's is ``DIR/vms/NAME``.  Every path a user
gives is interpreted inside the machine it belongs to, so the same command line works on both.

Endpoints (environment overrides; the defaults are a real dom0's):

- ``QUBES_ADMIN_SOCKET``: qubesd's socket (``/var/run/qubesd.sock``; simulation: ``DIR/dom0/var/run/qubesd.sock``,
  where the simulated qubesd is started on demand);
- ``QUBES_RPC_DIR``: where ``admin.vm.volume.ImportWithSize`` is (``/etc/qubes-rpc``; simulation: the sim
  package's ``rpc/``);
- ``QUBES_LVM``: the command run for LVM operations, split like shell words (``lvm``; simulation: the sim's
  stand-in over ``DIR/dom0/dev``);
- ``QUBES_DEV_DIR``: where ``VG/LV`` device nodes are (``/dev``; simulation: ``DIR/dom0/dev``), and the thin
  pools' ``mapper/VG-POOL_tmeta``;
- ``QUBES_DMSETUP``, ``QUBES_THIN_DUMP``: the commands for a thin pool's metadata snapshot and its dump
  (``dmsetup``, ``thin_dump``; simulation: the sim's stand-ins over ``DIR/dom0/dev``), see thinmap.py.
"""

from __future__ import annotations

import os
import pwd
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from qubes_backup_dom0.errors import BackupError

QUBES_ROOT = "/var/lib/qubes"
REAL_ADMIN_SOCKET = "/var/run/qubesd.sock"
REAL_RPC_DIR = "/etc/qubes-rpc"
REAL_DEV_DIR = "/dev"
SIM_ADMIN_SOCKET = "var/run/qubesd.sock"  # under DIR/dom0


def sim_python(module: str) -> list[str]:
    """argv running a simulation module's ``main()`` in a bare interpreter (``-S``: no site-packages, whose
    editable-install hooks cost ~20 ms per process; the sim's helpers need only the standard library), the
    sim package found through its own location.  An lvm call is one process, a backup makes two per volume."""
    try:
        import qubes_backup_sim
    except ImportError:
        return [sys.executable, "-m", module]
    parent = str(Path(qubes_backup_sim.__file__).resolve().parent.parent)
    code = f"import sys; sys.path.insert(0, {parent!r}); from {module} import main; sys.exit(main())"
    return [sys.executable, "-S", "-c", code]


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

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> System:
        env = dict(os.environ) if env is None else env
        names = ("QUBES_ADMIN_SOCKET", "QUBES_RPC_DIR", "QUBES_LVM", "QUBES_DEV_DIR", "QUBES_DMSETUP",
                 "QUBES_THIN_DUMP")
        overrides = tuple(env.get(k) or None for k in names)
        sim = env.get("QUBES_SIM")
        if sim:
            sim_dir = Path(sim).resolve()
            return cls(sim_dir, sim_dir / "dom0", env.get("QUBES_SIM_USER", "user"), *overrides)
        user = env.get("SUDO_USER") or env.get("USER") or pwd.getpwuid(os.getuid()).pw_name
        return cls(None, Path("/"), user, *overrides)

    # -- endpoints ----------------------------------------------------------------------------------------
    def admin_socket(self, start: bool = True) -> Path:
        """qubesd's socket.  In simulation (without an override) the simulated qubesd is started on demand."""
        if self.admin_socket_override:
            return Path(self.admin_socket_override)
        if self.sim_dir is None:
            return Path(REAL_ADMIN_SOCKET)
        if not start:
            return self.dom0_root / SIM_ADMIN_SOCKET
        try:
            from qubes_backup_sim.launch import ensure_qubesd  # only the simulation needs it
        except ImportError as exc:
            raise BackupError(f"QUBES_SIM is set but the simulation package is not installed ({exc})") from None
        return Path(ensure_qubesd(self.sim_dir))

    @property
    def rpc_dir(self) -> Path:
        """Where dom0's qrexec services are (``admin.vm.volume.ImportWithSize``)."""
        if self.rpc_dir_override:
            return Path(self.rpc_dir_override)
        if self.sim_dir is None:
            return Path(REAL_RPC_DIR)
        try:
            import qubes_backup_sim
        except ImportError as exc:
            raise BackupError(f"QUBES_SIM is set but the simulation package is not installed ({exc})") from None
        return Path(qubes_backup_sim.__file__).resolve().parent / "rpc"

    def _command(self, override: str | None, variable: str, real: str, sim: list[str]) -> list[str]:
        if override:
            try:
                argv = shlex.split(override)
            except ValueError as exc:
                raise BackupError(f"{variable} cannot be split into words: {exc}") from None
            if not argv:
                raise BackupError(f"{variable} is empty")
            return argv
        return [real] if self.sim_dir is None else sim

    @property
    def lvm_argv(self) -> list[str]:
        """The command run for LVM operations (several words allowed, never a shell)."""
        sim = [*sim_python("qubes_backup_sim.lvm"), str(self.dom0_root / "dev")]
        return self._command(self.lvm_override, "QUBES_LVM", "lvm", sim)

    @property
    def dmsetup_argv(self) -> list[str]:
        """``dmsetup`` (only its ``message POOL-tpool 0 reserve/release_metadata_snap`` is used)."""
        sim = [*sim_python("qubes_backup_sim.thintools"), str(self.dom0_root / "dev"), "dmsetup"]
        return self._command(self.dmsetup_override, "QUBES_DMSETUP", "dmsetup", sim)

    @property
    def thin_dump_argv(self) -> list[str]:
        sim = [*sim_python("qubes_backup_sim.thintools"), str(self.dom0_root / "dev"), "thin_dump"]
        return self._command(self.thin_dump_override, "QUBES_THIN_DUMP", "thin_dump", sim)

    @property
    def dev_dir(self) -> Path:
        if self.dev_dir_override:
            return Path(self.dev_dir_override)
        return Path(REAL_DEV_DIR) if self.sim_dir is None else self.dom0_root / "dev"

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
        return self.dom0_root / "home" / self.user

    def vm_root(self, name: str) -> Path:
        """The filesystem root of VM ``name`` in simulation."""
        if self.sim_dir is None:
            raise RuntimeError("vm_root is only meaningful in simulation")
        return self.sim_dir / "vms" / name
