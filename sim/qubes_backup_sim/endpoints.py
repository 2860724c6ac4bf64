"""How dom0's code reaches a simulated system: its endpoints, written by simgen into ``DIR/sim-endpoints.json``.

dom0's package never imports this one (it is not installed in dom0).  With ``QUBES_SIM=DIR`` it reads this file
and uses what it names exactly as it uses a real dom0's endpoints:

- ``qubesd``: argv that starts the simulated qubesd for a system if none answers (``DIR`` is appended; it prints
  the socket and exits; the server stays, detached) -- on a real dom0 qubesd is always running;
- ``lvm``: argv of the ``lvm`` stand-in (``DIR/dom0/dev`` is appended, then lvm's own arguments);
- ``thintools``: argv of the ``dmsetup`` / ``thin_dump`` stand-ins (``DIR/dom0/dev`` and the tool's name are
  appended, then its arguments);
- ``rpc_dir``: dom0's qrexec services of the simulation (``admin.vm.volume.ImportWithSize``);
- ``vm_rpc_dir``: services a simulated VM offers besides the agent's (``qubes.BackupPassphrase``).

The interpreter is the one that generated the system; the lvm and thin-tools helpers run without site-packages
(``-S``: their editable-install hooks cost ~20 ms per process, and an lvm call is one process, a backup makes two
per volume), finding this package through its own location.  Everything inside DIR is found relative to DIR, so a copied
system works.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .store import SOCKET

FILE = "sim-endpoints.json"
VERSION = 1
PACKAGE = Path(__file__).resolve().parent


def python_argv(module: str) -> list[str]:
    """argv running ``module``'s ``main()`` (which reads sys.argv) in a bare interpreter."""
    code = f"import sys; sys.path.insert(0, {str(PACKAGE.parent)!r}); from {module} import main; sys.exit(main())"
    return [sys.executable, "-S", "-c", code]


def endpoints() -> dict[str, object]:
    return {
        "version": VERSION,
        "qubesd": [sys.executable, "-m", "qubes_backup_sim.launch"],  # once per system: site-packages are fine
        "socket": SOCKET,
        "lvm": python_argv("qubes_backup_sim.lvm"),
        "thintools": python_argv("qubes_backup_sim.thintools"),
        "rpc_dir": str(PACKAGE / "rpc"),
        "vm_rpc_dir": str(PACKAGE / "vm-rpc"),
    }


def write(sim_dir: Path) -> Path:
    """Write ``sim_dir/sim-endpoints.json`` (atomically) and return its path."""
    path = Path(sim_dir) / FILE
    tmp = path.with_name(f".{FILE}.tmp")
    tmp.write_text(json.dumps(endpoints(), indent=2) + "\n")
    os.replace(tmp, path)
    return path
