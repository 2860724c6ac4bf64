"""Paranoid mode (issue 18 item 3): a backup from a compromised machine is parsed in a DisposableVM.

- a paranoid restore is byte-exact for volumes and creates VMs with the allowed settings only;
- dom0 runs none of the backup's parsers (they are made to fail in this process: the restore still works,
  so the parsing happened in the DisposableVM's process, which ran the real qubes.RestoreParanoid);
- a compromised DisposableVM (tests/fakes/paranoid_disp.py rewrites what the real service answers) is refused
  with one line for every breach of the grammar, a volume longer than declared, a stall; dom0 is as it was;
- the DisposableVM is removed after every restore: success, failure, Ctrl-C.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    BIN,
    PASSPHRASE,
    VM_BACKUPS,
    Sim,
    Unchanged,
    assert_restored_like,
    make_fresh,
    one_error_line,
    share_backup,
)
from qubes_backup_dom0.errors import BackupError, Cancelled, VerificationError
from qubes_backup_dom0.format import chunking, crypto, extractor, tarread
from qubes_backup_dom0.format import header as header_mod
from qubes_backup_dom0.format import manifest as manifest_mod
from qubes_backup_dom0.qubes.adminapi import AdminAPI
from qubes_backup_dom0.qubes.qubesxml import Collection
from qubes_backup_dom0.qubes.transport import SimTransport
from qubes_backup_dom0.restore import extract, receive
from qubes_backup_dom0.restore.paranoid import ParanoidRestore
from qubes_backup_dom0.restore.plan import RestoreOptions
from qubes_backup_protocol import plan_frames as pf

REPO = Path(__file__).resolve().parent.parent
FAKE = REPO / "tests" / "fakes" / "paranoid_disp.py"
KEEP = ("dom0", "backupvm", "fedora-41", "fedora-41-dvm")  # a fresh install has a template for disposables
ALLOWED_TAGS = {"created-by-dom0"}


@pytest.fixture
def target(tmp_path: Path, source_backup: tuple[Sim, Path]) -> tuple[Sim, str]:
    src, backup = source_backup
    other = make_fresh(tmp_path / "fresh", src, keep=KEEP)
    share_backup(backup, other)
    os.sync()  # the new volumes' blocks are allocated now, not at a writeback during a test's snapshots
    return other, f"{VM_BACKUPS}/{backup.name}"


class FakeDisp:
    """A DisposableVM whose qubes.RestoreParanoid is the real one behind a compromised relay."""

    confined = False

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.started: list[tuple[str, str]] = []

    def start(self, service: str, vm: str) -> subprocess.Popen[bytes]:
        self.started.append((service, vm))
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("protocol", "vm-agent", "dom0"))}  # fmt: skip
        return subprocess.Popen([sys.executable, str(FAKE), self.mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0, env=env, start_new_session=True)  # fmt: skip


class Recording(SimTransport):
    """The real simulated transport, remembering what it started where."""

    def __init__(self, sim: Sim) -> None:
        super().__init__(sim.system)
        self.started: list[tuple[str, str, bool]] = []

    def start(self, service: str, vm: str) -> subprocess.Popen[bytes]:
        root = self.system.vm_root(vm)
        self.started.append((service, vm, root.is_dir()))
        return super().start(service, vm)


def paranoid(sim: Sim, location: str, transport: object = None, vms: tuple[str, ...] = ("work", "vault"),
             **options: object) -> ParanoidRestore:  # fmt: skip
    job = ParanoidRestore(sim.system, location, PASSPHRASE.encode(), source_vm="backupvm",
                          options=RestoreOptions(vms=vms, **options), disp_transport=transport)  # type: ignore[arg-type]
    try:
        job.connect()
        job.open()
        job.plan()
        job.run()
    finally:
        job.close()
    return job


def para(sim: Sim, *args: str) -> subprocess.CompletedProcess[str]:
    """qvm-backup-restore --paranoid-mode, unattended (no --restore-devices/--restore-risky-settings: refused)."""
    return sim.run("qvm-backup-restore", "--paranoid-mode", "-y", "-p", "/pw", *args)


def disposables(sim: Sim) -> list[str]:
    return sorted(d.name for d in sim.collection().domains if d.klass == "DispVM")


def assert_clean(sim: Sim, before: Unchanged, disps: list[str]) -> None:
    """dom0 as it was: no VM created, the DisposableVM gone (record and simulated root)."""
    assert disposables(sim) == disps
    assert sorted(p.name for p in (sim.dir / "vms").iterdir()) == ["backupvm"]
    before.check()


# ------------------------------------------------------------------------------------------ the good path

def _expected_properties(src: Collection, name: str) -> dict[str, str]:
    dom = src[name]
    out = {}
    for prop in pf.PROPERTY_CODES:
        if dom.has_property(prop):
            number = pf.property_number(prop, dom.raw_property(prop) or "")
            if number is not None and (prop != "template_for_dispvms" or dom.klass == "AppVM"):
                out[prop] = pf.property_text(prop, number)
    if src.effective_netvm(dom) is None:
        out["netvm"] = ""
    if src.effective_default_dispvm(dom) is None:
        out["default_dispvm"] = ""
    return out


def test_cli_paranoid_restore_is_byte_exact_with_allowed_settings_only(
    target: tuple[Sim, str], source_backup: tuple[Sim, Path]
) -> None:
    src, _ = source_backup
    sim, location = target
    here_before = set(sim.collection().names())
    r = para(sim, "--skip-conflicting", "-d", "backupvm", location)
    assert r.returncode == 0, r.stderr
    assert "in paranoid mode" in r.stdout and "dom0 home" in r.stderr and "never restored" in r.stderr
    coll, scoll = sim.collection(), src.collection()
    restored = sorted(set(coll.names()) - here_before)
    assert restored == sorted(n for n in scoll.names() if n not in here_before and n not in ("backupvm", "disp1234"))
    for name in restored:
        dom, sdom = coll[name], scoll[name]
        assert (dom.klass, dom.label) == (sdom.klass, sdom.label), name
        assert coll.effective_template(dom) == scoll.effective_template(sdom), name
        props = {k: v for k, v in dom.properties.items() if k not in ("name", "qid", "uuid", "label", "template")}
        assert props == _expected_properties(scoll, name), name
        assert all(pf.feature_allowed(k) for k in dom.features), (name, dom.features)
        assert {k: v for k, v in sdom.features.items() if pf.feature_allowed(k)} == dom.features, name
        assert set(dom.tags) == ALLOWED_TAGS, (name, dom.tags)
        assert not list(dom.element.iterfind("devices/device")), name
        a, b = src.volume_files(name), sim.volume_files(name)
        assert a.keys() == b.keys() and a, name
        for vol, path in a.items():
            assert_restored_like(path, b[vol])
    # what the source had and paranoid mode drops: the risky settings of sys-net and vault
    assert scoll["sys-net"].raw_property("provides_network") == "True" and not coll["sys-net"].has_property(
        "provides_network")
    assert scoll["vault"].raw_property("virt_mode") == "pv" and not coll["vault"].has_property("virt_mode")
    assert coll["legacy-hvm"].raw_property("virt_mode") == "hvm" and coll["legacy-hvm"].raw_property("kernel") == ""
    assert sim.in_progress() == [] and disposables(sim) == []
    assert sorted(p.name for p in (sim.dir / "vms").iterdir()) == ["backupvm"]


def test_dom0_runs_no_parser_of_the_backup(target: tuple[Sim, str], source_backup: tuple[Sim, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Every parser and the crypto of a normal restore fail if called in this (dom0's) process; the paranoid
    restore still verifies and restores: the DisposableVM's process did it, through its real service."""
    src, _ = source_backup
    sim, location = target
    called: list[str] = []

    def forbidden(what: str) -> object:
        def fail(*_a: object, **_k: object) -> object:
            called.append(what)
            raise AssertionError(f"dom0 ran {what}")

        return fail

    for owner, attr in [(crypto, "keys_from_passphrase"), (crypto, "derive_master"), (crypto, "verify_member"),
                        (crypto, "decrypt"), (header_mod, "parse"), (manifest_mod, "parse"),
                        (chunking, "decompressed_reader"), (extract, "decompressed_reader"),
                        (extractor.Extractor, "__init__"), (tarread.InnerReader, "__init__"),
                        (receive.Receiver, "open"), (receive.Receiver, "read_header"),
                        (receive.Receiver, "receive_archive")]:  # fmt: skip
        monkeypatch.setattr(owner, attr, forbidden(f"{getattr(owner, '__name__', owner)}.{attr}"))
    monkeypatch.setattr(Collection, "from_bytes", classmethod(forbidden("Collection.from_bytes")))
    transport = Recording(sim)
    job = paranoid(sim, location, transport, vms=("work", "personal", "debian-12"))
    monkeypatch.undo()  # the checks below read qubes.xml themselves
    assert called == []
    assert sorted(job.restored) == ["debian-12", "personal", "work"]
    ((service, vm, had_root),) = transport.started
    assert service == pf.SERVICE and vm.startswith("disp") and had_root  # the DisposableVM, as a separate process
    assert job.disposable is not None and job.disposable.name is None  # removed
    for name in job.restored:
        for vol, path in src.volume_files(name).items():
            assert_restored_like(path, sim.volume_files(name)[vol])
    assert disposables(sim) == []


