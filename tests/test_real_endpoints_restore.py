"""The real ``qvm-backup-restore`` with QUBES_SIM unset, against fake endpoints (issue 9 items 4 and 5).

The restore needs a qubesd that remembers what it created, so the endpoints are: the simulated qubesd as a
separate process on a temporary socket (QUBES_ADMIN_SOCKET; ``--host-paths``, ``--log`` = every request as
one JSON line, ``--release`` the target's: R4.3 unless a test says R4.2), owning a freshly installed system
built by simgen (``keep=("backupvm",)``); QUBES_RPC_DIR = a directory whose
``admin.vm.volume.ImportWithSize`` records its argv and qrexec environment and then runs the sim's import
service; the fake ``qvm-run`` of tests/fakes on PATH, which starts the agent's real ``qubes.Restore``
service file with QUBES_AGENT_ROOT.  The backup is made once (per release) by the real ``qvm-backup`` in a
simulated source system (lvm_thin, a running VM, a custom tag, block devices with options, a PCI device
behind ``virt_mode=hvm``).

Checked, on the exact requests sent: the order per VM (Create; the in-progress tag before any other write;
exactly the backup's non-default properties and backup_timestamp; features; tags but no created-by-*; each
device assignment after the properties, as the release makes one (R4.2: Attach with ``persistent=True`` and
the options; R4.3: Assign with Qubes' serialization), and no call the release does not have; data and
firewall; netvm/default_dispvm in the last pass after all data; the in-progress tag removed after the last
write), that no write targets a VM the restore did not create, the import service's invocation, and volumes
byte-exact with holes kept.  Then a restore failing at each step (create, property, import with an error
reply and exit 0, import that stops reading, firewall, last pass, SIGTERM/SIGINT mid-import, SIGKILL with
the next run cleaning up) leaves the qubesd's VM list, qubes.xml and its LVs as they were, with one error
line naming the VM and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import qubes_backup_sim
from conftest import ALL_SETTINGS, allocated, one_error_line
from lxml import etree
from qubes_backup_dom0.format.sparse import same_content
from qubes_backup_dom0.qubes import firewall
from qubes_backup_dom0.qubes.adminapi import AdminAPI, QubesdError
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.qubesxml import Collection, Domain
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.restore.machine import Restore, RestoreOptions
from qubes_backup_sim import launch, simgen
from qubes_backup_sim.store import write_atomic

FAKES = Path(__file__).resolve().parent / "fakes"
BIN = Path(sys.executable).parent
IMPORT = "admin.vm.volume.ImportWithSize"
SIM_IMPORT = Path(qubes_backup_sim.__file__).resolve().parent / "rpc" / IMPORT
PASSPHRASE = "fake endpoints restore passphrase"
VG = "qubes_dom0"
BACKUPS = "/home/user/backups"  # inside backupvm
IN_PROGRESS = "backup-restore-in-progress"
OWNER_PREFIX = "qubes-backup-restore-"
#: Given at creation (name, label, template) or new on this system (qid, uuid): never set as properties.
AT_CREATION = frozenset({"name", "qid", "uuid", "label", "template"})
LAST_PASS = frozenset({"netvm", "default_dispvm", "management_dispvm", "audiovm", "guivm"})
READ_SUFFIXES = (".List", ".Get", ".GetAll", ".GetDefault", ".Info", ".Index")
SMALL = ("fedora-41", "vault")  # a template and an AppVM on it: what the failure tests restore
BLOCK_DEVICE = ("dom0", "loop8", {"frontend-dev": "xvdj", "read-only": "yes"})  # simgen's work has dom0:loop7
WORK_TAG = "project-x"


HOLE = 64 << 10  # block devices have no holes to seek: the backup finds zero runs at this granularity


def assert_restored_like(src: Path, dst: Path) -> None:
    """``dst`` has ``src``'s bytes, and every 64 KiB block of zeros in ``src`` is a hole in ``dst`` (one block
    of slack: the filesystem counts its extent blocks)."""
    assert same_content(src, dst), f"{dst} differs from {src}"
    zero = bytes(HOLE)
    with open(src, "rb") as f:
        blocks = sum(1 for piece in iter(lambda: f.read(HOLE), b"") if piece != zero[: len(piece)])
    assert allocated(dst) <= (blocks + 1) * HOLE, f"{dst}: {allocated(dst)} bytes allocated, {blocks} blocks hold data"


class State(NamedTuple):
    vms: dict[str, tuple[str, str]]  # admin.vm.List
    xml: bytes  # qubes.xml, canonical
    files: dict[str, int]  # LVs, their metadata, files under /var/lib/qubes -> size


class Req(NamedTuple):
    method: str
    arg: str
    dest: str
    payload: str

    @property
    def write(self) -> bool:
        return not self.method.endswith(READ_SUFFIXES) and self.method != "admin.vm.List"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("QUBES_", "FAKE_"))}


# ------------------------------------------------------------------------------------------ the backup

@dataclass
class Source:
    dir: Path
    backup: Path
    manifest: Collection  # the qubes.xml the backup's manifest embeds
    created: int  # the backup's creation time (its header's): each restored VM's backup_timestamp
    release: str

    def lv(self, vm: str, vol: str) -> Path:
        return self.dir / "dom0/dev" / VG / f"vm-{vm}-{vol}"

    def rules(self, vm: str) -> list[str]:
        base = "vm-templates" if self.manifest[vm].klass == "TemplateVM" else "appvms"
        return firewall.xml_to_rules((self.dir / "dom0/var/lib/qubes" / base / vm / "firewall.xml").read_bytes())


def _customise(sim: Path) -> None:
    """A tag and a block device with options on work (simgen has neither), before any qubesd runs."""
    xml = sim / "dom0/var/lib/qubes/qubes.xml"
    coll = Collection.load(xml)
    el = coll["work"].element
    tags = el.find("tags")
    if tags is None:
        tags = etree.SubElement(el, "tags")
    etree.SubElement(tags, "tag", name=WORK_TAG)
    devs = el.find("devices[@class='block']")
    if devs is None:
        devs = etree.SubElement(el, "devices")
        devs.set("class", "block")
    backend, ident, options = BLOCK_DEVICE
    dev = etree.SubElement(devs, "device", id=ident)
    dev.set("backend-domain", backend)
    for k, v in options.items():
        etree.SubElement(dev, "option", name=k).text = v
    write_atomic(coll, xml)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Source]:
    """The backup of a source system of a release (made once per release, on first use)."""
    made: dict[str, Source] = {}

    def get(release: str) -> Source:
        if release not in made:
            made[release] = _make_source(tmp_path_factory, release)
        return made[release]

    return get


@pytest.fixture
def source(sources: Callable[[str], Source]) -> Source:
    """The R4.3 source system's backup (what the failure tests restore)."""
    return sources("4.3")


