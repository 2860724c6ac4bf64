#!/usr/bin/env python3
"""`make packages`: the three packages of a release, built from one source tarball, into dist/.

    dist/qubes-backup-agent_VERSION_all.deb        Debian templates (dpkg-buildpackage, packaging/debian)
    dist/qubes-backup-agent-VERSION-1.noarch.rpm   Fedora templates (rpmbuild, packaging/qubes-backup-agent.spec.in)
    dist/qubes-backup-dom0-VERSION-1.noarch.rpm    dom0 (rpmbuild, packaging/qubes-backup-dom0.spec.in)

The source tarball (BUILD/qubes-backup-VERSION.tar.gz) holds what the packages are made of: protocol/,
vm-agent/, dom0/, rpc-policy/, packaging/, README.md, docs/ (no simulator, no tests).  Both formats build on
a Debian system (apt-get install rpm debhelper dh-python; .ci/run does) and on Fedora (dnf install rpm-build
dpkg-dev debhelper dh-python).  VERSION is the packages' __version__, which must agree everywhere.
"""

from __future__ import annotations

import argparse
import email.utils
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
# What the source tarball holds (relative to the repository).
SOURCE_PATHS = ("protocol", "vm-agent", "dom0", "rpc-policy", "packaging", "docs", "README.md")
VERSION_FILES = (
    "protocol/qubes_backup_protocol/__init__.py",
    "vm-agent/qubes_backup_agent/__init__.py",
    "dom0/qubes_backup_dom0/__init__.py",
)
PYPROJECTS = ("protocol/pyproject.toml", "vm-agent/pyproject.toml", "dom0/pyproject.toml")
VERSION_RE = re.compile(r'^__version__ = "([0-9]+\.[0-9]+\.[0-9]+)"', re.M)
PYPROJECT_RE = re.compile(r'^version = "([^"]+)"', re.M)
TOOLS = {
    "dpkg-buildpackage": "apt-get install dpkg-dev debhelper dh-python (Fedora: dnf install dpkg-dev debhelper)",
    "dh": "apt-get install debhelper dh-python",
    "rpmbuild": "apt-get install rpm (Fedora: dnf install rpm-build)",
}


class BuildError(Exception):
    pass


