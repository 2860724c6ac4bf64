"""A VM's firewall: the Admin API's rule lines <-> Qubes' ``firewall.xml`` (version 2).

``admin.vm.firewall.Get`` answers one rule per line (``action=accept proto=tcp dstports=443-443``, a
``comment=...`` last, taking the rest of the line); a backup stores them as the ``firewall.xml`` Qubes itself
writes into the VM's directory, so a stock restore finds the same file.  The parser is hardened like
``qubesxml.parse_xml`` (bounded, no DTD/entities) and accepts exactly that shape and the known keys.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lxml import etree

from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.qubes.qubesxml import QubesXmlError, parse_xml
from qubes_backup_dom0.text import has_unsafe_chars

MAX_FIREWALL_XML = 1024 * 1024
MAX_RULES = 4096
MAX_VALUE = 1024
#: Qubes' firewall rule properties (qubes/firewall.py), in the order Qubes prints them.
RULE_KEYS = ("action", "proto", "dst4", "dst6", "dsthost", "dstports", "icmptype", "specialtarget", "expire", "comment")
_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:/+@-]+$")
_CHOICES = {"action": ("accept", "drop"), "proto": ("tcp", "udp", "icmp"), "specialtarget": ("dns",)}


class FirewallError(BackupError):
    """A firewall rule or firewall.xml does not have the expected shape."""


def _check(key: str, value: str) -> None:
    if key not in RULE_KEYS:
        raise FirewallError(f"firewall: unknown rule key {key!r}")
    if len(value) > MAX_VALUE or not value:
        raise FirewallError(f"firewall: bad value for {key}")
    if key == "comment":
        if has_unsafe_chars(value):
            raise FirewallError("firewall: control character in a comment")
        return
    if not _VALUE_RE.match(value) or (key in _CHOICES and value not in _CHOICES[key]):
        raise FirewallError(f"firewall: bad value for {key}: {value[:60]!r}")


def parse_rule(line: str) -> list[tuple[str, str]]:
    """One rule line -> ordered (key, value) pairs; ``comment=`` takes the rest of the line."""
    pairs: list[tuple[str, str]] = []
    rest = line
    while rest:
        if rest.startswith("comment="):
            token, rest = rest, ""
        else:
            token, _, rest = rest.partition(" ")
        key, eq, value = token.partition("=")
        if not eq:
            raise FirewallError(f"firewall: malformed rule {line[:80]!r}")
        _check(key, value)
        pairs.append((key, value))
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys) or "action" not in keys:
        raise FirewallError(f"firewall: malformed rule {line[:80]!r}")
    return pairs


def format_rule(pairs: Sequence[tuple[str, str]]) -> str:
    ordered = [p for p in pairs if p[0] != "comment"] + [p for p in pairs if p[0] == "comment"]
    return " ".join(f"{k}={v}" for k, v in ordered)


def rules_to_xml(rules: Sequence[str]) -> bytes:
    """Qubes' firewall.xml for these rule lines (as ``admin.vm.firewall.Get`` gives them)."""
    if len(rules) > MAX_RULES:
        raise FirewallError(f"firewall: more than {MAX_RULES} rules")
    root = etree.Element("firewall", version="2")
    rules_el = etree.SubElement(root, "rules")
    for line in rules:
        rule_el = etree.SubElement(rules_el, "rule")
        props = etree.SubElement(rule_el, "properties")
        for key, value in parse_rule(line):
            etree.SubElement(props, "property", name=key).text = value
    return etree.tostring(root, pretty_print=True, encoding="UTF-8", xml_declaration=True)


def _only_children(el: etree._Element, tag: str) -> list[etree._Element]:
    children = list(el)
    if any(c.tag != tag for c in children) or (el.text or "").strip() or (el.attrib and el.tag != "firewall"):
        raise FirewallError(f"firewall.xml: unexpected content in <{el.tag}>")
    for c in children:
        if (c.tail or "").strip():
            raise FirewallError(f"firewall.xml: unexpected text after <{c.tag}>")
    return children


def xml_to_rules(data: bytes) -> list[str]:
    """The rule lines of a firewall.xml (version 2); anything else in the document is refused."""
    try:
        root = parse_xml(data, MAX_FIREWALL_XML)
    except QubesXmlError as exc:
        raise FirewallError(f"firewall.xml: {exc}") from None
    if root.tag != "firewall" or {str(k): str(v) for k, v in root.attrib.items()} != {"version": "2"}:
        raise FirewallError("firewall.xml: not a version 2 <firewall> document")
    sections = _only_children(root, "rules")
    if len(sections) > 1:
        raise FirewallError("firewall.xml: more than one <rules>")
    rules: list[str] = []
    for rule_el in _only_children(sections[0], "rule") if sections else []:
        if len(rules) >= MAX_RULES:
            raise FirewallError(f"firewall.xml: more than {MAX_RULES} rules")
        props_els = _only_children(rule_el, "properties")
        if len(props_els) != 1:
            raise FirewallError("firewall.xml: a <rule> needs exactly one <properties>")
        pairs: list[tuple[str, str]] = []
        for prop in _only_children(props_els[0], "property"):
            if list(prop) or set(prop.attrib) != {"name"}:
                raise FirewallError("firewall.xml: malformed <property>")
            key, value = prop.get("name", ""), prop.text or ""
            _check(key, value)
            pairs.append((key, value))
        line = format_rule(pairs)
        parse_rule(line)  # unique keys, an action
        rules.append(line)
    return rules


def _accepts_everything(rule: str) -> bool:
    """``action=accept`` with no condition (a comment aside): every packet."""
    pairs = [(k, v) for k, v in parse_rule(rule) if k != "comment"]
    return pairs == [("action", "accept")]


def wider(rules: Sequence[str], default: Sequence[str]) -> bool:
    """True when ``rules`` may let the VM reach something that ``default`` (what qubesd gives a new VM here)
    does not.  Conservative: False only when that is certain -- the default accepts everything first
    (Qubes' default, a single ``action=accept``), ``rules`` is the default itself, or ``rules`` accepts
    nothing at all (drop rules only; what no rule matches is dropped)."""
    if default and _accepts_everything(default[0]):
        return False
    if list(rules) == list(default):
        return False
    return any(dict(parse_rule(r)).get("action") == "accept" for r in rules)