def _make_source(tmp_path_factory: pytest.TempPathFactory, release: str) -> Source:
    sim = tmp_path_factory.mktemp(f"source-r{release}") / "sim"
    simgen.generate(sim, "bench", seed=9, data_mib=6, apparent_gib=0.12, pool="lvm_thin", running=("work",),
                    release=release)  # fmt: skip
    _customise(sim)
    (sim / "dom0/pw").write_text(PASSPHRASE + "\n")
    argv = [str(BIN / "qvm-backup"), "-y", "-q", "-p", "/pw", "--kdf-n", "1024", "--weak-kdf-ok",
            "-d", "backupvm", BACKUPS]
    proc = subprocess.run(argv, env=clean_env() | {"QUBES_SIM": str(sim)}, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    launch.stop_qubesd(sim)
    assert proc.returncode == 0, proc.stderr
    (backup,) = (sim / "vms/backupvm" / BACKUPS.lstrip("/")).iterdir()
    job = Restore(System.from_env(clean_env()), str(backup), PASSPHRASE.encode(),
                  options=RestoreOptions(verify_only=True))  # fmt: skip
    try:
        opened = job.open()
        manifest = Collection.from_bytes(opened.qubes)
        created = int(datetime.strptime(opened.created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())
    finally:
        job.close()
    return Source(sim, backup, manifest, created, release)


# ---------------------------------------------------------------------------------- the fake endpoints

WRAPPER = '''#!{python}
"""Test QUBES_RPC_DIR service: record argv and the qrexec environment, then run the sim's import service."""
import json, os, subprocess, sys
def log(**entry):
    with open(os.environ["FAKE_IMPORT_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\\n")
log(event="start", argv=sys.argv[1:], remote=os.environ.get("QREXEC_REMOTE_DOMAIN"),
    target=os.environ.get("QREXEC_REQUESTED_TARGET"))
rc = subprocess.call([sys.executable, {service!r}, *sys.argv[1:]])
log(event="exit", argv=sys.argv[1:], target=os.environ.get("QREXEC_REQUESTED_TARGET"), rc=rc)
sys.exit(rc)
'''


@dataclass
class Target:
    tmp: Path
    location: str
    proc: subprocess.Popen[bytes] | None = None
    own: set[int] = field(default_factory=set)  # lines of the qubesd log that are the test's own requests

    @property
    def dir(self) -> Path:
        return self.tmp / "sim"

    @property
    def sock(self) -> Path:
        return self.tmp / "qubesd.sock"

    @property
    def log(self) -> Path:
        return self.tmp / "qubesd.log"

    @property
    def import_log(self) -> Path:
        return self.tmp / "import.log"

    def start(self, fail: str = "", release: str = "4.3") -> None:
        argv = [sys.executable, "-m", "qubes_backup_sim.qubesd", str(self.dir), "--socket", str(self.sock),
                "--host-paths", "--log", str(self.log), "--release", release, "--idle", "300"]  # fmt: skip
        env = clean_env() | ({"QUBES_SIM_FAIL": fail} if fail else {})
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            assert self.proc.poll() is None, "the simulated qubesd exited"
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(self.sock))
                    return
                except OSError:
                    assert time.monotonic() < deadline, "the simulated qubesd did not start"
                    time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def env(self, **extra: str) -> dict[str, str]:
        env = clean_env()
        env.update(
            QUBES_ADMIN_SOCKET=str(self.sock),
            QUBES_RPC_DIR=str(self.tmp / "rpc"),
            QUBES_LVM="false",  # a restore runs no lvm (the import service and qubesd do that)
            QUBES_DEV_DIR=str(self.dir / "dom0/dev"),
            FAKE_QREXEC_VMS=str(self.dir / "vms"),
            FAKE_IMPORT_LOG=str(self.import_log),
            USER="qbtest-no-such-user",  # dom0's home (/home/USER) does not exist: nothing of the host touched
            PATH=f"{self.tmp / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        )
        env.update(extra)
        return env

    def argv(self, *args: str) -> list[str]:
        return [str(BIN / "qvm-backup-restore"), "-y", "-p", str(self.tmp / "pw"), "--skip-dom0-home",
                *ALL_SETTINGS, "-d", "backupvm", self.location, *args]  # fmt: skip

    def restore(self, *vms: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*vms), env=self.env(**extra), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=180, check=False)  # fmt: skip

    def popen(self, *vms: str, **extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*vms), env=self.env(**extra), text=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    # -- observing
    def _log_lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def requests(self) -> list[Req]:
        """What the restores sent (not what ``state()`` asked), in order."""
        return [Req(**json.loads(line)) for i, line in enumerate(self._log_lines()) if i not in self.own]

    def imports(self) -> list[dict[str, Any]]:
        if not self.import_log.exists():
            return []
        return [json.loads(line) for line in self.import_log.read_text().splitlines()]

    def api(self) -> AdminAPI:
        return AdminAPI(self.sock)

    def qubes(self) -> Qubes:
        return Qubes(System.from_env(self.env()))

    def state(self) -> State:
        """What a failed restore must leave as it was: the VM list (asked through the API), qubes.xml, every
        LV and its metadata, and every file under /var/lib/qubes."""
        n = len(self._log_lines())
        vms = self.qubes().vm_list()
        self.own.update(range(n, len(self._log_lines())))
        dom0 = self.dir / "dom0"
        files = {str(p.relative_to(dom0)): p.stat().st_size for root in ("dev", "var/lib/qubes")
                 for p in sorted((dom0 / root).rglob("*"))
                 if p.is_file() and p.name not in ("lock", "qubes.xml")}  # fmt: skip
        parser = etree.XMLParser(remove_blank_text=True)
        xml = etree.tostring(etree.fromstring((dom0 / "var/lib/qubes/qubes.xml").read_bytes(), parser),
                             method="c14n")  # the same document (qubesd reformats it on every save)
        return State(vms, xml, files)

    def lv(self, vm: str, vol: str) -> Path:
        return self.dir / "dom0/dev" / VG / f"vm-{vm}-{vol}"


@pytest.fixture
def make_target(tmp_path: Path, source: Source) -> Iterator[Callable[..., Target]]:
    """A fresh system (dom0 + backupvm, lvm_thin) with the backup linked into backupvm and its qubesd started
    (``fail``: QUBES_SIM_FAIL for it; ``release``: 4.2 or 4.3)."""
    made: list[Target] = []

    def make(fail: str = "", release: str = "4.3", source: Source = source) -> Target:
        t = Target(tmp_path, f"{BACKUPS}/{source.backup.name}")
        simgen.generate(t.dir, "bench", seed=1, data_mib=1, apparent_gib=0.02, pool="lvm_thin", keep=("backupvm",),
                        release=release)  # fmt: skip
        backups = t.dir / "vms/backupvm" / BACKUPS.lstrip("/")
        backups.mkdir(parents=True, exist_ok=True)
        os.link(source.backup, backups / source.backup.name)
        (tmp_path / "pw").write_text(PASSPHRASE + "\n")
        for d in ("rpc", "bin"):
            (tmp_path / d).mkdir()
        service = tmp_path / "rpc" / IMPORT
        service.write_text(WRAPPER.format(python=sys.executable, service=str(SIM_IMPORT)))
        service.chmod(0o755)
        qvm_run = tmp_path / "bin/qvm-run"
        qvm_run.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKES / 'qvm_run.py'} \"$@\"\n")
        qvm_run.chmod(0o755)
        t.start(fail, release)
        made.append(t)
        return t

    yield make
    for t in made:
        t.stop()