def version() -> str:
    """The project's version: every package's __version__ and pyproject.toml agree on it."""
    found: dict[str, str] = {}
    for rel in VERSION_FILES:
        m = VERSION_RE.search((REPO / rel).read_text())
        if not m:
            raise BuildError(f'{rel} has no __version__ = "X.Y.Z"')
        found[rel] = m.group(1)
    for rel in PYPROJECTS:
        m = PYPROJECT_RE.search((REPO / rel).read_text())
        if m:
            found[rel] = m.group(1)
    if len(set(found.values())) != 1:
        raise BuildError("the versions disagree: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    return next(iter(found.values()))


def names(ver: str) -> dict[str, str]:
    """Package kind -> the file name it is built into."""
    return {
        "deb": f"qubes-backup-agent_{ver}_all.deb",
        "agent-rpm": f"qubes-backup-agent-{ver}-1.noarch.rpm",
        "dom0-rpm": f"qubes-backup-dom0-{ver}-1.noarch.rpm",
    }


def _wanted(rel: Path) -> bool:
    parts = rel.parts
    return not any(p == "__pycache__" or p.endswith((".egg-info", ".pyc")) or p.startswith(".") for p in parts)


def source_tarball(ver: str, build: Path) -> Path:
    """BUILD/qubes-backup-VER.tar.gz with the files of SOURCE_PATHS under qubes-backup-VER/."""
    top = f"qubes-backup-{ver}"
    out = build / f"{top}.tar.gz"
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    members: list[Path] = []
    for name in SOURCE_PATHS:
        path = REPO / name
        if path.is_file():
            members.append(path)
        else:
            members += [p for p in sorted(path.rglob("*")) if p.is_file() and _wanted(p.relative_to(REPO))]

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        if epoch:
            info.mtime = min(info.mtime, int(epoch))
        return info

    with tarfile.open(out, "w:gz") as tar:
        for path in members:
            tar.add(path, f"{top}/{path.relative_to(REPO)}", recursive=False, filter=normalise)
    return out


def unpack(tarball: Path, into: Path) -> Path:
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4+
            tar.extractall(into, filter="data")
        else:
            tar.extractall(into)  # our own tarball, just written
    (top,) = into.iterdir()
    return top


def run(argv: list[str], cwd: Path, log: Path) -> None:
    with log.open("w") as out:
        r = subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if r.returncode:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise BuildError(f"{argv[0]} failed (exit {r.returncode}; full log {log}):\n" + "\n".join(tail))


def changelog(ver: str) -> str:
    when = email.utils.formatdate(int(os.environ.get("SOURCE_DATE_EPOCH") or time.time()))
    return (
        f"qubes-backup ({ver}) unstable; urgency=medium\n\n"
        f"  * qubes-backup {ver} (built by make packages; the project's history is its git log).\n\n"
        f" -- qubes-backup developers <qubes-backup@localhost>  {when}\n"
    )


def build_deb(ver: str, tarball: Path, build: Path, dist: Path) -> Path:
    src = unpack(tarball, build / "deb")
    shutil.copytree(src / "packaging" / "debian", src / "debian")
    (src / "debian" / "changelog").write_text(changelog(ver))
    run(["dpkg-buildpackage", "--build=binary", "--no-sign"], src, build / "deb.log")
    built = src.parent / names(ver)["deb"]
    if not built.is_file():
        raise BuildError(f"dpkg-buildpackage made no {built.name}")
    return Path(shutil.copy2(built, dist / built.name))


def _rpm_host() -> bool:
    """True where rpm's own database knows the system's packages (Fedora); False on Debian."""
    return subprocess.run(["rpm", "-q", "rpm"], capture_output=True).returncode == 0


def build_rpm(name: str, ver: str, tarball: Path, build: Path, dist: Path) -> Path:
    top = build / "rpm"
    for d in ("BUILD", "SPECS", "SRPMS", "BUILDROOT"):
        (top / d).mkdir(parents=True, exist_ok=True)
    spec = top / "SPECS" / f"{name}.spec"
    spec.write_text((PACKAGING / f"{name}.spec.in").read_text().replace("@VERSION@", ver))
    argv = [
        "rpmbuild", "-bb", spec.name,
        "--define", f"_topdir {top}",
        "--define", f"_sourcedir {tarball.parent}",
        "--define", f"_rpmdir {dist}",
        "--define", "_build_name_fmt %{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}.rpm",
    ]  # fmt: skip
    if not _rpm_host():
        argv.append("--nodeps")  # BuildRequires are the build host's Debian packages, unknown to rpm's database
    run(argv, top / "SPECS", build / f"{name}.log")
    built = dist / f"{name}-{ver}-1.noarch.rpm"
    if not built.is_file():
        raise BuildError(f"rpmbuild made no {built.name}")
    return built


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="build.py", description=__doc__.splitlines()[0])
    p.add_argument("--dist", type=Path, default=REPO / "dist", help="where the packages go (dist/)")
    p.add_argument("--build", type=Path, default=REPO / "build" / "packages", help="scratch directory")
    a = p.parse_args(argv)
    try:
        missing = [f"{tool} ({how})" for tool, how in TOOLS.items() if shutil.which(tool) is None]
        if missing:
            raise BuildError("missing " + "; ".join(missing) + " — bash .ci/run installs them")
        ver = version()
        shutil.rmtree(a.build, ignore_errors=True)
        a.build.mkdir(parents=True)
        a.dist.mkdir(parents=True, exist_ok=True)
        for stale in names(ver).values():
            (a.dist / stale).unlink(missing_ok=True)
        tarball = source_tarball(ver, a.build)
        built = [build_deb(ver, tarball, a.build, a.dist)]
        for name in ("qubes-backup-agent", "qubes-backup-dom0"):
            built.append(build_rpm(name, ver, tarball, a.build, a.dist))
    except (BuildError, OSError) as exc:
        print(f"build.py: error: {exc}", file=sys.stderr)
        return 1
    for path in built:
        print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
