"""Settings of a backup that grant power, and tags that policies trust (docs/SECURITY.md, "Backups from a
compromised machine").

A backup made on a compromised machine verifies under the user's passphrase, and every setting in it is the
attacker's choice.  Planning sorts each restored VM's settings into:

- **never restored**: tags a qrexec policy trusts -- Qubes' restore tags (``backup-restore-mgmt``,
  ``backup-restore-storage``, ``backup-restore-in-progress``), ``created-by-*``, ``disp-created-by-*``, our
  owner tags, and every tag a policy file of this system grants rights to (``qubes/policy.py``; when a
  policy file cannot be read, every tag);
- **devices** (restored with the user's yes, or ``--restore-devices``): every persistent device assignment,
  with its options (``permissive``, ``no-strict-reset`` ...), and ``virt_mode`` hvm where it comes with PCI
  devices (Qubes refuses PCI devices to a PVH VM);
- **risky settings** (the user's yes, or ``--restore-risky-settings``): the properties and features below,
  the remaining tags, and firewall rules wider than the default a new VM gets here;
- everything else is restored as it is.

This module only decides; ``apply.py`` does what the plan says, and the CLI shows and asks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from qubes_backup_dom0.qubes.policy import MGMT, PolicyFacts
from qubes_backup_dom0.qubes.qubesxml import Domain

DEVICES = "devices"  # granted by --restore-devices (or the user's yes)
RISKY = "risky-settings"  # granted by --restore-risky-settings (or the user's yes)
NEVER = "never"

#: Properties that give a VM power over others, over dom0's GUI/audio, or weaken its own isolation.
RISKY_PROPERTIES = frozenset({
    "autostart", "provides_network", "guivm", "audiovm", "management_dispvm", "virt_mode", "kernelopts",
    "debug", "default_user", "ip", "ip6", "mac",
})  # fmt: skip
#: Features read by qemu / the stubdomain, the GUI daemon, or qubesd when this VM creates VMs.
RISKY_FEATURES = frozenset({
    "qemu-extra-args", "linux-stubdom", "stubdom-qrexec", "audio-model", "video-model", "internal",
    "tag-created-vm-with", "set-created-guivm", "set-created-audiovm", "no-default-kernelopts",
})  # fmt: skip
RISKY_FEATURE_PREFIXES = ("gui-", "qemu-", "stubdom-")
#: Tags Qubes' own policy (85-admin-backup-restore.policy) or qubesd trust, and our own owner tags.
RESTORE_TAGS = frozenset({MGMT, "backup-restore-storage", "backup-restore-in-progress"})
TAG_PREFIXES = ("created-by-", "disp-created-by-", "qubes-backup-restore-")


@dataclass(frozen=True)
class Setting:
    """One setting of a restored VM that is shown, and restored only when its ``needs`` is granted."""

    vm: str  # the VM's name in the backup
    kind: str  # "device", "property", "feature", "tag", "firewall"
    name: str  # property/feature/tag name; a device: CLASS:BACKEND:IDENT
    value: str  # as it would be set (a device: its options as k=v ...)
    needs: str  # DEVICES, RISKY or NEVER
    why: str = ""  # NEVER: why it is never restored

    @property
    def text(self) -> str:
        """How the plan and the warnings name it (text from the backup: neutralised where printed)."""
        if self.kind == "device":
            devclass, backend, ident = self.name.split(":", 2)
            opts = f" ({self.value})" if self.value else ""
            return f"{devclass} device {backend}:{ident}{opts}"
        if self.kind == "tag":
            return f"tag {self.name}"
        if self.kind == "firewall":
            return "firewall rules wider than a new VM's default here"
        return f"{self.kind} {self.name}={self.value}"

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.name


@dataclass
class Settings:
    """The settings of a plan's restored VMs that grant power, and which of them are granted."""

    items: list[Setting] = field(default_factory=list)
    granted: set[str] = field(default_factory=set)  # DEVICES and/or RISKY
    policy_problems: list[str] = field(default_factory=list)

    def restores(self, setting: Setting) -> bool:
        return setting.needs in self.granted

    def of(self, vm: str) -> list[Setting]:
        return [s for s in self.items if s.vm == vm]

    def dropped(self, vm: str, kind: str, name: str) -> bool:
        """True when the VM's setting is listed here and not granted (unlisted settings are restored)."""
        return any(s.kind == kind and s.name == name and not self.restores(s) for s in self.items if s.vm == vm)

    def asked(self, needs: str) -> list[Setting]:
        return [s for s in self.items if s.needs == needs]

    def not_restored(self) -> list[Setting]:
        return [s for s in self.items if not self.restores(s)]

    def warning(self, setting: Setting, shown_name: str) -> str:
        """The one warning line of a setting that is not restored."""
        if setting.needs == NEVER:
            return f"VM {shown_name}: {setting.text} not restored: {setting.why}"
        option = "--restore-devices" if setting.needs == DEVICES else "--restore-risky-settings"
        return f"VM {shown_name}: {setting.text} not restored (it grants power; add {option} to restore it)"