# ------------------------------------------------------------------------------------ the exact requests

def _category(r: Req, owner: str) -> int:
    """Where a write to a restored VM belongs in its sequence (must not decrease)."""
    if r.method == "admin.vm.tag.Set":
        return 0 if r.arg == IN_PROGRESS else 1 if r.arg == owner else 4
    if r.method == "admin.vm.property.Set":
        return 7 if r.arg in LAST_PASS else 2
    if r.method == "admin.vm.feature.Set":
        return 3
    if r.method.startswith("admin.vm.device."):
        return 5
    if r.method.startswith("internal.vm.volume.") or r.method in ("admin.vm.firewall.Set", "admin.vm.notes.Set"):
        return 6
    if r.method == "admin.vm.tag.Remove":
        return 8 if r.arg == IN_PROGRESS else 9
    raise AssertionError(f"unexpected write {r}")


def expected_template(man: Collection, dom: Domain) -> str:
    if dom.klass not in ("AppVM", "DispVM"):
        return ""
    return dom.template or man.global_properties["default_template"]


def check_vm_sequence(reqs: list[Req], source: Source, name: str, release: str) -> None:
    """The writes to one restored VM, in order, against what the backup holds, as ``release`` takes them."""
    man = source.manifest
    dom = man[name]
    create = next(i for i, r in enumerate(reqs) if r.method.startswith("admin.vm.Create.")
                  and r.payload.startswith(f"name={name} "))  # fmt: skip
    c = reqs[create]
    assert (c.method, c.dest, c.arg, c.payload) == (
        f"admin.vm.Create.{dom.klass}", "dom0", expected_template(man, dom), f"name={name} label={dom.label}")
    mine = [(i, r) for i, r in enumerate(reqs) if r.write and r.dest == name]
    assert mine and all(i > create for i, _ in mine)
    writes = [r for _, r in mine]
    assert (writes[0].method, writes[0].arg) == ("admin.vm.tag.Set", IN_PROGRESS)  # before any other write
    assert writes[1].method == "admin.vm.tag.Set" and writes[1].arg.startswith(OWNER_PREFIX)
    owner = writes[1].arg
    cats = [_category(r, owner) for r in writes]
    assert cats == sorted(cats), [(r.method, r.arg) for r in writes]
    # properties: exactly the backup's non-default ones (each once), VM references in the last pass, and
    # backup_timestamp the backup's creation time
    sets = [(r.arg, r.payload) for r in writes if r.method == "admin.vm.property.Set"]
    assert len({p for p, _ in sets}) == len(sets)
    assert dict(sets) == {**{p: v for p, v in dom.properties.items() if p not in AT_CREATION},
                          "backup_timestamp": str(source.created)}  # fmt: skip
    features = {r.arg: r.payload for r in writes if r.method == "admin.vm.feature.Set"}
    assert features == {k: v for k, v in dom.features.items() if not k.startswith("backup-")}
    tags = [r.arg for r in writes if r.method == "admin.vm.tag.Set"]
    assert sorted(tags) == sorted([IN_PROGRESS, owner, *(t for t in dom.tags if not t.startswith("created-by-"))])
    assigns = [(r.method, r.arg, r.payload) for r in writes if r.method.startswith("admin.vm.device.")]
    assert assigns == [expected_assign(release, name, *d) for d in devices(dom)]
    # data: one import per save_on_stop volume, committed; the firewall once
    begins = {r.arg: r.payload for r in writes if r.method == "internal.vm.volume.ImportBegin"}
    assert begins == {v.name: str(v.size) for v in dom.volumes if v.save_on_stop}
    ends = [(r.arg, r.payload) for r in writes if r.method == "internal.vm.volume.ImportEnd"]
    assert sorted(ends) == sorted((v, "ok") for v in begins)
    assert [r.method for r in writes].count("admin.vm.firewall.Set") == 1
    # the commit: the in-progress tag removed after the last write (only our owner tag follows)
    removes = [r.arg for r in writes if r.method == "admin.vm.tag.Remove"]
    assert removes == [IN_PROGRESS, owner]
    assert [(r.method, r.arg) for r in writes[-2:]] == [("admin.vm.tag.Remove", IN_PROGRESS),
                                                        ("admin.vm.tag.Remove", owner)]  # fmt: skip


