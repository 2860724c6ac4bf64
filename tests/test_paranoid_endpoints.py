"""Paranoid mode through the real endpoints' code path (QUBES_SIM unset): qvm-run for both services.

The harness of test_real_endpoints_restore.py (the simulated qubesd on its own socket with a request log, at
release 4.2 and 4.3; the fake ``qvm-run`` on PATH that starts the real service file in ``vms/VM``) with a fresh
system that has a template for disposables.  Checked on the exact requests: the DisposableVM is made with
``admin.vm.CreateDisposable`` from the system's default_dispvm (then, once set, from management_dispvm), tagged
and without network before it is started, and killed at the end (qubesd's auto-cleanup removes it); every
write goes to a VM this restore created or to the DisposableVM; a restored VM gets the in-progress and owner
tags, allow-listed properties and features, its volumes, and nothing else (no tag, device, firewall, notes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import one_error_line
from qubes_backup_protocol import plan_frames as pf
from qubes_backup_sim import simgen
from test_real_endpoints_restore import (
    BACKUPS,
    FAKES,
    IMPORT,
    IN_PROGRESS,
    OWNER_PREFIX,
    PASSPHRASE,
    SIM_IMPORT,
    WRAPPER,
    Req,
    Source,
    Target,
    assert_restored_like,
    assert_same_state,
    sources,  # noqa: F401 - the module's backups, made once per release
)

DISP_TAG = "qubes-backup-disp-"
KEEP = ("backupvm", "fedora-41", "fedora-41-dvm")
WANTED = ("work", "vault", "sys-net")


@pytest.fixture
def make_target(tmp_path: Path, sources: Callable[[str], Source]) -> Iterator[Callable[..., Target]]:  # noqa: F811
    """A fresh system of ``release`` with a template for disposables, the backup of a system of that release
    linked into its backupvm, its qubesd started."""
    made: list[Target] = []

    def make(release: str) -> Target:
        source = sources(release)
        t = Target(tmp_path, f"{BACKUPS}/{source.backup.name}")
        simgen.generate(t.dir, "bench", seed=1, data_mib=1, apparent_gib=0.02, pool="lvm_thin", keep=KEEP,
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
        t.start("", release)
        made.append(t)
        return t

    yield make
    for t in made:
        t.stop()


def para(t: Target, *vms: str) -> subprocess.CompletedProcess[str]:
    """The harness's restore, in paranoid mode (which refuses --restore-devices/--restore-risky-settings)."""
    argv = [a for a in t.argv(*vms) if a not in ("--restore-devices", "--restore-risky-settings")]
    return subprocess.run([*argv, "--paranoid-mode"], env=t.env(), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=180, check=False)  # fmt: skip


def _writes_to(reqs: list[Req], vm: str) -> list[Req]:
    return [r for r in reqs if r.write and r.dest == vm]


