"""Start the simulated qubesd on demand: ``ensure_qubesd(DIR)`` returns its socket, ``stop_qubesd(DIR)`` ends it.

The server runs detached (its own session, output to ``DIR/dom0/var/log/qubesd-sim.log``) and exits by itself
after its idle time or when DIR disappears, so tests and the demo need no teardown; an flock on
``DIR/dom0/var/run/qubesd.lock`` makes concurrent callers start one server only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .store import SOCKET

LOCK = "var/run/qubesd.lock"
PIDFILE = "var/run/qubesd-sim.pid"
LOG = "var/log/qubesd-sim.log"
START_TIMEOUT = 15.0


class LaunchError(RuntimeError):
    """The simulated qubesd could not be started (message names the log file)."""


def _accepts(sock: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2.0)
        s.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        s.close()


def ensure_qubesd(sim_dir: Path, socket_path: Path | None = None, *, host_paths: bool = False,
                  log: Path | None = None, idle: float | None = None, release: str | None = None) -> Path:  # fmt: skip
    """The socket of a running simulated qubesd for ``sim_dir``, started if none answers (``release``:
    serve that release's API instead of the system's own, see release.py)."""
    sim_dir = Path(sim_dir).resolve()
    dom0 = sim_dir / "dom0"
    sock = Path(socket_path) if socket_path is not None else dom0 / SOCKET
    if _accepts(sock):
        return sock
    if not (dom0 / "var/lib/qubes/qubes.xml").is_file():
        raise LaunchError(f"{sim_dir} is not a simulated Qubes system (no dom0/var/lib/qubes/qubes.xml)")
    (dom0 / "var/run").mkdir(parents=True, exist_ok=True)
    (dom0 / "var/log").mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(dom0 / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if _accepts(sock):
            return sock
        argv = [sys.executable, "-m", "qubes_backup_sim.qubesd", str(sim_dir), "--socket", str(sock)]
        if host_paths:
            argv.append("--host-paths")
        if log is not None:
            argv += ["--log", str(log)]
        if idle is not None:
            argv += ["--idle", str(idle)]
        if release is not None:
            argv += ["--release", release]
        logfile = dom0 / LOG
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True, close_fds=True)  # fmt: skip
        (dom0 / PIDFILE).write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepts(sock):
            if proc.poll() is not None:
                raise LaunchError(f"simulated qubesd exited with status {proc.returncode}; see {logfile}")
            if time.monotonic() > deadline:
                proc.kill()
                raise LaunchError(f"simulated qubesd did not start within {START_TIMEOUT:.0f}s; see {logfile}")
            time.sleep(0.02)
        return sock
    finally:
        os.close(lock_fd)


def stop_qubesd(sim_dir: Path, timeout: float = 5.0) -> None:
    """Stop the simulated qubesd started for ``sim_dir`` (if any) and wait until it is gone."""
    dom0 = Path(sim_dir).resolve() / "dom0"
    pidfile = dom0 / PIDFILE
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    cmdline = b""
    with contextlib.suppress(OSError):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    if b"qubes_backup_sim.qubesd" in cmdline and str(Path(sim_dir).resolve()).encode() in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.02)
    pidfile.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """``DIR``: make sure the simulated qubesd of DIR runs and print its socket (what dom0's code runs when no
    qubesd answers on the socket: sim-endpoints.json ``qubesd``)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: launch DIR", file=sys.stderr)
        return 2
    try:
        print(ensure_qubesd(Path(args[0])))
    except (LaunchError, OSError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
