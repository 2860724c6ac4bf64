"""Resource bounds (temp space, dom0 peak RSS) and crash safety of restore and backup (issue #4, items 4-5)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from qubes_backup_dom0 import restore
from qubes_backup_dom0.qubesxml import Collection
from qubes_backup_dom0.restore import Restore, RestoreOptions
from qubes_backup_dom0.system import System
from qubes_backup_sim import simgen
from qubes_backup_sim.store import write_atomic

from .harness import BIN, CHUNK, PASSPHRASE, VM, World, clone_target, run_restore, snapshot

RSS_BOUND_MIB = 300


def _allocated(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def test_staging_holds_restored_data_plus_a_few_chunks(world: World) -> None:
    system = clone_target(world, "staging")
    peaks: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        for st in system.qubes_root.glob(restore.STAGING_PREFIX + "*"):
            peaks.append((_allocated(st), done))

    job = Restore(system, world.a_location, PASSPHRASE, source_vm=VM, progress=progress)
    try:
        job.open()
        plan = job.plan()
        job.run()
    finally:
        job.close()
    assert peaks, "the progress callback never saw the staging area"
    worst = max(p for p, _ in peaks)
    assert worst <= plan.data + 4 * CHUNK + (1 << 20), (worst, plan.data)
    assert not list(system.qubes_root.glob(restore.STAGING_PREFIX + "*"))


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def test_dom0_peak_rss_bounded(tmp_path: Path) -> None:
    """A few hundred MiB of VM data (4 GiB apparent) restore with dom0's peak RSS under the bound.

    The multi-GiB measurement belongs to the benchmark (bench/); docs/SECURITY.md gives both.
    """
    src = tmp_path / "src"
    simgen.generate(src, "bench", data_mib=300, apparent_gib=4, pool="file")
    (src / "dom0/pw").write_bytes(PASSPHRASE + b"\n")
    env = {**os.environ, "QUBES_SIM": str(src)}
    subprocess.run([str(BIN / "qvm-backup"), "-q", "-y", "-d", VM, "-p", "/pw", "--kdf-n", "1024", "--weak-kdf-ok",
                    "/home/user/backups"], env=env, check=True, capture_output=True, timeout=300)  # fmt: skip
    (backup,) = (src / "vms" / VM / "home/user/backups").glob("qubes-backup-*")
    dst = tmp_path / "dst"
    fresh = Collection.load(src / "dom0/var/lib/qubes/qubes.xml")
    for dom in list(fresh.domains):
        if dom.name not in ("dom0", VM):
            dom.element.getparent().remove(dom.element)
    (dst / "dom0/var/lib/qubes").mkdir(parents=True)
    (dst / "dom0/home/user").mkdir(parents=True)
    write_atomic(fresh, dst / "dom0/var/lib/qubes/qubes.xml")
    (dst / "dom0/pw").write_bytes(PASSPHRASE + b"\n")
    (dst / "vms" / VM / "home/user/backups").mkdir(parents=True)
    os.link(backup, dst / "vms" / VM / "home/user/backups" / backup.name)
    proc = subprocess.Popen(
        [str(BIN / "qvm-backup-restore"), "-q", "-y", "-d", VM, "-p", "/pw", f"/home/user/backups/{backup.name}"],
        env={**os.environ, "QUBES_SIM": str(dst)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _vm_hwm_kib(proc.pid))
        time.sleep(0.05)
    _out, err = proc.communicate()
    assert proc.returncode == 0, err
    peak_mib = peak / 1024
    print(f"dom0 peak RSS (VmHWM) restoring {backup.stat().st_size >> 20} MiB backup: {peak_mib:.0f} MiB")
    assert 0 < peak_mib < RSS_BOUND_MIB


# ------------------------------------------------------------------------------------------- crash safety

def _child_restore(sim: str, location: str, point: str, k: int) -> None:
    """Runs in a forked child: a restore that dies (os._exit, like SIGKILL: no cleanup) at ``point``."""
    system = System(Path(sim), Path(sim) / "dom0", "user")
    if point == "progress":
        calls = [0]

        def progress(done: int, total: int) -> None:
            calls[0] += 1
            if calls[0] >= k:
                os._exit(9)

        job = Restore(system, location, PASSPHRASE, source_vm=VM, progress=progress)
    else:
        real_rename = os.rename
        seen = [0]

        def rename(a: object, b: object) -> None:
            real_rename(a, b)  # type: ignore[arg-type]
            seen[0] += 1
            if seen[0] >= k:
                os._exit(9)

        if point == "commit":
            restore.os.rename = rename  # type: ignore[assignment]
        else:  # "before-xml": everything moved in, qubes.xml not yet replaced
            Collection.write_atomic = lambda self, path: os._exit(9)  # type: ignore[method-assign]
        job = Restore(system, location, PASSPHRASE, source_vm=VM)
    job.open()
    job.plan()
    job.run()
    os._exit(0)


@pytest.mark.parametrize(("point", "k"), [("progress", 1), ("progress", 5), ("progress", 20),
                                          ("commit", 1), ("commit", 3), ("before-xml", 0)])  # fmt: skip
def test_killed_restore_leaves_dom0_consistent_and_next_run_works(world: World, point: str, k: int) -> None:
    system = clone_target(world, f"crash-{point}-{k}")
    old_xml = system.qubes_xml.read_bytes()
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_child_restore, args=(str(system.sim_dir), world.a_location, point, k))
    child.start()
    child.join(60)
    assert child.exitcode == 9, child.exitcode
    # qubes.xml: the old bytes exactly (the commit point is its atomic rename)
    assert system.qubes_xml.read_bytes() == old_xml
    # The next run cleans up what the killed one left and restores everything.
    job = run_restore(system, world.a_location)
    assert len(job.restored) >= 3
    left = [p for p in system.qubes_root.iterdir() if p.name.startswith(restore.STAGING_PREFIX)]
    assert not left
    registered = set(Collection.load(system.qubes_xml).names())
    for d in ("appvms", "vm-templates", "servicevms"):
        for vm_dir in (system.qubes_root / d).glob("*") if (system.qubes_root / d).is_dir() else []:
            assert vm_dir.name in registered, f"VM directory without registration: {vm_dir}"


def test_cleanup_of_a_dead_restores_staging_dir(world: World) -> None:
    """A staging dir of a dead pid (kill -9 mid-data) is removed by the next restore, nothing else is."""
    system = clone_target(world, "stale")
    stale = system.qubes_root / f"{restore.STAGING_PREFIX}999999-deadbeef"
    (stale / "vm1").mkdir(parents=True)
    (stale / "vm1" / "junk").write_bytes(b"x" * 1000)
    before = snapshot(system)
    removed = restore.cleanup_stale_staging(system)
    assert removed == [stale] and not stale.exists()
    gone = {str(p.relative_to(system.dom0_root)) for p in [stale, stale / "vm1", stale / "vm1/junk"]}
    assert set(before) - set(snapshot(system)) == gone


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                out.append(int(entry))
                out += _children(int(entry))
    return out


def _freeze_when_written(proc: subprocess.Popen[bytes], dest: Path, at_least: int) -> bool:
    """SIGSTOP qvm-backup as soon as the agent's partial file holds ``at_least`` bytes (mid-stream, however
    fast the machine); False if the backup finished first."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        for p in dest.glob(".qubes-backup-*"):
            with contextlib.suppress(FileNotFoundError):
                if p.stat().st_size >= at_least:
                    proc.send_signal(signal.SIGSTOP)
                    return True
        time.sleep(0.001)
    return False