@pytest.mark.parametrize("release", ["4.2", "4.3"])
def test_paranoid_restore_through_fake_endpoints(make_target: Callable[..., Target],
                                                 sources: Callable[[str], Source], release: str) -> None:  # noqa: F811
    t = make_target(release)
    source = sources(release)
    before = t.qubes().vm_list()
    proc = para(t, *WANTED)
    assert proc.returncode == 0, proc.stderr
    reqs = t.requests()
    (create,) = [r for r in reqs if r.method == "admin.vm.CreateDisposable"]
    assert (create.dest, create.arg, create.payload) == ("fedora-41-dvm", "", "")  # default_dispvm (no management)
    disp = next(r.dest for r in reqs if r.method == "admin.vm.tag.Set" and r.arg.startswith(DISP_TAG))
    first = [(r.method, r.arg, r.payload) for r in _writes_to(reqs, disp)]
    assert first[0][:2] == ("admin.vm.tag.Set", first[0][1]) and first[0][1].startswith(DISP_TAG)
    assert first[1:3] == [("admin.vm.property.Set", "netvm", ""), ("admin.vm.Start", "", "")]
    assert first[-1][:1] == ("admin.vm.Kill",) and disp not in t.qubes().vm_list()
    qvm_run = [json.loads(line) for line in (t.dir / "vms/qvm-run.log").read_text().splitlines()]
    assert sorted(qvm_run) == [["--pass-io", "--no-gui", "--service", "--", "backupvm", "qubes.Restore"],
                               ["--pass-io", "--no-gui", "--service", "--", disp, pf.SERVICE]]  # fmt: skip
    created = [r.payload.split(" ")[0].removeprefix("name=") for r in reqs if r.method.startswith("admin.vm.Create.")]
    assert sorted(created) == sorted(WANTED)
    for r in reqs:
        if r.write and not r.method.startswith(("admin.vm.Create.", "admin.vm.CreateDisposable")):
            assert r.dest in (*created, disp), f"write to a VM this restore did not create: {r}"
    man = source.manifest
    for name in WANTED:
        writes = _writes_to(reqs, name)
        assert (writes[0].method, writes[0].arg) == ("admin.vm.tag.Set", IN_PROGRESS)
        owner = writes[1].arg
        assert owner.startswith(OWNER_PREFIX)
        kinds = {(r.method, r.arg) for r in writes}
        props = {r.arg: r.payload for r in writes if r.method == "admin.vm.property.Set"}
        feats = {r.arg for r in writes if r.method == "admin.vm.feature.Set"}
        assert set(props) <= {*pf.PROPERTY_CODES, "netvm", "default_dispvm"}, (name, props)
        assert all(pf.feature_allowed(f) for f in feats), (name, feats)
        assert {m for m, _ in kinds} <= {"admin.vm.tag.Set", "admin.vm.property.Set", "admin.vm.feature.Set",
                                         "internal.vm.volume.ImportBegin", "internal.vm.volume.ImportEnd",
                                         "admin.vm.tag.Remove"}, (name, kinds)  # fmt: skip
        assert {a for m, a in kinds if m == "admin.vm.tag.Set"} == {IN_PROGRESS, owner}
        assert [(r.method, r.arg) for r in writes[-2:]] == [("admin.vm.tag.Remove", IN_PROGRESS),
                                                            ("admin.vm.tag.Remove", owner)]  # fmt: skip
        dom = man[name]
        if man.effective_netvm(dom) is None:
            assert props.get("netvm") == ""
        else:
            assert "netvm" not in props  # this system's default, never the VM the backup names
        for vol in dom.volumes:
            if vol.save_on_stop:
                assert_restored_like(source.lv(name, vol.name), t.lv(name, vol.name))
    q = t.qubes()
    assert set(q.vm_list()) == set(before) | set(WANTED)
    assert q.devices("work", "block") == [] and "project-x" not in q.tags("work")
    assert q.properties("sys-net")["provides_network"].default  # a risky setting: never from the backup


def test_paranoid_uses_management_dispvm_and_cleans_up_a_killed_ones(make_target: Callable[..., Target]) -> None:
    """management_dispvm first, as Qubes' own paranoid restore; a DisposableVM a killed restore left is removed
    by the next one, and a failing restore (wrong passphrase) removes its own."""
    t = make_target("4.3")
    api = t.api()
    api.call("admin.property.Set", "dom0", "management_dispvm", b"fedora-41-dvm")
    base = t.state()
    name = api.call("admin.vm.CreateDisposable", "fedora-41-dvm").decode()
    api.call("admin.vm.tag.Set", name, "qubes-backup-disp-999999-1-deadbeef")  # its owner is long gone
    api.call("admin.vm.Start", name)
    mine = len(t.requests())
    (t.tmp / "pw").write_text("wrong\n")
    proc = para(t, "work")
    assert proc.returncode == 3 and "wrong passphrase" in one_error_line(proc.stderr), proc.stderr
    reqs = t.requests()[mine:]
    assert [r.dest for r in reqs if r.method == "admin.vm.CreateDisposable"] == ["fedora-41-dvm"]
    methods = [(r.method, r.dest) for r in reqs]
    assert methods.index(("admin.vm.Kill", name)) < methods.index(("admin.vm.CreateDisposable", "fedora-41-dvm"))
    assert_same_state(t.state(), base)  # both disposables gone, nothing else changed
