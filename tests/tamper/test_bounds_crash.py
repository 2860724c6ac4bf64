"""Resource bounds (dom0-home staging, memory, dom0 peak RSS) and crash safety of restore and backup (issue #4,
items 4-5): a restore killed anywhere leaves VMs the next restore identifies (tagged in progress by a dead
owner) and removes, or, once its commit had started, finishes committing; a dead restore's leftovers are
removed through qubesd and dom0 is then exactly as before."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.restore import apply
from qubes_backup_dom0.restore.apply import IN_PROGRESS, OWNER_PREFIX, STAGING_PREFIX
from qubes_backup_dom0.restore.machine import Restore, RestoreOptions
from qubes_backup_sim import simgen

from .harness import (
    BIN,
    CHUNK,
    PASSPHRASE,
    POOL,
    VM,
    StreamTransport,
    World,
    assert_one_line,
    assert_unchanged,
    backup_vm_names,
    clone_target,
    encode_stream,
    fresh_target,
    home_staging,
    run_restore,
    snapshot,
    vm_state,
)

RSS_BOUND_MIB = 300
MEMORY_GROWTH_BOUND_MIB = 64  # decrypted chunks in flight, decompressor window, extractor buffers


def _allocated(path: Path, skip: Callable[[Path], bool] = lambda p: False) -> int:
    total = 0
    for dirpath, dirnames, files in os.walk(path):
        dirnames[:] = [d for d in dirnames if not skip(Path(dirpath) / d)]
        for f in files:
            if not skip(Path(dirpath) / f):
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
                except FileNotFoundError:  # qubesd's atomic write of qubes.xml, renamed meanwhile
                    continue
    return total


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_staging_holds_restored_data_plus_a_few_chunks(world: World) -> None:
    """VM data goes straight into volume imports: the only staging is dom0's home beside it (at most its data
    plus a few chunks), nothing else in dom0 grows but the volumes, and memory stays bounded."""
    system = clone_target(world, "staging")
    volumes = system.dom0_root / "dev"
    base_other = _allocated(system.dom0_root, lambda p: p == volumes)
    base_rss = _rss_bytes()
    peaks: list[tuple[int, int, int]] = []

    def progress(done: int, total: int) -> None:
        staged = home_staging(system)
        in_staging = sum(_allocated(st) for st in staged)
        other = _allocated(system.dom0_root, lambda p: p == volumes or p in staged) - base_other
        peaks.append((in_staging, other, _rss_bytes() - base_rss))

    job = Restore(system, world.a_location, PASSPHRASE, source_vm=VM, progress=progress)
    try:
        job.open()
        plan = job.plan()
        job.run()
    finally:
        job.close()
    assert peaks and plan.home is not None, "the progress callback never ran during a home restore"
    assert max(p for p, _, _ in peaks) <= plan.home.data + 4 * CHUNK + (1 << 20), (peaks, plan.home.data)
    assert max(o for _, o, _ in peaks) <= 1 << 20, f"dom0 grew outside the volumes: {peaks}"
    assert max(m for _, _, m in peaks) <= MEMORY_GROWTH_BOUND_MIB << 20, f"memory grew: {peaks}"
    assert not home_staging(system)
    assert set(job.restored) == backup_vm_names(world)


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
    simgen.generate(src, "bench", data_mib=300, apparent_gib=4, pool=POOL)
    (src / "dom0/pw").write_bytes(PASSPHRASE + b"\n")
    env = {**os.environ, "QUBES_SIM": str(src)}
    subprocess.run([str(BIN / "qvm-backup"), "-q", "-y", "-d", VM, "-p", "/pw", "--kdf-n", "1024", "--weak-kdf-ok",
                    "/home/user/backups"], env=env, check=True, capture_output=True, timeout=300)  # fmt: skip
    (backup,) = (src / "vms" / VM / "home/user/backups").glob("qubes-backup-*")
    dst = fresh_target(tmp_path / "dst")
    (dst.vm_root(VM) / "home/user/backups").mkdir(parents=True, exist_ok=True)
    os.link(backup, dst.vm_root(VM) / "home/user/backups" / backup.name)
    proc = subprocess.Popen(
        [str(BIN / "qvm-backup-restore"), "-q", "-y", "-d", VM, "-p", "/pw", f"/home/user/backups/{backup.name}"],
        env={**os.environ, "QUBES_SIM": str(dst.sim_dir)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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

def _die(cls: Any, attr: str, k: int, when: Callable[..., bool] = lambda *a: True, before: bool = False) -> None:
    """Make ``cls.attr`` end the process (os._exit: like SIGKILL, no cleanup) at its k-th call that ``when``
    selects: before that call runs, or right after it returned."""
    orig, seen = getattr(cls, attr), [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        hit = when(*args)
        if hit:
            seen[0] += 1
        if hit and before and seen[0] >= k:
            os._exit(9)
        result = orig(*args, **kwargs)
        if hit and not before and seen[0] >= k:
            os._exit(9)
        return result

    setattr(cls, attr, wrapper)


def _arm(point: str, k: int) -> Callable[[int, int], None] | None:
    """Install the kill point in this (forked) process; returns the progress callback for "progress"."""
    if point == "create":  # k VMs created and tagged (both tags)
        _die(Qubes, "set_tag", k, lambda _q, _vm, tag: tag.startswith(OWNER_PREFIX))
    elif point == "import":  # in the middle of a volume import (its service process running)
        _die(apply.ImportSink, "write_at", k)
    elif point == "last-pass":  # every VM complete, references being set, nothing committed
        _die(apply.Applier, "_set_reference", k, before=True)
    elif point == "commit":  # the commit started: k VMs have lost their in-progress tag
        _die(Qubes, "remove_tag", k, lambda _q, _vm, tag: tag == IN_PROGRESS)
    elif point == "owner-tags":  # committed, some owner tags still there
        _die(Qubes, "remove_tag", k, lambda _q, _vm, tag: tag.startswith(OWNER_PREFIX))
    elif point == "home":  # committed, dom0's home still in its staging directory
        _die(apply.Applier, "_move_home", k, before=True)
    elif point == "progress":
        calls = [0]

        def progress(done: int, total: int) -> None:
            calls[0] += 1
            if calls[0] >= k:
                os._exit(9)

        return progress
    return None


def _child_restore(sim: str, location: str, point: str, k: int) -> None:
    """Runs in a forked child: a restore that dies at ``point``."""
    system = System(Path(sim), Path(sim) / "dom0", "user")
    job = Restore(system, location, PASSPHRASE, source_vm=VM, progress=_arm(point, k))
    job.open()
    job.plan()
    job.run()
    os._exit(0)


def _ours(tags: tuple[str, ...]) -> list[str]:
    return [t for t in tags if t == IN_PROGRESS or t.startswith(OWNER_PREFIX)]


def _assert_volumes_registered(system: System) -> None:
    """Every LV and VM directory belongs to a VM qubesd lists (nothing of a removed VM is left)."""
    names = set(vm_state(system))
    vg = system.dom0_root / "dev/qubes_dom0"
    for lv in (p.name for p in vg.iterdir() if p.is_file()):
        lv_of = (re.fullmatch(rf"vm-{re.escape(n)}-(private|root|volatile)(-snap|-[0-9]+-back)?", lv) for n in names)
        assert any(lv_of), f"LV without a VM: {lv}"
    for d in ("appvms", "vm-templates"):
        for vm_dir in (system.qubes_root / d).iterdir():
            assert vm_dir.name in names, f"VM directory without a VM: {vm_dir}"


CRASH_POINTS = [("create", 1), ("create", 4), ("progress", 1), ("progress", 5), ("progress", 20), ("import", 3),
                ("last-pass", 1), ("commit", 1), ("commit", 4), ("owner-tags", 2), ("home", 1)]  # fmt: skip


@pytest.mark.parametrize(("point", "k"), CRASH_POINTS)
def test_killed_restore_leaves_dom0_consistent_and_next_run_works(world: World, point: str, k: int) -> None:
    system = clone_target(world, f"crash-{point}-{k}")
    before = set(vm_state(system))
    complete = before | backup_vm_names(world)
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_child_restore, args=(str(system.sim_dir), world.a_location, point, k))
    child.start()
    child.join(60)
    assert child.exitcode == 9, child.exitcode  # it died where it should have
    # Every VM the killed restore left is identifiable: each one still tagged in progress carries the dead
    # restore's owner tag; the others (commit started) are complete.
    left = {n: t for n, (_c, _s, t) in vm_state(system).items() if n not in before}
    owners = {t for tags in left.values() for t in tags if t.startswith(OWNER_PREFIX)}
    assert left and len(owners) <= 1, left
    assert all(owners and owners <= set(tags) for tags in left.values() if IN_PROGRESS in tags), left
    commit_started = any(IN_PROGRESS not in tags for tags in left.values())
    # The next restore finds the leftovers when it plans, and changes nothing before it runs (its backup
    # verified, the user agreed); then the VM list is as before or, if the commit had started, complete.
    killed, staging = vm_state(system), home_staging(system)
    job = Restore(system, world.a_location, PASSPHRASE, source_vm=VM)
    try:
        job.open()
        job.plan()
        assert vm_state(system) == killed and home_staging(system) == staging and job.leftovers
        apply.clean_leftovers(job.qubes, job.leftovers, system.home_dir)  # what run() does first
        state = vm_state(system)
    finally:
        job.close()
    assert set(state) == (complete if commit_started else before), (point, k, sorted(state))
    assert not any(_ours(tags) for _c, _s, tags in state.values()), state
    assert not home_staging(system)
    _assert_volumes_registered(system)
    # ... and then works (restoring a second copy beside a completed one).
    job = run_restore(system, world.a_location, options=RestoreOptions(rename_conflicting=commit_started))
    assert len(job.restored) == len(backup_vm_names(world))
    state = vm_state(system)
    assert len(state) == len(complete) + (len(job.restored) if commit_started else 0)
    assert not any(_ours(tags) for _c, _s, tags in state.values()), state
    assert not home_staging(system) and job.home_restored_to is not None
    _assert_volumes_registered(system)


# -------------------------------------------------------------------------------- leftovers of a dead restore

DEAD_OWNER = f"{OWNER_PREFIX}999999999-1-deadbeef"  # no such process


def _own_dead_owner() -> str:
    """This process, but a restore of it that is not running (its nonce is not registered live)."""
    return f"{OWNER_PREFIX}{os.getpid()}-{apply._proc_start(os.getpid())}-0badc0de"


def _leftover(q: Qubes, klass: str, name: str, template: str | None, *tags: str) -> None:
    q.create_vm(klass, name, "red", template)
    for tag in tags:
        q.set_tag(name, tag)


@contextlib.contextmanager
def _live_process() -> Iterator[str]:
    """Another process that is alive: an owner tag (PID-START-NONCE) naming it."""
    proc = subprocess.Popen(["sleep", "120"])
    try:
        yield f"{OWNER_PREFIX}{proc.pid}-{apply._proc_start(proc.pid)}-cafef00d"
    finally:
        proc.kill()
        proc.wait()


def test_leftover_vms_of_a_dead_restore_are_removed(world: World) -> None:
    """VMs killed restores left (created through qubesd, tagged in progress by owners that are dead), with
    data imported and a dom0-home staging: the next restore removes them all, even when it then fails
    itself, and dom0 is exactly as before they were made.  Two dead restores, one's VM based on the
    other's template (they ran side by side): removed together, whatever the order."""
    system = clone_target(world, "leftovers")
    before = snapshot(system)
    q = Qubes(system)
    _leftover(q, "TemplateVM", "lost-tpl", None, IN_PROGRESS, DEAD_OWNER)
    _leftover(q, "AppVM", "lost-app", "lost-tpl", IN_PROGRESS, DEAD_OWNER)  # depends on lost-tpl
    _leftover(q, "AppVM", "lost-own", "lost-tpl", IN_PROGRESS, _own_dead_owner())
    imp = q.import_volume("lost-tpl", "root", 3 * CHUNK)
    imp.write(b"\x5a" * CHUNK)
    imp.write_zeros(2 * CHUNK)
    imp.finish()
    stale = system.home_dir / f"{STAGING_PREFIX}999999999-1-deadbeef"
    (stale / "vm0/home/user").mkdir(parents=True)
    (stale / "vm0/home/user/junk").write_bytes(b"x" * 1000)
    assert {"lost-tpl", "lost-app", "lost-own"} <= set(vm_state(system))
    # A tampered backup: the restore fails after creating its own VMs; the leftovers go first all the same.
    members = list(world.a)
    i = next(i for i, (n, _) in enumerate(members) if n == "vm6/000001")
    members[i] = (members[i][0], members[i][1][:-1] + bytes([members[i][1][-1] ^ 1]))
    stream = world.base / "leftovers.bin"
    stream.write_bytes(encode_stream(members))
    with pytest.raises(BackupError) as e:
        run_restore(system, world.a_location, StreamTransport(stream))
    assert_one_line(str(e.value))
    assert_unchanged(system, before)


