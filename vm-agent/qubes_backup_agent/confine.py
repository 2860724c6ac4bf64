"""Path confinement: a location given by dom0 is interpreted inside the VM and may not leave its root.

In a real VM the root is ``/``.  In the simulation the agent runs on the host with ``QUBES_AGENT_ROOT`` set to
the VM's directory, so a stray ``..`` or a symlink must not reach the host (and dom0's files) from there.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

VM_USER = "user"


class ConfinementError(Exception):
    """A location that would resolve outside the VM root."""


def agent_root() -> Path:
    """The VM's filesystem root (``/`` on a real VM)."""
    return Path(os.path.realpath(os.environ.get("QUBES_AGENT_ROOT", "/")))


def home_dir(root: Path) -> Path:
    """Where relative locations and hooks start: the VM user's home, else the root."""
    home = root / "home" / VM_USER
    return home if home.is_dir() else root


def is_inside(path: str | Path, root: Path) -> bool:
    root_s = str(root)
    path_s = str(path)
    return root_s == "/" or path_s == root_s or path_s.startswith(root_s.rstrip("/") + "/")


def vm_view(path: Path, root: Path) -> str:
    """The path as a user inside the VM sees it (for messages and DONE)."""
    if str(root) == "/":
        return str(path)
    rel = os.path.relpath(path, root)
    return "/" if rel == "." else "/" + rel


def resolve(location: str, root: Path | None = None) -> Path:
    """Map a VM path to a host path under ``root``, refusing ``..`` escapes and symlinks leading out.

    The result is fully resolved (symlinks followed); it need not exist, but whatever part exists is checked.
    """
    root = agent_root() if root is None else root
    if "\0" in location or not location:
        raise ConfinementError("invalid path")
    if location == "~" or location.startswith("~/"):
        location = location[2:] or "."
    if location.startswith("/"):
        rel = location.lstrip("/")
        base = root
    else:
        base = home_dir(root)
        rel = os.path.relpath(base, root) + "/" + location if base != root else location
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../") or norm.startswith("/"):
        raise ConfinementError(f"path escapes the VM root: {location}")
    joined = root if norm == "." else root / norm
    real = Path(os.path.realpath(joined))
    if not is_inside(real, root):
        raise ConfinementError(f"path leads outside the VM root: {location}")
    return real
