"""qvm-backup through the real console script and the real qubes.Backup agent process (issue 2, item 7).

Each test checks a property a user relies on: where the backup lands and what it is called, that the backup
VM sees nothing readable, that selection and exclusion pick the right VMs, that every compression restores,
and that every failure (bad input, failing hook, full disk, interruption) is one clear line, a non-zero
exit and no file that looks like a finished backup.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from conftest import BIN, KDF, PASSPHRASE, RELEASES, VM_BACKUPS, Sim, assert_restored_like, new_sim, one_error_line
from qubes_backup_dom0.format.manifest import Manifest
from qubes_backup_dom0.qubes.qubesxml import Collection
from qubes_backup_dom0.restore.machine import Restore

NAME_RE = re.compile(r"qubes-backup-\d{4}-\d\d-\d\dT\d{6}")


def read_manifest(sim: Sim, location: str, source_vm: str | None = "backupvm") -> Manifest:
    """Open a backup through the restore API (verifies header and manifest) and return its manifest."""
    job = Restore(sim.system, location, PASSPHRASE.encode(), source_vm=source_vm)
    try:
        return job.open()
    finally:
        job.close()


def archived(manifest: Manifest) -> set[str]:
    return {a.vm for a in manifest.archives}


def leftovers(sim: Sim) -> list[Path]:
    """Anything named like a backup, or a partial one, in backupvm or anywhere in dom0."""
    found = []
    for root in (sim.vm_root("backupvm"), sim.dom0):
        found += [p for p in root.rglob("*qubes-backup-*") if not p.name.startswith(".qubes-backup-restore-")]
    return found


RESULT_RE = re.compile(
    r"Backup written to: (.+) \(backup id ([0-9a-f]{32}), created (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ), "
    r"([0-9.]+ [KMGT]?i?B)\)"
)


def result_where(stdout: str) -> str:
    """The location in qvm-backup's one result line (which also names the backup: id, created, size)."""
    m = RESULT_RE.fullmatch(stdout.strip())
    assert m, stdout
    return m.group(1)


def verify_only(sim: Sim, location: str, *args: str) -> subprocess.CompletedProcess[str]:
    return sim.restore("--verify-only", *args, location)


# ------------------------------------------------------------------------------------------ destinations

def test_backup_to_vm_directory_is_named_listed_and_opaque(sim: Sim) -> None:
    r = sim.backup("-d", "backupvm", VM_BACKUPS)
    assert r.returncode == 0, r.stderr
    files = list(sim.vm_backups.iterdir())
    assert len(files) == 1 and NAME_RE.fullmatch(files[0].name), files
    backup = files[0]
    assert result_where(r.stdout) == f"backupvm:{VM_BACKUPS}/{backup.name}"
    listing = subprocess.run(["tar", "-tvf", str(backup)], capture_output=True, text=True, check=True).stdout
    members = subprocess.run(["tar", "-tf", str(backup)], capture_output=True, text=True, check=True).stdout
    assert members.splitlines()[:4] == ["backup-header", "backup-header.hmac", "manifest", "manifest.hmac"]
    vm_names = [n for n in sim.collection().names() if n != "dom0"]
    header = subprocess.run(["tar", "-xOf", str(backup), "backup-header"], capture_output=True, check=True).stdout
    for name in vm_names:
        assert name not in listing and name.encode() not in header, name
    # Nowhere in the whole stream (longer names: short ones could occur by chance in random data).
    for name in ("personal", "legacy-hvm", "sys-firewall", "fedora-41-dvm", "untrusted"):
        grep = subprocess.run(["grep", "-c", "-a", name, str(backup)], capture_output=True, text=True)
        assert grep.stdout.strip() == "0", name
    assert b"<qubes" not in backup.read_bytes()
    assert verify_only(sim, f"{VM_BACKUPS}/{backup.name}", "-d", "backupvm").returncode == 0


def test_backup_to_command_stores_a_valid_backup(sim: Sim) -> None:
    # The hook runs with its working directory in the VM's home; its arguments are not path-translated.
    r = sim.backup("-d", "backupvm", "dd of=out.bin status=none", "work")
    assert r.returncode == 0, r.stderr
    out = sim.vm_root("backupvm") / "home/user/out.bin"
    assert out.stat().st_size > 0
    with tarfile.open(out) as tar:
        assert tar.getnames()[0] == "backup-header"
    assert archived(read_manifest(sim, "/home/user/out.bin")) == {"work"}
    r = sim.restore("-d", "backupvm", "--rename-conflicting", "/home/user/out.bin")
    assert r.returncode == 0, r.stderr
    assert "work1" in sim.collection().names()
    assert leftovers(sim) == []


