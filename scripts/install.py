#!/usr/bin/env python3
"""`make install-dom0|install-vm|uninstall-dom0|uninstall-vm`: installs that coexist with Qubes' own packages.

Nothing here runs pip or needs the network: the three packages are copied as plain source into one directory
of our own, LIBDIR (default /usr/local/lib/qubes-backup), laid out like this repository (LIBDIR/protocol,
LIBDIR/dom0, LIBDIR/vm-agent, LIBDIR/rpc-policy), so the dom0 code finds the agent for a restore from a dom0
file exactly as it does in the source tree.  The commands (BINDIR) and the qrexec services (SERVICEDIR) are
small generated wrappers that find LIBDIR relative to themselves, so an install under DESTDIR works from there
too.  Dependencies (construct, cryptography, lxml, zstandard, yaml) come from the system's own packages.

Every file written is listed in LIBDIR/installed-SIDE.manifest (with the directories the install created);
uninstall removes exactly those.  An install never replaces a file it did not install itself (neither side's
manifest lists it), and refuses Qubes' own paths outright.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIDES = ("dom0", "vm")
# Files Qubes' own packages install (qubes-core-admin-client in dom0, qubes-core-agent in templates).
QUBES_OWNED = frozenset(
    (
        "/usr/bin/qvm-backup",
        "/usr/bin/qvm-backup-restore",
        "/etc/qubes-rpc/qubes.Backup",
        "/etc/qubes-rpc/qubes.Restore",
    )
)
POLICY = "50-qubes-backup.policy"  # no Qubes package ships a policy of this name (they use 35-90 + Qubes names)
DEPENDENCIES = {
    "dom0": ("construct", "cryptography", "lxml", "zstandard", "yaml"),
    "vm": ("construct",),
}
# Only qubes.RestoreParanoid needs these in a VM (the template of a paranoid restore's DisposableVMs).
PARANOID_DEPENDENCIES = ("cryptography", "lxml", "zstandard")
SERVICES = {"dom0": ("qubes.Backup", "qubes.Restore"), "vm": ("qubes.Backup", "qubes.Restore", "qubes.RestoreParanoid")}
RPM_NAMES = {"yaml": "python3-pyyaml"}  # the module a package provides, where the names differ

COMMAND = '''#!{python} -s
"""{name} of qubes-backup (`make install-dom0`, docs/INSTALL.md); Qubes' own is /usr/bin/{name}."""

import os
import sys

LIB = os.path.normpath(os.path.join(os.path.dirname(os.path.realpath(__file__)), {rel!r}))
sys.path[:0] = [p for p in (os.path.join(LIB, d) for d in {dirs!r}) if os.path.isdir(p)]

from {module} import main  # noqa: E402

sys.exit(main())
'''

SERVICE = '''#!{python} -s
"""{name} qrexec service of qubes-backup (`make install-vm`, docs/INSTALL.md).

qrexec finds it before Qubes' own /etc/qubes-rpc/{name}; requests in Qubes' protocol are handed to that one.
"""

import os
import runpy
import sys