def devices(dom: Domain) -> list[tuple[str, str, str, str, str, dict[str, str]]]:
    """(class, backend, port, mode, identity, options) of each assignment in a backup's qubes.xml (an R4.2
    backup's: mode and identity empty)."""
    out = []
    for devs in dom.element.iterfind("devices"):
        for dev in devs.iterfind("device"):
            opts = {o.get("name", ""): o.text or "" for o in dev.iterfind("option")}
            out.append((devs.get("class", ""), dev.get("backend-domain", ""), dev.get("id", ""),
                        dev.get("mode", ""), dev.get("identity", ""), opts))  # fmt: skip
    return out


def expected_assign(release: str, vm: str, cls: str, backend: str, port: str, mode: str, identity: str,
                    opts: dict[str, str]) -> tuple[str, str, str]:  # fmt: skip
    """The exact request that makes one assignment on ``release`` (R4.2: Attach of the port, persistent, with
    the options; R4.3: Assign with Qubes' client's serialization)."""
    if release == "4.2":
        return (f"admin.vm.device.{cls}.Attach", f"{backend}+{port}",
                " ".join(["persistent=True", *(f"{k}={v}" for k, v in opts.items())]))  # fmt: skip
    mode = mode or ("required" if cls in ("pci", "block") else "auto-attach")
    fields = [("device_id", identity or "*"), ("port_id", port), ("devclass", cls), ("backend_domain", backend),
              ("mode", mode), ("frontend_domain", vm), *((f"_{k}", v) for k, v in opts.items())]  # fmt: skip
    return f"admin.vm.device.{cls}.Assign", f"{backend}+{port}", " ".join(f"{k}='{v}'" for k, v in fields)