def test_backup_to_dom0_directory(sim: Sim) -> None:
    (sim.dom0 / "backups").mkdir()
    r = sim.backup("/backups", "vault")
    assert r.returncode == 0, r.stderr
    files = list((sim.dom0 / "backups").iterdir())
    assert len(files) == 1 and NAME_RE.fullmatch(files[0].name)
    assert result_where(r.stdout) == f"/backups/{files[0].name}"
    assert archived(read_manifest(sim, f"/backups/{files[0].name}", None)) == {"vault"}
    assert verify_only(sim, f"/backups/{files[0].name}").returncode == 0


# ------------------------------------------------------------------------------------------ selection

def test_default_selection_skips_include_in_backups_false(sim: Sim) -> None:
    backup = sim.backup_to_vm()
    manifest = read_manifest(sim, f"{VM_BACKUPS}/{backup.name}")
    coll = sim.collection()
    expected = {d.name for d in coll.domains if d.include_in_backups}
    assert {"backupvm", "disp1234"}.isdisjoint(expected)
    assert archived(manifest) == expected  # dom0 stands for its home
    assert {a.kind for a in manifest.archives if a.vm == "dom0"} == {"home"}


def test_exclude_option(sim: Sim) -> None:
    backup = sim.backup_to_vm(extra=("-x", "work", "-x", "dom0"))
    got = archived(read_manifest(sim, f"{VM_BACKUPS}/{backup.name}"))
    assert "work" not in got and "dom0" not in got and "personal" in got


def test_named_vms_only_with_dependencies_in_manifest(sim: Sim) -> None:
    backup = sim.backup_to_vm("personal", "vault")
    manifest = read_manifest(sim, f"{VM_BACKUPS}/{backup.name}")
    assert archived(manifest) == {"personal", "vault"}
    inner = Collection.from_bytes(manifest.qubes)
    names = set(inner.names())
    # personal: template debian-12, netvm sys-firewall (which needs sys-net); vault inherits fedora-41.
    assert {"personal", "vault", "debian-12", "sys-firewall"} <= names
    assert "work" not in names and "untrusted" not in names and "backupvm" not in names
    assert inner.get("personal").features.get("backup-content") == "True"
    assert inner.get("debian-12").features.get("backup-content") != "True"


@pytest.mark.parametrize("flags", [("--no-compress",), ("-Z", "gzip"), ("-Z", "none"), ("-z",)])
def test_compression_choices_restore(sim: Sim, flags: tuple[str, ...]) -> None:
    backup = sim.backup_to_vm("work", extra=flags)
    expected = "none" if flags[-1] in ("--no-compress", "none") else ("gzip" if flags[-1] == "gzip" else "zstd")
    r = verify_only(sim, f"{VM_BACKUPS}/{backup.name}", "-d", "backupvm")
    assert r.returncode == 0, r.stderr
    assert f"({expected}, 1 archive(s))" in r.stderr
    r = sim.restore("-d", "backupvm", "--rename-conflicting", f"{VM_BACKUPS}/{backup.name}")
    assert r.returncode == 0, r.stderr
    assert_restored_like(sim.volume_files("work")["private"], sim.volume_files("work1")["private"])


@pytest.mark.parametrize("release", RELEASES)
def test_backup_writes_nothing_but_backup_timestamp(sim: Sim, tmp_path: Path, release: str) -> None:
    """A source system gets no write but, as Qubes' own backup, each backed-up VM's backup_timestamp (the sim
    qubesd's request log); its volumes are read in their committed state: the running VM's (lvm_thin)
    snapshot is removed afterwards, nothing of the backup is left in the volume group.  Each release is
    asked in its own calls only: R4.2 devices with ``…List`` and no notes, R4.3 ``…Assigned`` and notes."""
    log = tmp_path / "requests.jsonl"
    lvs_before = sorted(p.name for p in (sim.dom0 / "dev/qubes_dom0").iterdir())
    sim.start_qubesd(log)
    sim.backup_to_vm("work", "vault")
    requests = [json.loads(line) for line in log.read_text().splitlines()]
    reads = (".List", ".Get", ".GetAll", ".Info", ".GetDefault", ".Index", ".Assigned")
    writes = [(q["method"], q["arg"], q["dest"]) for q in requests if not q["method"].endswith(reads)]
    assert sorted(writes) == [("admin.vm.property.Set", "backup_timestamp", vm) for vm in ("vault", "work")]
    methods = {q["method"] for q in requests}
    lists = {m for m in methods if m.startswith("admin.vm.device.")}
    if release == "4.2":
        assert lists == {f"admin.vm.device.{c}.List" for c in ("pci", "usb", "block", "mic")}
        assert not {m for m in methods if m.startswith("admin.vm.notes.")}
    else:
        assert lists == {f"admin.vm.device.{c}.Assigned" for c in ("pci", "usb", "block", "mic")}
        assert sorted(q["dest"] for q in requests if q["method"] == "admin.vm.notes.Get") == ["vault", "work"]
    assert sorted(p.name for p in (sim.dom0 / "dev/qubes_dom0").iterdir()) == lvs_before


