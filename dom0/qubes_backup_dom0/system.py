"""Where things live: a real Qubes dom0, or the simulation selected by QUBES_SIM=DIR.

In simulation dom0's filesystem root is ``DIR/dom0`` and VM NAME's is ``DIR/vms/NAME``.  Every path a user
gives is interpreted inside the machine it belongs to, so the same command line works on both.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path

QUBES_ROOT = "/var/lib/qubes"


@dataclass(frozen=True)
class System:
    sim_dir: Path | None  # None on a real Qubes system
    dom0_root: Path  # "/" on a real system
    user: str

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> System:
        env = dict(os.environ) if env is None else env
        sim = env.get("QUBES_SIM")
        if sim:
            sim_dir = Path(sim).resolve()
            return cls(sim_dir, sim_dir / "dom0", env.get("QUBES_SIM_USER", "user"))
        user = env.get("SUDO_USER") or env.get("USER") or pwd.getpwuid(os.getuid()).pw_name
        return cls(None, Path("/"), user)

    @property
    def simulated(self) -> bool:
        return self.sim_dir is not None

    def dom0_path(self, path: str | os.PathLike[str]) -> Path:
        """A dom0 path as given by the user (absolute, or relative to dom0's working directory)."""
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