def check_writes_only_to_created(reqs: list[Req], created: set[str]) -> None:
    for r in reqs:
        if not r.write:
            continue
        if r.method.startswith("admin.vm.Create."):
            assert r.dest == "dom0"
            continue
        assert r.dest in created, f"write to a VM this restore did not create: {r}"


def created_by(reqs: list[Req]) -> list[str]:
    return [r.payload.split(" ")[0].removeprefix("name=") for r in reqs if r.method.startswith("admin.vm.Create.")]


# -------------------------------------------------------------------------------------- the round trip

@pytest.mark.parametrize("release", ["4.2", "4.3"])
def test_full_restore_through_fake_endpoints(make_target: Callable[..., Target], sources: Callable[[str], Source],
                                             release: str) -> None:  # fmt: skip
    """A backup of a system of each release restored on that release: the exact calls it takes."""
    source = sources(release)
    t = make_target(release=release, source=source)
    before = t.qubes().vm_list()
    proc = t.restore()
    assert proc.returncode == 0, proc.stderr
    man = source.manifest
    wanted = [d.name for d in man.domains if not d.is_admin]
    reqs = t.requests()
    created = created_by(reqs)
    assert sorted(created) == sorted(wanted)
    check_writes_only_to_created(reqs, set(created))
    assert not any(r.method == "admin.vm.tag.Set" and r.arg.startswith("created-by-") for r in reqs)
    for name in wanted:
        check_vm_sequence(reqs, source, name, release)
    # the last pass comes after every volume's data, and every commit after the last pass
    writes = [(i, r) for i, r in enumerate(reqs) if r.write]
    last_data = max(i for i, r in writes if r.method.startswith("internal.vm.volume."))
    last_pass = [i for i, r in writes if r.method == "admin.vm.property.Set" and r.arg in LAST_PASS]
    commits = [i for i, r in writes if r.method == "admin.vm.tag.Remove"]
    assert last_pass and min(last_pass) > last_data and min(commits) > max(last_pass)
    # a PCI device is refused while virt_mode is pvh (R4.2): sys-net's hvm is set before its assignment
    sysnet = [(r.method, r.arg) for r in reqs if r.dest == "sys-net" and r.write]
    assert sysnet.index(("admin.vm.property.Set", "virt_mode")) < sysnet.index(
        (f"admin.vm.device.pci.{'Attach' if release == '4.2' else 'Assign'}", "dom0+00_14.3"))
    # no call the release does not have
    assert not [r for r in reqs if r.method.startswith("admin.vm.notes.")] or release == "4.3"
    assert not [r for r in reqs if r.method.endswith((".Assign", ".Assigned"))] or release == "4.3"
    assert not [r for r in reqs if r.method.startswith("admin.vm.device.")
                and r.method.endswith((".Attach", ".List"))] or release == "4.2"  # fmt: skip
    # the import service ran as Qubes' restore runs it, once per volume, and exited 0
    starts = [e for e in t.imports() if e["event"] == "start"]
    assert sorted((e["target"], tuple(e["argv"])) for e in starts) == sorted(
        (name, (v.name,)) for name in wanted for v in man[name].volumes if v.save_on_stop)
    assert {e["remote"] for e in starts} == {"dom0"}
    assert {e["rc"] for e in t.imports() if e["event"] == "exit"} == {0}
    qvm_run = [json.loads(line) for line in (t.dir / "vms/qvm-run.log").read_text().splitlines()]
    assert qvm_run == [["--pass-io", "--no-gui", "--service", "--", "backupvm", "qubes.Restore"]]

    # what the qubesd holds now
    q = t.qubes()
    vms = q.vm_list()
    assert set(vms) == set(before) | set(wanted)
    for name in wanted:
        dom = man[name]
        props = q.properties(name)
        nondefault = {p: v.value for p, v in props.items() if not v.default and p not in AT_CREATION}
        assert nondefault == {**{p: v for p, v in dom.properties.items() if p not in AT_CREATION},
                              "backup_timestamp": str(source.created)}, name  # fmt: skip
        assert props["label"].value == dom.label
        if dom.klass in ("AppVM", "DispVM"):
            assert props["template"].value == expected_template(man, dom)
        assert q.features(name) == {k: v for k, v in dom.features.items() if not k.startswith("backup-")}
        assert sorted(q.tags(name)) == sorted({*dom.tags, "created-by-dom0"})
        assert q.firewall_rules(name) == source.rules(name)
        if release == "4.3":
            assert q.notes(name) == f"{name}: {dom.klass}, simulated by qubes-backup-simgen\n"
        for vol in dom.volumes:
            if vol.save_on_stop:
                assert_restored_like(source.lv(name, vol.name), t.lv(name, vol.name))  # byte-exact, holes kept
    # work was running at the backup: its committed state came back, not what it wrote since its start
    assert not same_content(source.lv("work", "private"), source.lv("work", "private-snap"))
    backend, port, options = BLOCK_DEVICE
    block = q.devices("work", "block")
    assert [(d.backend, d.port, d.device_id, d.mode, d.options) for d in block] == [
        ("dom0", "loop7", "*", "required", {"frontend-dev": "xvdi", "read-only": "yes"}),
        (backend, port, "*", "required", options)]  # fmt: skip
    assert WORK_TAG in q.tags("work")
    warnings = sorted(line for line in proc.stderr.splitlines() if line.startswith("qvm-backup-restore: warning:"))
    assert warnings == []