# ------------------------------------------------------------------------------------------ bad input

def _fails_cleanly(sim: Sim, r: subprocess.CompletedProcess[str], *words: str) -> str:
    assert r.returncode != 0, r.stdout
    line = one_error_line(r.stderr)
    for w in words:
        assert w in line, line
    assert "Backup written" not in r.stdout
    assert leftovers(sim) == []
    return line


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("-d", "backupvm", VM_BACKUPS, "nosuchvm"), ("nosuchvm",)),
        (("-x", "nosuchvm", "-d", "backupvm", VM_BACKUPS), ("nosuchvm",)),
        (("-d", "backupvm", "/home/user/missing"), ("/home/user/missing",)),
        (("-d", "backupvm", "/home/user/backups/afile/sub"), ("/home/user/backups/afile/sub",)),
        (("-d", "backupvm", "/home/user/backups/afile"), ("/home/user/backups/afile",)),
        (("-d", "nosuchvm", VM_BACKUPS), ("nosuchvm",)),
        (("-d", "backupvm", "false"), ("backupvm",)),
        (("-d", "backupvm", "no-such-command --flag"), ("no-such-command",)),
        (("-d", "backupvm", "dd of=/dev/full status=none"), ("backupvm",)),
        (("/missing",), ("/missing",)),
        (("/afile",), ("/afile",)),
        (("/afile/sub",), ("/afile/sub",)),
    ],
    ids=[
        "unknown-vm", "unknown-exclude", "vm-missing-dir", "vm-dir-under-file", "vm-location-is-file",
        "unknown-backup-vm", "hook-false", "hook-not-found", "hook-disk-full", "dom0-missing-dir",
        "dom0-location-is-file", "dom0-dir-under-file",
    ],
)  # fmt: skip
def test_bad_input_one_line_no_file(sim: Sim, args: tuple[str, ...], words: tuple[str, ...]) -> None:
    (sim.vm_backups / "afile").write_text("not a directory\n")
    (sim.dom0 / "afile").write_text("not a directory\n")
    r = sim.backup("-q", *args)
    _fails_cleanly(sim, r, *words)
    assert len(r.stderr.splitlines()) == 1, r.stderr  # with -q nothing but the error
    assert sorted(p.name for p in sim.vm_backups.iterdir()) == ["afile"]


def test_unreadable_passphrase_file(sim: Sim) -> None:
    r = sim.run("qvm-backup", "-y", "-p", "/no-such-file", "-d", "backupvm", VM_BACKUPS)
    _fails_cleanly(sim, r, "/no-such-file")
    r = sim.run("qvm-backup", "-y", "-p", "/var", "-d", "backupvm", VM_BACKUPS)  # a directory
    _fails_cleanly(sim, r, "/var")