LIB = os.path.normpath(os.path.join(os.path.dirname(os.path.realpath(__file__)), {rel!r}))
sys.path[:0] = [os.path.join(LIB, "protocol"), os.path.join(LIB, "vm-agent")]
runpy.run_path(os.path.join(LIB, "rpc-policy", {name!r}), run_name="__main__")
'''


class InstallError(Exception):
    pass


def packages(side: str) -> list[str]:
    """Source package directories (relative to the repo) a side needs."""
    # dom0 restores from a dom0 file by running the agent's qubes.Restore itself (qubes/transport.py), so the agent
    # comes too; a VM gets the dom0 package's parsing modules for qubes.RestoreParanoid (a paranoid restore's
    # DisposableVM).  Never the simulator: the installed commands reach a simulated system (QUBES_SIM) through the
    # endpoints its generator wrote (DIR/sim-endpoints.json), as they reach a real dom0's.
    return ["protocol/qubes_backup_protocol", "dom0/qubes_backup_dom0", "vm-agent/qubes_backup_agent"]


def plan(side: str, a: argparse.Namespace) -> dict[str, tuple[bytes, int]]:
    """Final path (without DESTDIR) -> (content, mode) of every file the side installs."""
    files: dict[str, tuple[bytes, int]] = {}
    lib = a.libdir
    for pkg in packages(side):
        for src in sorted((REPO / pkg).rglob("*.py")):
            if "__pycache__" not in src.parts:
                files[f"{lib}/{src.relative_to(REPO)}"] = (src.read_bytes(), 0o644)
    for service in SERVICES[side]:
        files[f"{lib}/rpc-policy/{service}"] = ((REPO / "rpc-policy" / service).read_bytes(), 0o755)
    if side == "dom0":
        rel = os.path.relpath(lib, a.bindir)
        dirs = ("protocol", "dom0")
        for name, module in (("qvm-backup", "qubes_backup_dom0.cli.backup"),
                             ("qvm-backup-restore", "qubes_backup_dom0.cli.restore"),
                             ("qvm-backup-prune", "qubes_backup_dom0.cli.prune")):  # fmt: skip
            text = COMMAND.format(python=a.python, name=name, rel=rel, dirs=dirs, module=module)
            files[f"{a.bindir}/{name}"] = (text.encode(), 0o755)
        files[f"{a.policydir}/{POLICY}"] = ((REPO / "rpc-policy" / POLICY).read_bytes(), 0o644)
    else:
        rel = os.path.relpath(lib, a.servicedir)
        for name in SERVICES[side]:
            files[f"{a.servicedir}/{name}"] = (SERVICE.format(python=a.python, name=name, rel=rel).encode(), 0o755)
    return files


def manifest_path(side: str, a: argparse.Namespace) -> str:
    return f"{a.libdir}/installed-{side}.manifest"


def read_manifest(path: Path) -> tuple[list[str], list[str]]:
    """(files, directories created) from a manifest; empty when there is none."""
    files: list[str] = []
    dirs: list[str] = []
    if not path.is_file():
        return files, dirs
    for line in path.read_text().splitlines():
        kind, _, name = line.partition(" ")
        (files if kind == "f" else dirs).append(name)
    return files, dirs


def here(destdir: str, path: str) -> Path:
    return Path(destdir + path) if destdir else Path(path)


def install(side: str, a: argparse.Namespace) -> None:
    files = plan(side, a)
    mpath = manifest_path(side, a)
    ours: set[str] = {mpath}
    for s in SIDES:
        listed, _ = read_manifest(here(a.destdir, manifest_path(s, a)))
        ours.update(listed)
    for path in sorted(files):
        if path in QUBES_OWNED:
            raise InstallError(f"{path} belongs to Qubes' own packages: not installing over it (use PREFIX=/usr/local)")
        target = here(a.destdir, path)
        if (target.exists() or target.is_symlink()) and path not in ours:
            raise InstallError(f"{target} exists and was not installed by qubes-backup: not overwriting it")
    if a.destdir:
        Path(a.destdir).mkdir(parents=True, exist_ok=True)
    created: list[str] = []
    old_files, old_dirs = read_manifest(here(a.destdir, mpath))
    for path in sorted({os.path.dirname(p) for p in [*files, mpath]}):
        missing = []
        d = path
        while d not in ("/", "") and not here(a.destdir, d).exists():
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            here(a.destdir, d).mkdir(mode=0o755)
            created.append(d)
    for path, (data, mode) in sorted(files.items()):
        target = here(a.destdir, path)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        print(f"installed {target}")
    # Files of an earlier install of this side that this one no longer has.
    for path in old_files:
        if path not in files and path != mpath:
            remove_file(here(a.destdir, path))
    dirs = sorted(set(old_dirs) | set(created))
    lines = [f"f {p}" for p in sorted(files)] + [f"d {d}" for d in dirs]
    here(a.destdir, mpath).write_text("\n".join(lines) + "\n")
    os.chmod(here(a.destdir, mpath), 0o644)
    print(f"installed {here(a.destdir, mpath)} (what `make uninstall-{side}` removes)")
    if not a.destdir:
        check_dependencies(side, a.python)


def check_dependencies(side: str, python: str) -> None:
    missing = []
    for mod in DEPENDENCIES[side]:
        r = subprocess.run([python, "-c", f"import {mod}"], capture_output=True)
        if r.returncode:
            missing.append(mod)
    if missing:
        rpms = " ".join(RPM_NAMES.get(m, f"python3-{m}") for m in missing)
        print(f"warning: {python} cannot import {', '.join(missing)}: install {rpms} (docs/INSTALL.md)",
              file=sys.stderr)  # fmt: skip
    if side == "vm":
        paranoid = [m for m in PARANOID_DEPENDENCIES
                    if subprocess.run([python, "-c", f"import {m}"], capture_output=True).returncode]  # fmt: skip
        if paranoid:
            print(f"note: {python} cannot import {', '.join(paranoid)}: needed only where qubes.RestoreParanoid "
                  "runs (the template of a paranoid restore's DisposableVMs, docs/INSTALL.md)", file=sys.stderr)


def remove_file(target: Path) -> None:
    if target.is_file() or target.is_symlink():
        target.unlink()
        print(f"removed {target}")
    if target.suffix == ".py":  # bytecode Python wrote next to it when the installed code ran
        for pyc in target.parent.glob(f"__pycache__/{target.stem}.*.pyc"):
            pyc.unlink()
        cache = target.parent / "__pycache__"
        if cache.is_dir() and not any(cache.iterdir()):
            cache.rmdir()


def uninstall(side: str, a: argparse.Namespace) -> None:
    mpath = manifest_path(side, a)
    files, dirs = read_manifest(here(a.destdir, mpath))
    if not files:
        print(f"nothing to uninstall: no {here(a.destdir, mpath)}")
        return
    keep: set[str] = set()
    for other in SIDES:
        if other != side:
            other_files, other_dirs = read_manifest(here(a.destdir, manifest_path(other, a)))
            keep.update(other_files, other_dirs, {manifest_path(other, a)})
    for path in files:
        if path not in keep:
            remove_file(here(a.destdir, path))
    here(a.destdir, mpath).unlink()
    for d in sorted(dirs, key=len, reverse=True):
        target = here(a.destdir, d)
        if d not in keep and target.is_dir() and not any(target.iterdir()):
            target.rmdir()
    print(f"uninstalled qubes-backup ({side})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="install.py", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("install", "uninstall"))
    p.add_argument("side", choices=SIDES)
    p.add_argument("--destdir", default="")
    p.add_argument("--bindir", required=True)
    p.add_argument("--libdir", required=True)
    p.add_argument("--servicedir", required=True)
    p.add_argument("--policydir", required=True)
    p.add_argument("--python", required=True, help="the interpreter the installed commands run with")
    a = p.parse_args(argv)
    a.destdir = a.destdir.rstrip("/")
    for key in ("bindir", "libdir", "servicedir", "policydir"):
        value = os.path.normpath(getattr(a, key))
        if not os.path.isabs(value):
            p.error(f"--{key} must be an absolute path: {value}")
        setattr(a, key, value)
    try:
        (install if a.action == "install" else uninstall)(a.side, a)
    except (InstallError, OSError) as exc:
        print(f"install.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
