"""A VM's firewall.xml (Qubes' version 2 format) <-> the Admin API's rule lines.

``<firewall version="2"><rules><rule><properties><property name="action">accept</property>...`` per rule;
the API line of a rule is ``key=value`` words in a fixed order, ``comment=`` last (it may hold spaces).
A VM without firewall.xml has the single rule ``action=accept``.
"""

from __future__ import annotations

import re
from pathlib import Path

from lxml import etree
from qubes_backup_dom0.qubes.qubesxml import QubesXmlError, parse_xml

from .exc import ApiError
from .store import write_bytes_atomic

ORDER = ("action", "proto", "dst4", "dst6", "dsthost", "dstports", "icmptype", "specialtarget", "expire", "comment")
MAX_RULES = 1024
_CHECKS = {
    "action": re.compile(r"^(accept|drop)$"),
    "proto": re.compile(r"^(tcp|udp|icmp)$"),
    "dst4": re.compile(r"^[0-9.]{7,15}(/[0-9]{1,2})?$"),
    "dst6": re.compile(r"^[0-9a-fA-F:]{2,39}(/[0-9]{1,3})?$"),
    "dsthost": re.compile(r"^[A-Za-z0-9.:/_-]{1,255}$"),
    "dstports": re.compile(r"^[0-9]{1,5}(-[0-9]{1,5})?$"),
    "icmptype": re.compile(r"^[0-9]{1,3}$"),
    "specialtarget": re.compile(r"^dns$"),
    "expire": re.compile(r"^[0-9]{1,12}$"),
    "comment": re.compile(r"^[^\n\0]{0,1024}$"),
}


def _bad(msg: str) -> ApiError:
    return ApiError("ProtocolError", f"firewall: {msg}")


def canonical(rule: dict[str, str]) -> str:
    return " ".join(f"{k}={rule[k]}" for k in ORDER if k in rule)


def parse_rule(line: str) -> dict[str, str]:
    rule: dict[str, str] = {}
    head, sep, comment = line.partition(" comment=")
    if line.startswith("comment="):
        head, sep, comment = "", "x", line[len("comment="):]
    for word in head.split():
        k, eq, v = word.partition("=")
        if not eq or k not in _CHECKS or k == "comment" or k in rule:
            raise _bad(f"invalid rule word {word!r}")
        rule[k] = v
    if sep:
        rule["comment"] = comment
    for k, v in rule.items():
        if not _CHECKS[k].match(v):
            raise _bad(f"invalid {k} {v!r}")
    if "action" not in rule:
        raise _bad(f"rule without action: {line!r}")
    if "dstports" in rule:
        lo, _, hi = rule["dstports"].partition("-")
        rule["dstports"] = f"{int(lo)}-{int(hi or lo)}"
        if rule.get("proto") not in ("tcp", "udp"):
            raise _bad("dstports needs proto=tcp or proto=udp")
    return rule


def parse_rules(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.split("\n") if line]
    if len(lines) > MAX_RULES:
        raise _bad("too many rules")
    return [parse_rule(line) for line in lines]


def load(path: Path) -> list[str]:
    if not path.is_file():
        return ["action=accept"]
    try:
        root = parse_xml(path.read_bytes(), 1 << 20)
    except QubesXmlError as e:
        raise ApiError("QubesException", f"{path.name}: {e}") from None
    out = []
    for rule_el in root.iterfind("rules/rule"):
        rule = {p.get("name", ""): p.text or "" for p in rule_el.iterfind("properties/property")}
        out.append(canonical(rule))
    return out


def to_xml(rules: list[dict[str, str]]) -> bytes:
    root = etree.Element("firewall", version="2")
    rules_el = etree.SubElement(root, "rules")
    for rule in rules:
        props = etree.SubElement(etree.SubElement(rules_el, "rule"), "properties")
        for k in ORDER:
            if k in rule:
                etree.SubElement(props, "property", name=k).text = rule[k]
    return etree.tostring(root, pretty_print=True, encoding="UTF-8", xml_declaration=True)


def save(path: Path, rules: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(to_xml(rules), path)