def test_vms_of_live_or_committing_restores_are_kept(world: World) -> None:
    """Not leftovers: VMs of a live restore of another process (and its staging), VMs tagged in progress
    without an owner of ours; a dead restore whose commit had started is finished, not undone."""
    system = clone_target(world, "not-leftovers")
    q = Qubes(system)
    with _live_process() as live:
        _leftover(q, "TemplateVM", "live-tpl", None, IN_PROGRESS, live)
        live_staging = system.home_dir / (STAGING_PREFIX + live[len(OWNER_PREFIX) :])
        (live_staging / "vm0").mkdir(parents=True)
        _leftover(q, "TemplateVM", "foreign-tpl", None, IN_PROGRESS)  # e.g. Qubes' own restore's
        _leftover(q, "TemplateVM", "half-tpl", None, DEAD_OWNER)  # already committed ...
        _leftover(q, "AppVM", "half-app", "half-tpl", IN_PROGRESS, DEAD_OWNER)  # ... when it was killed
        job = run_restore(system, world.a_location)
        state = vm_state(system)
        assert set(job.restored) == backup_vm_names(world)
        assert _ours(state["live-tpl"][2]) == sorted([IN_PROGRESS, live]) and live_staging.is_dir()
        assert state["foreign-tpl"][2].count(IN_PROGRESS) == 1
        assert not _ours(state["half-tpl"][2]) and not _ours(state["half-app"][2])


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