def is_restore_tag(tag: str) -> bool:
    return tag in RESTORE_TAGS or tag.startswith(TAG_PREFIXES)


def policy_tag_reason(tag: str, facts: PolicyFacts | None) -> str | None:
    """Why ``tag`` is never restored, or None when it is an ordinary tag."""
    if is_restore_tag(tag):
        return "Qubes' restore and qubesd trust this tag"
    if facts is None:
        return None
    if not facts.complete:
        return "this system's qrexec policy could not be read completely, so no tag is trusted"
    if tag in facts.granting_tags:
        return "a qrexec policy of this system grants rights to this tag"
    return None


def _devices(dom: Domain) -> Iterator[tuple[str, str, str, dict[str, str]]]:
    """(class, backend, port, what is shown: an R4.3 backup's mode unless ``required`` and device identity
    unless ``*`` (any device in that port), then the options)."""
    for devs in dom.element.iterfind("devices"):
        for dev in devs.iterfind("device"):
            shown = {k: dev.get(k, "") for k in ("mode", "identity") if dev.get(k) not in (None, "*", "required")}
            options = {o.get("name", ""): o.text or "" for o in dev.iterfind("option")}
            yield devs.get("class", ""), dev.get("backend-domain", ""), dev.get("id", ""), {**shown, **options}


def is_risky_feature(name: str) -> bool:
    return name in RISKY_FEATURES or name.startswith(RISKY_FEATURE_PREFIXES)


def classify(dom: Domain, facts: PolicyFacts | None) -> list[Setting]:
    """The settings of backed-up VM ``dom`` that are not simply restored."""
    out: list[Setting] = []
    has_pci = False
    for devclass, backend, ident, options in _devices(dom):
        has_pci = has_pci or devclass == "pci"
        value = " ".join(f"{k}={v}" for k, v in options.items())
        out.append(Setting(dom.name, "device", f"{devclass}:{backend}:{ident}", value, DEVICES))
    for prop, value in dom.properties.items():
        if prop in RISKY_PROPERTIES:
            needs = DEVICES if prop == "virt_mode" and value == "hvm" and has_pci else RISKY
            out.append(Setting(dom.name, "property", prop, value, needs))
    for feature, value in dom.features.items():
        if is_risky_feature(feature):
            out.append(Setting(dom.name, "feature", feature, value, RISKY))
    for tag in dom.tags:
        if tag == "created-by-dom0":
            continue  # qubesd puts it on every VM a restore creates: it comes back anyway, not from the backup
        why = policy_tag_reason(tag, facts)
        out.append(Setting(dom.name, "tag", tag, "", NEVER if why else RISKY, why or ""))
    return out


def restore_managers(vms: dict[str, str], tags: dict[str, list[str]], facts: PolicyFacts | None) -> list[str]:
    """Who could change the VMs a restore creates while they are tagged ``backup-restore-in-progress``:
    every VM (``vms``: name -> class, dom0 excluded) that holds ``backup-restore-mgmt`` (Qubes' shipped
    policy trusts it), or that matches the source of another policy rule granting admin calls on that tag.
    One description per VM or rule; empty when nobody can."""
    found: dict[str, str] = {}
    for name, vm_tags in tags.items():
        if MGMT in vm_tags and name in vms:
            found[name] = f"{name} (tagged {MGMT})"
    unresolved: list[str] = []
    for grant in facts.in_progress_grants if facts is not None else []:
        src = grant.source
        if src in ("@adminvm", "dom0"):
            continue
        if src.startswith("@tag:"):
            hits = [n for n in vms if src[5:] in tags.get(n, [])]
        elif src.startswith("@type:"):
            hits = [n for n, klass in vms.items() if klass == src[6:]]
        elif src == "@anyvm":
            hits = list(vms)
        elif src and not src.startswith(("@", "*")) and not src.startswith("uuid:"):
            hits = [src] if src in vms else []
        else:  # @dispvm..., uuid:, or a line not understood: cannot tell which VMs it means
            unresolved.append(f"the rule at {grant.where} (source {src or '?'})")
            continue
        for n in hits:
            found.setdefault(n, f"{n} (allowed {grant.service} by {grant.where})")
    return [*found.values(), *unresolved]


def managers_error(managers: list[str]) -> str:
    """The one line that stops a restore while some VM could change the VMs it creates."""
    who = "; ".join(managers[:5]) + (f" and {len(managers) - 5} more" if len(managers) > 5 else "")
    tagged = [m.split(" ", 1)[0] for m in managers if f"(tagged {MGMT})" in m]
    todo = (f"if no restore of Qubes' own is running there, remove the tag (qvm-tags {tagged[0]} del {MGMT})"
            if tagged else "change that policy rule")
    return (f"refusing to restore: {who} may change every VM this restore creates while it is tagged "
            f"backup-restore-in-progress (qrexec policy); {todo}, then restore again")
