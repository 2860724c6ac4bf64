"""A scratch root that dpkg, rpm and the packages' own scripts treat as ``/`` (for tests/test_packages.py).

``ScratchRoot(dir)`` makes ``dir`` a small system: its ``/usr/bin``, ``/usr/lib``, ``/etc`` ... are real directories
whose entries are links to this machine's (``/.host/usr/bin/sh`` ...), and the host's root is bound read-only at
``/.host`` when something runs inside (bubblewrap: ``dir`` is ``/``, no chroot or privilege needed).  So dpkg,
rpm, their maintainer scripts, systemd-tmpfiles, py3compile and the installed agent (with this machine's
``/usr/bin/python3`` and its Debian packages, as in a template) run for real, and everything they write lands in
``dir``: a fresh dpkg and rpm database, ``/usr/lib/qubes-backup``, ``/etc/profile.d``, ``/run/qubes-rpc`` ...

The directories a package writes into (WRITABLE) are real directories, the rest of the tree links to the host;
EMPTY ones start empty (not the host's /etc/profile.d ...), so the tests see only what the packages put there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

HOST = "/.host"
# Where the packages under test (or their package managers) write: real directories in the scratch root.
WRITABLE = (
    "/usr/bin",  # Qubes' own /usr/bin/qvm-backup stand-in goes here
    "/usr/lib/tmpfiles.d",
    "/usr/share/doc",
    "/usr/share/python3/runtime.d",
    "/etc/profile.d",
    "/etc/sudoers.d",
    "/etc/qubes",
    "/etc/qubes-rpc",
    "/etc/tmpfiles.d",
    "/etc/dpkg",
    "/var/lib/dpkg",
    "/var/lib/rpm",
    "/var/tmp",
    "/var/log",
    "/usr/local",
    "/run",
    "/tmp",
    "/root",
    "/home",
)
# Real and empty (not the host's): what the tests must see on their own.
EMPTY = ("/etc/profile.d", "/etc/sudoers.d", "/etc/tmpfiles.d", "/etc/dpkg", "/etc/qubes", "/etc/qubes-rpc",
         "/usr/lib/tmpfiles.d", "/usr/local", "/var/lib/dpkg", "/var/lib/rpm", "/run", "/tmp", "/root",
         "/var/log", "/var/tmp", "/usr/share/doc", "/home")  # fmt: skip
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def missing_tools() -> list[str]:
    return [t for t in ("bwrap", "dpkg", "rpm", "systemd-tmpfiles") if shutil.which(t) is None]


class ScratchRoot:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._farm("/")
        for rel in EMPTY:
            self.path(rel).mkdir(parents=True, exist_ok=True)
        status = self.path("/var/lib/dpkg")
        for d in ("info", "updates", "triggers"):
            (status / d).mkdir(exist_ok=True)
        for f in ("status", "available"):
            (status / f).touch()

    # -- building ------------------------------------------------------------------------------------------
    def _farm(self, rel: str) -> None:
        """Make ``rel`` a real directory whose host entries are links, except on the way to WRITABLE."""
        here = self.path(rel)
        here.mkdir(exist_ok=True)
        if rel in EMPTY:
            return
        for entry in sorted(os.listdir(rel)):
            child = f"{rel.rstrip('/')}/{entry}"
            host = Path(child)
            if child in ("/proc", "/sys", "/dev", HOST):
                continue
            on_the_way = any(w == child or w.startswith(child + "/") for w in WRITABLE)
            if on_the_way and host.is_dir() and not host.is_symlink():
                self._farm(child)
            elif rel == "/" and host.is_symlink():
                os.symlink(os.readlink(host), here / entry)  # /bin -> usr/bin: the same inside
            else:
                os.symlink(f"{HOST}{child}", here / entry)

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def write(self, rel: str, text: str, mode: int = 0o644) -> Path:
        target = self.path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            target.unlink()
        target.write_text(text)
        target.chmod(mode)
        return target

    # -- running inside --------------------------------------------------------------------------------------
    def argv(self, binds: tuple[Path, ...] = (), chdir: str = "/") -> list[str]:
        argv = ["bwrap", "--bind", str(self.root), "/", "--ro-bind", "/", HOST, "--dev", "/dev", "--proc", "/proc",
                "--die-with-parent", "--unshare-pid", "--chdir", chdir]  # fmt: skip
        if os.getuid() != 0:
            argv += ["--unshare-user", "--uid", "0", "--gid", "0"]
        for b in binds:
            argv += ["--bind", str(b), str(b)]
        return [*argv, "--"]

    def env(self, **extra: str) -> dict[str, str]:
        env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
        env.update(extra)
        return env

    def run(self, argv: list[str], *, binds: tuple[Path, ...] = (), input: bytes | None = None,
            env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
        return subprocess.run(self.argv(binds) + argv, input=input, capture_output=True,
                              env=env or self.env(), timeout=timeout)  # fmt: skip

    def sh(self, script: str, *args: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
        return self.run(["/bin/sh", "-c", script, "sh", *args], **kw)  # type: ignore[arg-type]

    @staticmethod
    def host_path(path: Path) -> str:
        """How a file of this machine is seen inside."""
        return f"{HOST}{path.resolve()}"

    def files(self) -> dict[str, str]:
        """Every non-directory in the root (its link target, or its mode and size), /.host and mount points
        left out: what installing and removing a package must leave as it found it."""
        out: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = "/" + os.path.relpath(dirpath, self.root).lstrip(".")
            dirnames[:] = [d for d in dirnames if f"{rel.rstrip('/')}/{d}" not in (HOST, "/proc", "/dev")]
            for d in list(dirnames):
                if os.path.islink(os.path.join(dirpath, d)):
                    filenames.append(d)
            for name in filenames:
                full = os.path.join(dirpath, name)
                key = f"{rel.rstrip('/')}/{name}"
                if os.path.islink(full):
                    out[key] = "-> " + os.readlink(full)
                else:
                    st = os.lstat(full)
                    out[key] = f"{st.st_mode:o} {st.st_size}"
        return out

    def dirs(self) -> set[str]:
        return {
            "/" + os.path.relpath(d, self.root).lstrip(".")
            for d, _, _ in os.walk(self.root)
            if not os.path.relpath(d, self.root).startswith((HOST[1:], "proc", "dev"))
        }