# ------------------------------------------------------------------------------------- failing restores

def check_rolled_back(t: Target, before: State, proc_rc: int, stderr: str, vm: str) -> str:
    """Non-zero exit, one error line naming ``vm``, and the qubesd's state as before; returns the line."""
    assert proc_rc != 0
    line = one_error_line(stderr)
    assert vm in line, line
    reqs = t.requests()
    created = created_by(reqs)
    check_writes_only_to_created(reqs, set(created))
    removed = [r.dest for r in reqs if r.method == "admin.vm.Remove"]
    tagged = [r.dest for r in reqs if r.method == "admin.vm.tag.Set" and r.arg == IN_PROGRESS]
    assert tagged and sorted(removed) == sorted(tagged)  # each VM whose Create succeeded is removed again
    assert_same_state(t.state(), before)
    return line


def assert_same_state(after: State, before: State) -> None:
    assert after.vms == before.vms
    files_a, files_b = after.files, before.files
    changed = sorted(k for k in files_a.keys() | files_b.keys() if files_a.get(k) != files_b.get(k))
    assert not changed, [(k, files_b.get(k), files_a.get(k)) for k in changed]
    if after.xml != before.xml:
        import difflib

        diff = difflib.unified_diff(before.xml.decode().split("><"), after.xml.decode().split("><"))
        raise AssertionError("qubes.xml changed:\n" + "\n".join(diff))