def test_json_and_list_in_paranoid_mode(target: tuple[Sim, str]) -> None:
    sim, location = target
    r = para(sim, "--list", "--json", "-d", "backupvm", location)
    assert r.returncode == 0, r.stderr
    import json

    doc = json.loads(r.stdout)
    assert doc["paranoid"] is True and doc["command"] == "list" and doc["dom0_home"]["restore"] is False
    vault = next(v for v in doc["vms"] if v["name"] == "vault")
    assert vault["netvm"] is None and "virt_mode" not in vault["properties"]
    assert disposables(sim) == []
    r = para(sim, "--json", "--skip-conflicting", "-d", "backupvm", location, "work")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["ok"] and doc["restored"] == ["work"], r.stderr
    assert doc["disposable_vm"].startswith("disp") and disposables(sim) == []


def test_options_that_restore_more_are_refused(target: tuple[Sim, str]) -> None:
    sim, location = target
    for option in ("--restore-devices", "--restore-risky-settings", "--use-qubes-restore"):
        r = para(sim, option, "-d", "backupvm", location)
        assert r.returncode == 2 and f"{option} does not go with --paranoid-mode" in one_error_line(r.stderr)
    assert disposables(sim) == []


def test_plan_semantics_rename_and_missing_template(target: tuple[Sim, str]) -> None:
    """Conflicts and dependencies as Qubes has them: renamed, the template restored with its VM."""
    sim, location = target
    job = paranoid(sim, location, vms=("fedora-41", "work"), rename_conflicting=True)
    assert sorted(job.restored) == ["fedora-411", "work"]
    assert sim.collection()["work"].raw_property("template") == "fedora-411"
    with pytest.raises(BackupError, match="personal: missing template debian-12; use --skip-broken"):
        paranoid(sim, location, vms=("personal",))
    assert disposables(sim) == []


