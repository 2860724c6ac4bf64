"""Reading this system's qrexec policy (qubes/policy.py) and the simulated qubesd applying it to VMs' calls
(qubes_backup_sim/policy.py): which tags a restore must never bring back, who could change the VMs a restore
creates."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import Sim
from qubes_backup_dom0.qubes.adminapi import AdminAPI
from qubes_backup_dom0.qubes.policy import read_policy
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.restore import risk
from qubes_backup_sim import policy as sim_policy
from vm_calls import call_as, refused

QUBES_ADMIN_GIT = Path(os.environ.get("QUBES_CORE_ADMIN_GIT", "/work/.mirror/QubesOS+qubes-core-admin/repo"))


def _system(tmp_path: Path) -> System:
    dom0 = tmp_path / "dom0"
    (dom0 / "home/user").mkdir(parents=True, exist_ok=True)
    return System(tmp_path, dom0, "user")


def _write(system: System, rel: str, text: str) -> Path:
    path = system.dom0_path(rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_shipped_restore_policy_grants_the_mgmt_tag(tmp_path: Path) -> None:
    system = _system(tmp_path)
    sim_policy.install_shipped(system.dom0_root)
    facts = read_policy(system)
    assert facts.complete, facts.problems
    assert {"backup-restore-mgmt", "backup-restore-in-progress", "backup-restore-storage"} <= facts.granting_tags
    sources = {g.source for g in facts.in_progress_grants}
    assert sources == {"@tag:backup-restore-mgmt"}
    assert {g.service for g in facts.in_progress_grants} >= {"admin.vm.property.Set", "admin.vm.volume.Import"}


def test_shipped_rules_are_qubes_own() -> None:
    """The simulation's statement of 85-admin-backup-restore.policy has exactly the rules Qubes ships
    (checked against qubes-core-admin's sources where they are at hand)."""
    if not (QUBES_ADMIN_GIT / "HEAD").exists():
        pytest.skip("qubes-core-admin sources not available (QUBES_CORE_ADMIN_GIT)")

    def rules(text: str) -> list[list[str]]:
        return [ln.split() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]

    ours = [" ".join(rule).split() for rule in sim_policy.restore_rules()]
    for branch in ("release4.2", "release4.3"):
        theirs = subprocess.run(["git", "-C", str(QUBES_ADMIN_GIT), "show",
                                 f"{branch}:qubes-rpc-policy/85-admin-backup-restore.policy"],
                                capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert rules(theirs) == ours, branch


def test_tags_of_allow_and_ask_rules_are_trusted_deny_only_tags_are_not(tmp_path: Path) -> None:
    system = _system(tmp_path)
    _write(system, "/etc/qubes/policy.d/30-user.policy", "\n".join([
        "# comment @tag:in-a-comment",
        "qubes.Filecopy * @tag:work-trusted @anyvm allow",
        "qubes.OpenURL * @anyvm @dispvm:@tag:browser ask default_target=@dispvm",
        "qubes.VMShell * @tag:quarantine @anyvm deny",
        "qubes.Gpg + @tag:gpg-client @tag:gpg-server allow",
        "!include include/extra",
        "!include-service qubes.Old * /etc/qubes/old-style",
        "this line is not understood @tag:odd",
    ]))  # fmt: skip
    _write(system, "/etc/qubes/policy.d/include/extra", "admin.vm.List * @tag:lister dom0 allow target=dom0\n")
    _write(system, "/etc/qubes/old-style", "$tag:legacy $anyvm allow,user=root\n$include:/etc/qubes/old-2\n")
    _write(system, "/etc/qubes/old-2", "$tag:legacy2 dom0 ask\n@tag:nope @anyvm deny\n")
    _write(system, "/etc/qubes/policy.d/.hidden.policy", "x * @tag:hidden @anyvm allow\n")
    _write(system, "/etc/qubes/policy.d/README", "x * @tag:readme @anyvm allow\n")
    facts = read_policy(system)
    assert facts.complete, facts.problems
    assert facts.granting_tags == {"work-trusted", "browser", "gpg-client", "gpg-server", "lister", "legacy",
                                   "legacy2", "odd"}  # fmt: skip
    assert facts.deny_tags == {"quarantine", "nope"}
    assert risk.policy_tag_reason("work-trusted", facts) is not None
    assert risk.policy_tag_reason("quarantine", facts) is None  # shown and asked about, as every other tag
    assert risk.policy_tag_reason("created-by-sys-gui", facts) is not None
    assert risk.policy_tag_reason("disp-created-by-x", facts) is not None


def test_unreadable_policy_trusts_no_tag(tmp_path: Path) -> None:
    system = _system(tmp_path)
    _write(system, "/etc/qubes/policy.d/50-big.policy", "x" * ((1 << 20) + 1))
    _write(system, "/etc/qubes/policy.d/60-loop.policy", "!include 60-loop.policy\n")
    _write(system, "/etc/qubes/policy.d/70-x.policy", "!include /etc/qubes/missing\n!weird directive\n")
    _write(system, "/etc/qubes/policy.d/Bad-Name.policy", "x * @tag:a @anyvm allow\n")
    facts = read_policy(system)
    assert not facts.complete
    text = " ".join(facts.problems)
    for what in ("50-big.policy is larger", "nested deeper", "/etc/qubes/missing", "not understood", "Bad-Name"):
        assert what in text, (what, facts.problems)
    assert risk.policy_tag_reason("anything", facts) is not None


def test_restore_managers(tmp_path: Path) -> None:
    system = _system(tmp_path)
    sim_policy.install_shipped(system.dom0_root)
    _write(system, "/etc/qubes/policy.d/20-admin.policy",
           "admin.vm.property.Set * salt-dvm @tag:backup-restore-in-progress allow target=dom0\n"
           "admin.vm.tag.Set * @type:StandaloneVM @tag:backup-restore-in-progress allow target=dom0\n")  # fmt: skip
    facts = read_policy(system)
    vms = {"work": "AppVM", "salt-dvm": "AppVM", "old": "StandaloneVM", "plain": "AppVM"}
    tags = {"work": ["backup-restore-mgmt"], "salt-dvm": [], "old": [], "plain": ["other"]}
    found = risk.restore_managers(vms, tags, facts)
    assert [f.split(" ")[0] for f in found] == ["work", "salt-dvm", "old"]
    assert risk.restore_managers({"plain": "AppVM"}, {"plain": ["other"]}, facts) == []
    line = risk.managers_error(found)
    assert "qvm-tags work del backup-restore-mgmt" in line and "\n" not in line
    assert risk.restore_managers({"work": "AppVM"}, {"work": ["backup-restore-mgmt"]}, None)  # policy unread


# ----------------------------------------------------------------------------- the simulated qubesd's policy

def test_simulated_qubesd_applies_the_policy_to_a_vms_calls(sim: Sim) -> None:
    """A call from a VM reaches the simulated qubesd's handlers only if a policy rule for that VM's tags
    allows it (Qubes' 85-admin-backup-restore rules: a VM tagged backup-restore-mgmt may set properties of VMs
    tagged backup-restore-in-progress, of no other VM; an untagged VM nothing)."""
    system = sim.system
    dom0 = AdminAPI(system.admin_socket())
    dom0.call("admin.vm.tag.Set", "personal", "backup-restore-in-progress")
    assert refused(system, "work", "admin.vm.property.Set", "personal", "kernelopts", b"evil")
    dom0.call("admin.vm.tag.Set", "work", "backup-restore-mgmt")
    call_as(system, "work", "admin.vm.property.Set", "personal", "kernelopts", b"evil")
    assert dom0.call("admin.vm.property.Get", "personal", "kernelopts").endswith(b"evil")
    assert refused(system, "work", "admin.vm.property.Set", "vault", "kernelopts", b"evil")  # not in progress
    assert refused(system, "vault", "admin.vm.property.Set", "personal", "kernelopts", b"evil")  # no tag
    assert refused(system, "work", "admin.vm.Remove", "personal")  # no rule for it
