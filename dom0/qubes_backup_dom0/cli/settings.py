"""qvm-backup-restore: the settings of a backup that grant power -- shown with the plan, asked about, and
one warning line for each that is not restored (restore/risk.py decides what they are).

Asked only when the user is asked anyway (a terminal, no ``-y``, no ``-p``); otherwise only
``--restore-devices`` and ``--restore-risky-settings`` restore them.  Tags a qrexec policy trusts are never
restored and never asked about.  Every text from the backup is neutralised before it is printed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qubes_backup_dom0.cli.common import confirm
from qubes_backup_dom0.restore import risk
from qubes_backup_dom0.text import printable

if TYPE_CHECKING:
    from qubes_backup_dom0.restore.apply import Leftovers
    from qubes_backup_dom0.restore.plan import RestorePlan

QUESTIONS = {
    risk.DEVICES: ("device assignments", "Restore the device assignments marked [devices] above too?"),
    risk.RISKY: ("settings that grant power", "Restore the settings marked [risky] above too?"),
}
_MARK = {risk.DEVICES: "[devices]", risk.RISKY: "[risky]", risk.NEVER: "[never]"}


def _shown_name(plan: RestorePlan, vm: str) -> str:
    return plan.renames.get(vm, vm)


def plan_lines(plan: RestorePlan) -> list[str]:
    """What the plan shows below its table: every setting that grants power, per VM, and what happens."""
    settings = plan.settings
    if not settings.items:
        return []
    lines = ["Settings that grant power (restored only if you agree, or with --restore-devices / "
             "--restore-risky-settings; [never]: tags a qrexec policy trusts, never restored):"]  # fmt: skip
    for s in settings.items:
        state = "restore" if settings.restores(s) else "not restored"
        why = f": {s.why}" if s.needs == risk.NEVER else ""
        lines.append(printable(f"  {_shown_name(plan, s.vm)}: {_MARK[s.needs]} {s.text} ({state}{why})"))
    lines += [printable(f"  note: {p}") for p in settings.policy_problems]
    return lines


def ask(plan: RestorePlan) -> None:
    """Ask about each kind of setting not granted yet (the caller knows the user can be asked)."""
    settings = plan.settings
    for needs, (_what, question) in QUESTIONS.items():
        if needs not in settings.granted and settings.asked(needs) and confirm(question, False):
            settings.granted.add(needs)


def dropped_lines(plan: RestorePlan) -> list[str]:
    """One warning line (without ``warning:``) per setting that will not be restored, neutralised."""
    settings = plan.settings
    return [printable(settings.warning(s, _shown_name(plan, s.vm))) for s in settings.not_restored()]


def to_json(plan: RestorePlan, vm: str | None = None) -> list[dict[str, Any]]:
    """The settings (of one VM, or all) as docs/JSON.md describes them."""
    settings = plan.settings
    items = settings.items if vm is None else settings.of(vm)
    out = []
    for s in items:
        entry: dict[str, Any] = {"kind": s.kind, "name": s.name, "value": s.value, "needs": s.needs,
                                 "restore": settings.restores(s), "reason": s.why or None}  # fmt: skip
        if vm is None:
            entry = {"vm": _shown_name(plan, s.vm), **entry}
        out.append(entry)
    return out


def leftover_lines(leftovers: Leftovers) -> list[str]:
    if not leftovers:
        return []
    return ["Before restoring, what killed restores left is cleaned up:", *(f"  {d}" for d in leftovers.describe())]