@pytest.mark.parametrize(("fail", "vm", "words"), [
    ("admin.vm.Create.AppVM", "vault", "injected failure"),  # after fedora-41 was created
    ("admin.vm.property.Set+virt_mode@vault", "vault", "property virt_mode"),
    ("admin.vm.feature.Set+gui@fedora-41", "fedora-41", "admin.vm.feature.Set"),
    ("admin.vm.firewall.Set@vault", "vault", "admin.vm.firewall.Set"),
    ("admin.vm.property.Set+netvm@vault", "vault", "netvm"),  # the last pass, after all data
    ("admin.vm.tag.Remove+backup-restore-in-progress@vault", "vault", "injected failure"),  # mid-commit
], ids=["create", "property", "feature", "firewall", "last-pass", "commit"])  # fmt: skip
def test_qubesd_failure_removes_what_was_created(make_target: Callable[..., Target], fail: str, vm: str,
                                                 words: str) -> None:  # fmt: skip
    t = make_target(fail=fail)
    before = t.state()
    proc = t.restore(*SMALL)
    line = check_rolled_back(t, before, proc.returncode, proc.stderr, vm)
    assert words in line and "injected failure" in line, line
    assert created_by(t.requests())  # something was created, and removed again


@pytest.mark.parametrize(("mode", "words"), [
    ("reply", "injected failure (QUBES_SIM_IMPORT_FAIL=reply)"),  # exit status 0: the reply decides
    ("stop-reading", "stopped reading"),  # broken pipe
], ids=["error-reply", "broken-pipe"])  # fmt: skip
@pytest.mark.parametrize("release", ["4.2", "4.3"])
def test_import_failure_removes_what_was_created(make_target: Callable[..., Target], mode: str, words: str,
                                                 release: str) -> None:  # fmt: skip
    t = make_target(release=release)
    before = t.state()
    proc = t.restore(*SMALL, QUBES_SIM_IMPORT_FAIL=f"{mode}@vault/private")
    line = check_rolled_back(t, before, proc.returncode, proc.stderr, "vault")
    assert "volume 'private' of vault" in line and words in line, line
    if mode == "reply":
        assert {"target": "vault", "rc": 0} in [{k: e[k] for k in ("target", "rc")} for e in t.imports()
                                                 if e["event"] == "exit"]  # fmt: skip