# --------------------------------------------------------------------------------- a compromised DispVM

HOSTILE = [
    ("garbage-record", "malformed plan record"),
    ("oversize-record", "frame data too long"),
    ("trailing-byte", "malformed plan record"),
    ("name:dom0", "invalid VM 'dom0'"),
    ("name:../etc", "invalid VM"),
    ("name:a\nb", "invalid VM"),
    ("name:" + "x" * 40, "invalid VM"),
    ("class", "unknown class"),
    ("property", "memory 1048577 is out of range"),
    ("unknown-property", "unknown or repeated property code 99"),
    ("feature", "feature 'qemu-extra-args' is not allowed"),
    ("appvm-root", "a AppVM may have private"),
    ("repeat", "repeats VM"),
    ("too-many", f"more than {pf.MAX_PLAN_VMS} VMs"),
    ("grow-volume", "more than the"),
    ("huge-hole", "more than the"),
    ("short-volume", "bytes"),
    ("other-volume", "was due"),
    ("early-verified", "was due"),
    ("data-after-verified", "after VERIFIED"),
    ("error-controls", "reports: it?[2J?worked??31m: done"),
]


@pytest.mark.parametrize(("mode", "message"), HOSTILE, ids=[m[:20] for m, _ in HOSTILE])
def test_a_compromised_disposable_is_refused_and_rolled_back(target: tuple[Sim, str], mode: str,
                                                             message: str) -> None:  # fmt: skip
    sim, location = target
    disps = disposables(sim)
    before = Unchanged(sim)
    with pytest.raises(VerificationError) as info:
        paranoid(sim, location, FakeDisp(mode))
    text = str(info.value)
    assert "\n" not in text and "\x1b" not in text and "\u202e" not in text and message in text, text
    assert_clean(sim, before, disps)


