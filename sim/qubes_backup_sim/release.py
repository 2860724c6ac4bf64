"""Which Qubes release a simulated system is: R4.2 or R4.3 (the default, the current release).

A simulated dom0 says it as a real one does, in ``DIR/dom0/etc/qubes-release`` (``Qubes release 4.3.0
(R4.3)``), written by simgen (``--release``); the simulated qubesd reads it at start (``--release`` overrides
it) and serves that release's Admin API.  The dom0 code never reads the file: it tells the release from
qubesd's answers, as it must on a real dom0.

What differs between the two, as qubes-core-admin's ``release4.2`` / ``release4.3`` branches have it
(``qubes/api/admin.py``, ``qubes/devices.py``, ``qubes/device_protocol.py``, ``qubes/vm/__init__.py``):

- ``admin.vm.List``: R4.3 adds ``uuid=UUID`` to every line (dom0's is all zeros);
- devices: R4.2 ``admin.vm.device.CLASS.List`` / ``Attach`` (``persistent=True`` + options) / ``Detach`` /
  ``Set.persistent``; R4.3 ``…Assigned`` / ``…Attached`` / ``…Assign`` (a serialized assignment with a
  mode) / ``…Unassign`` / ``Attach`` (running VMs only) / ``Detach`` / ``Set.assignment``; qubes.xml's
  ``<device>`` gets ``mode`` and ``identity`` attributes in R4.3;
- ``admin.vm.notes.Get`` / ``Set`` exist in R4.3 only;
- VM properties ``bootmode``, ``devices_denied``, ``stubdom_uuid`` (and ``appvm_default_bootmode`` of
  templates) exist in R4.3 only.
"""

from __future__ import annotations

import re
from pathlib import Path

RELEASES = ("4.2", "4.3")
DEFAULT = "4.3"
RELEASE_FILE = "etc/qubes-release"
_TEXT = {"4.2": "Qubes release 4.2.4 (R4.2)\n", "4.3": "Qubes release 4.3.0 (R4.3)\n"}
_RE = re.compile(r"\(R(4\.[23])\)")


def check(release: str) -> str:
    if release not in RELEASES:
        raise ValueError(f"unknown Qubes release {release!r} (one of {', '.join(RELEASES)})")
    return release


def write_release(dom0: Path, release: str) -> None:
    path = Path(dom0) / RELEASE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_TEXT[check(release)])


def read_release(dom0: Path) -> str:
    """The release of a simulated dom0 (``DEFAULT`` for a system built before releases were simulated)."""
    try:
        text = (Path(dom0) / RELEASE_FILE).read_text()
    except FileNotFoundError:
        return DEFAULT
    m = _RE.search(text)
    if m is None:
        raise ValueError(f"{Path(dom0) / RELEASE_FILE}: not a Qubes R4.2 or R4.3 release line")
    return m.group(1)