@pytest.mark.parametrize("side", ["dom0", "agent"])
@pytest.mark.parametrize("delay", [0, 16 << 10, 128 << 10], ids=["start", "16KiB", "128KiB"])
def test_killed_backup_leaves_no_backup_named_file(world: World, side: str, delay: int) -> None:
    dest = world.src.vm_root(VM) / "home/user" / f"killed-{side}-{delay}"
    dest.mkdir()
    env = world.env(world.src, QUBES_BACKUP_TIMEOUT="5")
    proc = subprocess.Popen(
        [str(BIN / "qvm-backup"), "-q", "-y", "-d", VM, "-p", "/pw", "--kdf-n", "1024", "--weak-kdf-ok",
         "--chunk-size", str(CHUNK), f"/home/user/{dest.name}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    frozen = _freeze_when_written(proc, dest, delay)  # ``delay``: bytes the backup VM got before the kill
    if side == "dom0":
        proc.send_signal(signal.SIGKILL)
    else:
        for pid in _children(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if frozen:
            proc.send_signal(signal.SIGCONT)
    proc.communicate(timeout=30)
    for _ in range(20):  # the agent notices dom0's death (EOF) and removes its partial file
        if not any(p.name.startswith("qubes-backup-") for p in dest.iterdir()):
            break
        time.sleep(0.1)
    finished = [p for p in dest.iterdir() if p.name.startswith("qubes-backup-")]
    if proc.returncode == 0:
        pytest.skip(f"the backup finished before {delay} bytes reached the backup VM: nothing to kill")
    for path in finished:
        # Killed after COMMIT went out: the agent may legitimately have completed the backup.  Then the file
        # must be a complete, verifying backup, never a partial one with a finished name.
        opts = RestoreOptions(verify_only=True, rename_conflicting=True)
        run_restore(world.src, f"/home/user/{dest.name}/{path.name}", options=opts)