def _wait_for(cond: Callable[[], bool], proc: subprocess.Popen[str] | None, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            _out, err = proc.communicate()
            raise AssertionError(f"the restore ended before {what}: {err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _importing(t: Target, vm: str, vol: str) -> Callable[[], bool]:
    """ImportBegin was asked (the sim qubesd logs a request before it runs it) and its ``-import`` LV exists."""
    lv = t.lv(vm, vol)
    return lambda: any(r.method == "internal.vm.volume.ImportBegin" and (r.dest, r.arg) == (vm, vol)
                       for r in t.requests()) and lv.with_name(f"{lv.name}-import").exists()  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["term", "int"])
def test_interrupted_mid_import_removes_what_was_created(make_target: Callable[..., Target],
                                                         sig: signal.Signals) -> None:  # fmt: skip
    t = make_target()
    before = t.state()
    proc = t.popen(*SMALL, QUBES_SIM_IMPORT_FAIL="stall@vault/private", QUBES_BACKUP_IMPORT_GRACE="1")
    try:
        _wait_for(_importing(t, "vault", "private"), proc, "the import of vault's private volume")
        assert (t.lv("vault", "private").parent / "vm-vault-private-import").exists()  # mid-import
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert one_error_line(err).endswith("interrupted"), err
    reqs = t.requests()
    created = created_by(reqs)
    assert sorted(created) == sorted(SMALL)
    check_writes_only_to_created(reqs, set(created))
    assert_same_state(t.state(), before)


@pytest.mark.parametrize(("release", "mode"), [("4.2", "slow"), ("4.3", "slow"), ("4.3", "stall")])
def test_interrupted_restore_leaves_nothing_in_tmp(make_target: Callable[..., Target], tmp_path: Path,
                                                   release: str, mode: str) -> None:  # fmt: skip
    """With an import service that keeps a temporary file as Qubes' script does (tests/fakes/
    import_like_qubes.sh: mktemp + EXIT trap), a restore interrupted mid-import stops the imports by ending
    their input: an import still reading (``slow``) ends itself (ImportEnd fail), no signal needed; one that
    hangs (``stall``: it reads nothing, the restore's write into its full pipe blocks) gets SIGTERM after the
    grace time, and its trap still runs.  Either way nothing of the script's or ours is left in dom0's /tmp
    (TMPDIR)."""
    t = make_target(release=release)
    service = t.tmp / "rpc" / IMPORT
    service.write_text((FAKES / "import_like_qubes.sh").read_text())
    service.chmod(0o755)
    dom0_tmp = tmp_path / "dom0-tmp"
    dom0_tmp.mkdir()
    trace = tmp_path / "trace"
    before = t.state()
    proc = t.popen(*SMALL, TMPDIR=str(dom0_tmp), FAKE_PYTHON=sys.executable, FAKE_SIM_IMPORT=str(SIM_IMPORT),
                   FAKE_IMPORT_TRACE=str(trace), QUBES_SIM_IMPORT_FAIL=f"{mode}@vault/private",
                   QUBES_BACKUP_IMPORT_GRACE="1")  # fmt: skip
    try:
        _wait_for(_importing(t, "vault", "private"), proc, "the import of vault's private volume")
        assert list(dom0_tmp.iterdir())  # the script's temporary file, while it runs
        time.sleep(0.2)  # data flowing
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and one_error_line(err).endswith("interrupted"), err
    events = trace.read_text().splitlines()
    assert "start vault private" in events
    ends = [r for r in t.requests() if (r.method, r.dest, r.arg) == ("internal.vm.volume.ImportEnd", "vault",
                                                                      "private")]  # fmt: skip
    if mode == "slow":
        assert "exit vault private 0" in events  # ended by the end of its input
        assert not [e for e in events if e.startswith("TERM")], events
        assert [r.payload.split("\n")[0] for r in ends] == ["fail"]  # the script ended the import itself
    else:
        assert "TERM vault private" in events and ends == []  # qubesd drops the -import LV with the VM
    assert list(dom0_tmp.iterdir()) == []
    assert_same_state(t.state(), before)


def test_killed_restore_is_cleaned_up_by_the_next(make_target: Callable[..., Target], source: Source) -> None:
    t = make_target()
    before = t.state()
    proc = t.popen(*SMALL, QUBES_SIM_IMPORT_FAIL="stall@vault/private")
    try:
        _wait_for(_importing(t, "vault", "private"), proc, "the import of vault's private volume")
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # nothing of the restore ran after kill -9; the stalled import saw the hang-up and ended itself
    _wait_for(lambda: any(e["event"] == "exit" and e["target"] == "vault" for e in t.imports()),
              None, "the stalled import to end")  # fmt: skip
    first = t.requests()
    assert sorted(created_by(first)) == sorted(SMALL)
    check_writes_only_to_created(first, set(SMALL))
    q = t.qubes()
    for name in SMALL:  # left tagged: Qubes refuses to start them
        assert IN_PROGRESS in q.tags(name)
    with pytest.raises(QubesdError, match="being restored"):
        t.api().call("admin.vm.Start", "vault")
    assert not (t.lv("vault", "private").parent / "vm-vault-private-import").exists()

    n = len(t.requests())
    proc2 = t.restore(*SMALL)
    assert proc2.returncode == 0, proc2.stderr
    second = t.requests()[n:]
    removes = [i for i, r in enumerate(second) if r.method == "admin.vm.Remove"]
    creates = [i for i, r in enumerate(second) if r.method.startswith("admin.vm.Create.")]
    assert sorted(second[i].dest for i in removes) == sorted(SMALL)  # the leftovers, dependants first
    assert [second[i].dest for i in removes] == ["vault", "fedora-41"]
    assert max(removes) < min(creates)
    check_writes_only_to_created(second, set(SMALL))
    after = t.state()
    assert set(after.vms) == set(before.vms) | set(SMALL)
    for name in SMALL:
        check_vm_sequence(second[min(creates):], source, name, "4.3")
        for vol in source.manifest[name].volumes:
            if vol.save_on_stop:
                assert_restored_like(source.lv(name, vol.name), t.lv(name, vol.name))
