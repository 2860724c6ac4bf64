"""The qrexec policy of the simulated dom0, applied to Admin API calls from VMs other than dom0.

On a real system a VM's Admin API call reaches qubesd only when the qrexec policy (``/etc/qubes/policy.d``)
allows it: the first rule whose service, argument, source and target match decides (``allow``; ``deny``,
and ``ask`` with nobody to ask, refuse).  The simulated qubesd does the same for a request whose source is
not dom0, with the rules of ``DIR/dom0/etc/qubes/policy.d/*.policy`` (new syntax only; directives are not
simulated and refuse every call, as a policy qrexec cannot load would).  Tokens: a VM name, ``@adminvm``,
``@anyvm`` (any VM but dom0), ``@tag:T``, ``@type:CLASS``; ``*`` for the service or argument.

``install_shipped`` writes into a simulated dom0 what a Qubes install has in its
``85-admin-backup-restore.policy`` (qubes-core-admin, ``qubes-rpc-policy/``): the rules that let a VM tagged
``backup-restore-mgmt`` (Qubes' paranoid restore) create VMs and change every VM tagged
``backup-restore-in-progress``.  They are stated here as our own table (``restore_rules``);
tests/test_policy.py checks them against Qubes' sources where those are at hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qubes_backup_dom0.qubes.qubesxml import Collection, Domain

from .exc import ApiError

POLICY_DIR = "etc/qubes/policy.d"
SHIPPED_NAME = "85-admin-backup-restore.policy"
MAX_POLICY = 1 << 20


@dataclass(frozen=True)
class Rule:
    service: str
    argument: str
    source: str
    target: str
    action: str
    where: str


def load(dom0: Path) -> list[Rule]:
    """The rules of the simulated dom0's policy directory, in qrexec's order (file names, then lines)."""
    rules: list[Rule] = []
    pdir = dom0 / POLICY_DIR
    if not pdir.is_dir():
        return rules
    for path in sorted(pdir.glob("*.policy")):
        if path.name.startswith("."):
            continue
        for lineno, raw in enumerate(path.read_text("utf-8")[:MAX_POLICY].splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            words = line.split()
            where = f"{path.name}:{lineno}"
            if line.startswith("!") or len(words) < 5 or words[4] not in ("allow", "deny", "ask"):
                raise ApiError("PermissionDenied", f"policy {where}: not understood by the simulation")
            rules.append(Rule(words[0], words[1], words[2], words[3], words[4], where))
    return rules


def _matches(token: str, name: str, coll: Collection) -> bool:
    dom: Domain | None = coll.get(name)
    if dom is None:
        return False
    if token in ("@adminvm", "dom0"):
        return dom.is_admin
    if token == "@anyvm":
        return not dom.is_admin
    if token.startswith("@tag:"):
        return token[5:] in dom.tags
    if token.startswith("@type:"):
        return dom.klass == token[6:]
    return not token.startswith("@") and token == name


def check(dom0: Path, coll: Collection, method: str, arg: str, src: str, dest: str) -> None:
    """Refuse (qubesd's PermissionDenied, as qrexec's refusal reaches the caller) unless the policy allows
    ``src`` to call ``method+arg`` on ``dest``."""
    for rule in load(dom0):
        if rule.service not in ("*", method) or rule.argument not in ("*", f"+{arg}"):
            continue
        if not _matches(rule.source, src, coll) or not _matches(rule.target, dest, coll):
            continue
        if rule.action == "allow":
            return
        raise ApiError("PermissionDenied", f"{method} from {src} to {dest} denied by policy {rule.where}")
    raise ApiError("PermissionDenied", f"{method} from {src} to {dest}: no policy rule allows it")


_MGMT, _IN_PROGRESS = "@tag:backup-restore-mgmt", "@tag:backup-restore-in-progress"
_TO_DOM0 = ["admin.vm.Create.AppVM", "admin.vm.Create.StandaloneVM", "admin.vm.Create.TemplateVM",
            "admin.vm.List"]  # fmt: skip
_TO_ANY = [("admin.vm.List", "*"), ("admin.vm.property.Get", "+provides_network"),
           ("admin.vm.property.Get", "+template_for_dispvms")]  # fmt: skip
_ON_RESTORED = ["feature.Set", "firewall.Set", "property.Set", "tag.Set", "volume.Import",
                "volume.ImportWithSize", "volume.Info", "volume.List", "volume.Set.revisions_to_keep"]  # fmt: skip


def restore_rules() -> list[tuple[str, str, str, str, str]]:
    """(service, argument, source, target, action + parameters) of Qubes' restore policy, in its order."""
    rules = [(svc, "*", _MGMT, "dom0", "allow target=dom0") for svc in _TO_DOM0]
    rules += [(svc, arg, _MGMT, "@anyvm", "allow target=dom0") for svc, arg in _TO_ANY]
    rules += [(f"admin.vm.{svc}", "*", _MGMT, _IN_PROGRESS, "allow target=dom0") for svc in _ON_RESTORED]
    rules.append(("qubes.RestoreById", "*", _MGMT, "@tag:backup-restore-storage", "allow"))
    return rules


def install_shipped(dom0: Path) -> None:
    """Write the restore policy a Qubes install ships (``restore_rules``) into a simulated dom0."""
    pdir = dom0 / POLICY_DIR
    pdir.mkdir(parents=True, exist_ok=True)
    lines = ["# Qubes OS' restore policy rules, as the simulation states them (qubes_backup_sim.policy)"]
    lines += [" ".join(rule) for rule in restore_rules()]
    (pdir / SHIPPED_NAME).write_text("\n".join(lines) + "\n")