def test_the_pass_through_fake_restores(target: tuple[Sim, str]) -> None:
    """The fake itself changes nothing unless told: the refusals above are the modes'."""
    sim, location = target
    fake = FakeDisp("pass")
    assert sorted(paranoid(sim, location, fake).restored) == ["vault", "work"]
    assert fake.started[0][0] == pf.SERVICE and disposables(sim) == []


@pytest.mark.parametrize("mode", ["stall-plan", "stall-volume"])
def test_a_stalling_disposable_is_cut_off(target: tuple[Sim, str], mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sim, location = target
    monkeypatch.setenv("QUBES_BACKUP_TIMEOUT", "2")
    before = Unchanged(sim)
    start = time.monotonic()
    with pytest.raises(BackupError, match=r"DisposableVM disp[0-9]+ did not answer for 2 s"):
        paranoid(sim, location, FakeDisp(mode))
    assert time.monotonic() - start < 30
    assert_clean(sim, before, [])


class FakeAgent(SimTransport):
    """The backup VM's real qubes.Restore behind tests/fakes/paranoid_agent.py (stall, error or garbage after
    COUNT frames: COUNT above 4 is in the archives, which dom0's relay thread passes on)."""

    def __init__(self, sim: Sim, mode: str, count: int) -> None:
        super().__init__(sim.system, sandbox=False)
        self.mode, self.count = mode, count

    def start(self, service: str, vm: str) -> subprocess.Popen[bytes]:
        assert service == "qubes.Restore"
        root = self.system.vm_root(vm)
        env = self.agent_env(root)
        return subprocess.Popen([sys.executable, str(REPO / "tests/fakes/paranoid_agent.py"), self.mode,
                                 str(self.count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0, env=env, cwd=root,
                                start_new_session=True)  # fmt: skip


@pytest.mark.parametrize(("mode", "count", "message"), [
    ("stall", 6, "backup VM did not answer for 2 s"),
    ("error", 6, "backup VM reports: disk on fire"),
    ("garbage", 6, "backup VM sent a malformed stream"),
    ("stall", 2, "backup VM did not answer for 2 s"),  # before the plan: on the main thread
])  # fmt: skip
def test_a_failing_backup_vm_during_the_relay(target: tuple[Sim, str], mode: str, count: int, message: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    sim, location = target
    monkeypatch.setenv("QUBES_BACKUP_TIMEOUT", "2")
    before = Unchanged(sim)
    job = ParanoidRestore(sim.system, location, PASSPHRASE.encode(), source_vm="backupvm",
                          options=RestoreOptions(vms=("work", "vault")), transport=FakeAgent(sim, mode, count))
    with pytest.raises(BackupError, match=message):
        try:
            job.connect()
            job.open()
            job.plan()
            job.run()
        finally:
            job.close()
    assert_clean(sim, before, [])


def test_cancel_from_another_thread(target: tuple[Sim, str]) -> None:
    """The API's cancel() while the data is due (the DisposableVM holds it back): Cancelled, dom0 as it was."""
    sim, location = target
    before = Unchanged(sim)
    job = ParanoidRestore(sim.system, location, PASSPHRASE.encode(), source_vm="backupvm",
                          options=RestoreOptions(vms=("work", "vault")), disp_transport=FakeDisp("stall-volume"))
    try:
        job.connect()
        job.open()
        job.plan()

        def cancel_when_created() -> None:
            deadline = time.monotonic() + 60
            while sim.in_progress() != ["vault", "work"] and time.monotonic() < deadline:
                time.sleep(0.05)
            job.cancel()

        canceller = threading.Thread(target=cancel_when_created)
        canceller.start()
        with pytest.raises(Cancelled):
            job.run()
        canceller.join()
    finally:
        job.close()
    assert_clean(sim, before, [])


def test_wrong_passphrase_and_a_hostile_backup_vm(target: tuple[Sim, str]) -> None:
    """The DisposableVM's reason comes back as one line; the backup VM's errors too; both remove it."""
    sim, location = target
    before = Unchanged(sim)
    job = ParanoidRestore(sim.system, location, b"wrong", source_vm="backupvm")
    with pytest.raises(VerificationError, match=r"DisposableVM disp[0-9]+ reports: wrong passphrase"):
        try:
            job.connect()
            job.open()
        finally:
            job.close()
    with pytest.raises(BackupError, match="backup VM reports: location does not exist"):
        paranoid(sim, f"{VM_BACKUPS}/nothing")
    assert_clean(sim, before, [])


def test_a_tampered_backup_is_refused_by_the_disposable(target: tuple[Sim, str]) -> None:
    """A flipped byte in the data: the DisposableVM's MAC check refuses it (verifying reads every archive)."""
    sim, location = target
    path = sim.vm_root("backupvm") / location.lstrip("/")
    tampered = path.with_name("qubes-backup-2026-01-01T000000")
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x40
    tampered.write_bytes(data)
    before = Unchanged(sim)
    with pytest.raises(VerificationError, match=r"DisposableVM disp[0-9]+ reports: .*(tampered|damaged)"):
        paranoid(sim, f"{VM_BACKUPS}/{tampered.name}", vms=(), verify_only=True)
    assert_clean(sim, before, [])


def test_a_malformed_backup_file_is_damaged(target: tuple[Sim, str]) -> None:
    """The backup VM's strict tar reader refuses the file after the first member (non-zero padding): its DAMAGED
    frame is a damaged backup (exit 3) in paranoid mode too, the DisposableVM removed."""
    sim, location = target
    path = sim.vm_root("backupvm") / location.lstrip("/")
    with tarfile.open(path) as tar:
        first = tar.next()
        assert first is not None and first.name == "backup-header" and first.size % 512
        padding = first.offset_data + first.size
    bad = path.with_name("qubes-backup-2026-01-02T000000")
    data = bytearray(path.read_bytes())
    data[padding] = 1
    bad.write_bytes(data)
    before = Unchanged(sim)
    r = para(sim, "-d", "backupvm", f"{VM_BACKUPS}/{bad.name}", "work")
    assert r.returncode == 3, r.stderr
    assert "the backup is damaged: backup VM reports: " in one_error_line(r.stderr)
    assert_clean(sim, before, [])


def test_a_backup_in_qubes_own_format_is_named_by_the_disposable(target: tuple[Sim, str]) -> None:
    """dom0 does not read the header in this mode: the DisposableVM recognises Qubes' format and says so."""
    sim, _location = target
    path = sim.vm_root("backupvm") / VM_BACKUPS.lstrip("/") / "qubes-old.tar"
    header = (b"version=4\nencrypted=True\ncompressed=True\ncompression-filter=gzip\nhmac-algorithm=scrypt\n"
              b"backup-id=20240102T030405-1234\n")  # fmt: skip
    with tarfile.open(path, "w") as tar:
        for name, data in (("backup-header", header), ("backup-header.hmac", b"(stdin)= 00\n"),
                           ("qubes.xml.000.enc", b"\0" * 1000)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    before = Unchanged(sim)
    r = para(sim, "-d", "backupvm", f"{VM_BACKUPS}/qubes-old.tar")
    assert r.returncode == 3 and "Qubes OS' own format (version 4)" in one_error_line(r.stderr), r.stderr
    assert_clean(sim, before, [])


def test_no_paranoid_restore_while_a_vm_could_manage_it(target: tuple[Sim, str]) -> None:
    """As a normal restore: no VM tagged in progress while another VM could change it -- a VM holding
    backup-restore-mgmt, or (a policy rule for disposables) this restore's own DisposableVM."""
    sim, location = target
    AdminAPI(sim.system.admin_socket()).call("admin.vm.tag.Set", "backupvm", "backup-restore-mgmt")
    before = Unchanged(sim)
    with pytest.raises(BackupError, match=r"backupvm \(tagged backup-restore-mgmt\)"):
        paranoid(sim, location)
    assert_clean(sim, before, [])
    AdminAPI(sim.system.admin_socket()).call("admin.vm.tag.Remove", "backupvm", "backup-restore-mgmt")
    policy = sim.dom0 / "etc/qubes/policy.d/30-user.policy"
    policy.write_text("admin.vm.volume.ImportWithSize * @type:DispVM @tag:backup-restore-in-progress allow "
                      "target=dom0\n")  # fmt: skip
    before = Unchanged(sim)
    with pytest.raises(BackupError, match=r"disp[0-9]+ \(allowed admin.vm.volume.ImportWithSize by "):
        paranoid(sim, location)
    assert_clean(sim, before, [])


# ----------------------------------------------------------------------------------------- the command line

def _fake_rpc_dir(tmp: Path) -> Path:
    rpc = tmp / "rpc"
    rpc.mkdir()
    shutil.copy(REPO / "rpc-policy" / "qubes.Restore", rpc / "qubes.Restore")
    shutil.copy(FAKE, rpc / pf.SERVICE)
    return rpc


def test_cli_hostile_disposable_is_one_line(target: tuple[Sim, str], tmp_path: Path) -> None:
    sim, location = target
    before = Unchanged(sim)
    env = {**sim.env(), "QUBES_BACKUP_RPC_DIR": str(_fake_rpc_dir(tmp_path)), "QUBES_AGENT_FAKE_MODE": "grow-volume"}
    r = subprocess.run([str(BIN / "qvm-backup-restore"), "--paranoid-mode", "-y", "-p", "/pw", "-d", "backupvm",
                        location, "work"], env=env, text=True, capture_output=True, timeout=120)  # fmt: skip
    assert r.returncode == 3, r.stderr
    assert "sent more than the" in one_error_line(r.stderr)
    assert_clean(sim, before, [])


def test_cli_ctrl_c_removes_the_disposable_and_the_vms(target: tuple[Sim, str], tmp_path: Path) -> None:
    sim, location = target
    before = Unchanged(sim)
    env = {**sim.env(), "QUBES_BACKUP_RPC_DIR": str(_fake_rpc_dir(tmp_path)), "QUBES_AGENT_FAKE_MODE": "stall-volume"}
    proc = subprocess.Popen([str(BIN / "qvm-backup-restore"), "--plan-b", "-y", "-p", "/pw", "-d", "backupvm",
                             location, "work", "vault"], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 60
    while sim.in_progress() != ["vault", "work"] and time.monotonic() < deadline:  # created: the data is due
        time.sleep(0.1)
    assert sim.in_progress() == ["vault", "work"] and disposables(sim)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err, err
    assert_clean(sim, before, [])
