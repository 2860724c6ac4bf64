"""The simulated system's state on disk: qubes.xml (written only here), the run state, dom0 paths.

Layout (docs/SIMULATION.md): dom0's root is ``DIR/dom0``; qubes.xml is ``DIR/dom0/var/lib/qubes/qubes.xml``;
which VMs run is ``DIR/dom0/var/run/qubes-sim/state.json``; simulated LVs live under ``DIR/dom0/dev``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path, PurePosixPath

from qubes_backup_dom0.qubes.qubesxml import Collection

QUBES_XML = "var/lib/qubes/qubes.xml"
RUN_STATE = "var/run/qubes-sim/state.json"
SOCKET = "var/run/qubesd.sock"


def write_atomic(coll: Collection, path: str | os.PathLike[str]) -> None:
    """Replace ``path`` with ``coll`` so readers see the old or the new file, never a torn one, even after a
    crash (temporary file in the same directory, fsync, rename, fsync of the directory)."""
    write_bytes_atomic(coll.to_bytes(), path)


def write_bytes_atomic(data: bytes, path: str | os.PathLike[str]) -> None:
    path = Path(path)
    mode, owner = 0o664, None
    try:
        st = os.stat(path)
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if owner is not None and owner != (os.getuid(), os.getgid()):
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), *owner)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Store:
    """qubes.xml and the run state of one simulation directory."""

    def __init__(self, sim_dir: Path) -> None:
        self.sim_dir = Path(sim_dir).resolve()
        self.dom0 = self.sim_dir / "dom0"
        self.xml_path = self.dom0 / QUBES_XML
        self.state_path = self.dom0 / RUN_STATE
        self.coll = Collection.load(self.xml_path)
        self.running: set[str] = set()
        if self.state_path.is_file():
            raw = json.loads(self.state_path.read_text() or "{}")
            self.running = {str(n) for n in raw.get("running", []) if self.coll.get(str(n)) is not None}

    def host(self, dom0_path: str | PurePosixPath) -> Path:
        """A dom0 path (``/var/lib/qubes/...``) as a host path under ``DIR/dom0``."""
        p = PurePosixPath(dom0_path)
        if not p.is_absolute() or ".." in p.parts:
            raise ValueError(f"not an absolute dom0 path: {dom0_path}")
        return self.dom0 / p.relative_to("/")

    @property
    def devdir(self) -> Path:
        return self.dom0 / "dev"

    def save(self) -> None:
        write_atomic(self.coll, self.xml_path)

    def save_run_state(self) -> None:
        save_run_state(self.dom0, self.running)


def save_run_state(dom0: Path, running: set[str]) -> None:
    path = dom0 / RUN_STATE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(json.dumps({"running": sorted(running)}, indent=1).encode() + b"\n", path)
