"""The qrexec policy of the simulated dom0, applied to Admin API calls from VMs other than dom0.

On a real system a VM's Admin API call reaches qubesd only when the qrexec policy (``/etc/qubes/policy.d``)
allows it: the first rule whose service, argument, source and target match decides (``allow``; ``deny``,
and ``ask`` with nobody to ask, refuse).  The simulated qubesd does the same for a request whose source is
not dom0, with the rules of ``DIR/dom0/etc/qubes/policy.d/*.policy`` (new syntax only; directives are not
simulated and refuse every call, as a policy qrexec cannot load would).  Tokens: a VM name, ``@adminvm``,
``@anyvm`` (any VM but dom0), ``@tag:T``, ``@type:CLASS``; ``*`` for the service or argument.

``shipped/`` holds the rules of Qubes' own ``85-admin-backup-restore.policy`` (qubes-core-admin,
``qubes-rpc-policy/``), which ``install_shipped`` puts into a simulated dom0 as a Qubes install has it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from qubes_backup_dom0.qubes.qubesxml import Collection, Domain

from .exc import ApiError

POLICY_DIR = "etc/qubes/policy.d"
SHIPPED = Path(__file__).resolve().parent / "shipped"
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


def install_shipped(dom0: Path) -> None:
    """Put Qubes' shipped policy files (``shipped/``) into a simulated dom0."""
    pdir = dom0 / POLICY_DIR
    pdir.mkdir(parents=True, exist_ok=True)
    for path in sorted(SHIPPED.glob("*.policy")):
        shutil.copyfile(path, pdir / path.name)