def test_empty_passphrase(sim: Sim) -> None:
    (sim.dom0 / "empty").write_text("\n")
    r = sim.run("qvm-backup", "-y", "-p", "/empty", "-d", "backupvm", VM_BACKUPS)
    _fails_cleanly(sim, r, "empty")
    r = subprocess.run(
        [str(BIN / "qvm-backup"), "-y", "-p", "-", *KDF, "-d", "backupvm", VM_BACKUPS],
        env=sim.env(), input="\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    _fails_cleanly(sim, r, "empty")


def test_no_terminal_for_prompt_or_confirmation(sim: Sim) -> None:
    r = sim.run("qvm-backup", "-y", "-d", "backupvm", VM_BACKUPS)
    _fails_cleanly(sim, r, "passphrase")
    r = sim.run("qvm-backup", "-p", "/pw", "--kdf-n", "1024", "--weak-kdf-ok", "-d", "backupvm", VM_BACKUPS)
    _fails_cleanly(sim, r, "-y")


def _limit_file_size() -> None:
    """Run in the child: files larger than 256 KiB fail with EFBIG, as a full disk fails with ENOSPC."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))


@pytest.mark.parametrize("where", ["vm", "dom0"])
def test_disk_full_while_writing(sim: Sim, where: str) -> None:
    # The agent inherits the limit: its write into the backup directory fails mid-stream.
    (sim.dom0 / "backups").mkdir()
    location = ["-d", "backupvm", VM_BACKUPS] if where == "vm" else ["/backups"]
    r = subprocess.run(
        [str(BIN / "qvm-backup"), "-y", "-p", "/pw", *KDF, *location], env=sim.env(), capture_output=True,
        text=True, stdin=subprocess.DEVNULL,
        preexec_fn=_limit_file_size, timeout=120,
    )  # fmt: skip
    line = _fails_cleanly(sim, r)
    assert "large" in line or "space" in line, line
    assert list(sim.vm_backups.iterdir()) == []
    assert list((sim.dom0 / "backups").iterdir()) == []


# ------------------------------------------------------------------------------------------ interruption

@pytest.fixture(scope="module")
def big_sim(tmp_path_factory: pytest.TempPathFactory) -> Sim:
    """Enough data (incompressible) that a backup takes a noticeable time to stream."""
    return new_sim(tmp_path_factory.mktemp("big") / "sim", data_mib=64, compressible=0.0)


def _empty(directory: Path) -> None:
    """Remove what an earlier kill -9 case left (nothing can clean up after it), so waits see only new files."""
    for p in directory.iterdir():
        p.unlink()


def _wait_for_partial(directory: Path, proc: subprocess.Popen[str], minimum: int = 1 << 20) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for p in directory.glob(".qubes-backup-*"):
            try:
                if p.stat().st_size >= minimum:
                    return
            except FileNotFoundError:
                pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("the backup never started writing")


@pytest.mark.parametrize(
    ("where", "sig"),
    [("vm", signal.SIGINT), ("vm", signal.SIGTERM), ("vm", signal.SIGKILL), ("dom0", signal.SIGTERM)],
    ids=["vm-sigint", "vm-sigterm", "vm-sigkill", "dom0-sigterm"],
)
def test_interrupted_backup_leaves_no_backup_file(big_sim: Sim, where: str, sig: signal.Signals) -> None:
    out = big_sim.vm_backups if where == "vm" else big_sim.dom0 / "backups"
    out.mkdir(exist_ok=True)
    _empty(out)
    location = ["-d", "backupvm", VM_BACKUPS] if where == "vm" else ["/backups"]
    proc = big_sim.popen("qvm-backup", "-y", "-p", "/pw", "--kdf-n", "1024", "--weak-kdf-ok", "-Z", "none", *location)
    try:
        _wait_for_partial(out, proc)
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    if sig != signal.SIGKILL:
        assert one_error_line(err).endswith("interrupted"), err
    # The agent notices the end of its input and removes its partial file (give it a moment).
    clean_up = sig != signal.SIGKILL  # after kill -9 nothing in dom0 can clean up (see the report)
    deadline = time.monotonic() + 10
    while clean_up and time.monotonic() < deadline and any(out.iterdir()):
        time.sleep(0.05)
    assert list(out.glob("qubes-backup-*")) == []
    if clean_up:
        assert list(out.iterdir()) == []


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (the agent launcher started by qvm-backup)."""
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def test_agent_killed_mid_stream(big_sim: Sim) -> None:
    """The backup VM dies while receiving: dom0 says so in one line and nothing looks like a backup."""
    _empty(big_sim.vm_backups)
    proc = big_sim.popen("qvm-backup", "-y", "-p", "/pw", *KDF, "-Z", "none", "-d", "backupvm",
                         VM_BACKUPS)  # fmt: skip
    try:
        _wait_for_partial(big_sim.vm_backups, proc)
        agents = _children(proc.pid)
        assert agents
        for pid in agents:
            os.kill(pid, signal.SIGKILL)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode not in (0, 130)
    assert "backupvm" in one_error_line(err)
    assert list(big_sim.vm_backups.glob("qubes-backup-*")) == []
