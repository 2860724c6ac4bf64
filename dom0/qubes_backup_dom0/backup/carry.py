"""VMs carried forward into a snapshot (docs/REPOSITORY.md section 7): a ``qvm-backup --repo R vm1`` after a
snapshot holding vm1, vm2 and vm3 makes a snapshot holding all three; vm2's and vm3's archives are the
parent's, unchanged (their file lists, verified this run, are referenced, not re-sent).

What this module does is the qubes.xml subset of such a snapshot: the one of this run's VMs (``BackupPlan``'s,
from the live system) merged with the parent's for the carried VMs.  The parent's subset is a verified object
of the repository, parsed by the hardened parser (``Collection.from_bytes``); a carried VM's domain is taken
from it as it was (its backup-content/backup-path/backup-size describe its carried archive), and so are the
domains it depends on (template, netvm, default_dispvm, recursively, as the parent recorded them) that this
run's subset lacks.  The archives are then numbered again, in restore order over the merged subset.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

from lxml import etree
from qubes_backup_protocol import names

from qubes_backup_dom0.backup.plan import restore_order
from qubes_backup_dom0.errors import VerificationError
from qubes_backup_dom0.qubes.qubesxml import BACKUP_FEATURES, Collection, Domain, QubesXmlError


def _parse(data: bytes, what: str) -> Collection:
    try:
        return Collection.from_bytes(data)
    except QubesXmlError as e:
        raise VerificationError(f"{what}: {e}") from None


def _set_backup_features(dst: Domain, src: Domain) -> None:
    feats = src.features
    for name in BACKUP_FEATURES:
        dst.remove_feature(name)
        if name in feats:
            dst.set_feature(name, feats[name])


def _copy_child(src: Collection, dst: Collection, section: str, match: Callable[[etree._Element], bool]) -> None:
    """Copy the first child of ``src``'s ``section`` that ``match``es into ``dst``'s (if there is one)."""
    found = next((x for x in src.root.iterfind(f"{section}/*") if match(x)), None)
    target = dst.root.find(section)
    if found is not None and target is not None:
        target.append(copy.deepcopy(found))


def _adopt(merged: Collection, parent: Collection, dom: Domain) -> None:
    """Put the parent's domain ``dom`` into ``merged`` (replacing one of the same name), its label and pools
    resolvable there, its qid and element id unique."""
    old = merged.get(dom.name)
    el = copy.deepcopy(dom.element)
    new = Domain(el, merged)
    lid = dom.label_id
    name = parent.labels.get(lid) if lid is not None else None
    if lid is not None and name is not None:
        mine = merged.label_id(name)
        if mine is not None:
            new.set_property("label", mine)
        elif lid not in merged.labels:
            _copy_child(parent, merged, "labels", lambda x: x.get("id") == lid)
    for pool in {v.pool for v in dom.volumes if v.pool}:
        if pool not in merged.pools:
            _copy_child(parent, merged, "pools", lambda x: x.get("name") == pool)  # noqa: B023 - called at once
    domains = merged.root.find("domains")
    assert domains is not None
    if old is not None:
        domains.replace(old.element, el)
    else:
        domains.append(el)
    taken = {d.qid for d in merged.domains if d.element is not el}
    if not dom.is_admin and dom.qid in taken:
        new.set_property("qid", merged.next_qid())
    ids = {d.element.get("id") for d in merged.domains if d.element is not el}
    if el.get("id") in ids:
        n = new.qid
        while f"domain-{n}" in ids:
            n += 1
        el.set("id", f"domain-{n}")


def merge_subsets(current: bytes, parent_xml: bytes, carried: Iterable[str], kept_home: bool) -> bytes:
    """This run's subset with the parent's domains of ``carried`` VMs (and ``dom0``'s backup features when
    dom0's home is carried: ``kept_home``), plus the parent's domains of their dependencies this run's subset
    lacks.  Both documents were verified (or built) by dom0; the parent's is parsed by the hardened parser."""
    merged = _parse(current, "this run's qubes.xml subset")
    parent = _parse(parent_xml, "the parent snapshot's qubes.xml subset")
    carried = [n for n in carried if n != "dom0"]
    for name in carried:
        dom = parent.get(name)
        if dom is None:
            raise VerificationError(f"the parent snapshot has an archive of {name} but no domain for it")
        _adopt(merged, parent, dom)
    for name in parent.dependencies(carried):
        if name not in merged and name != "dom0":
            dep = parent[name]
            _adopt(merged, parent, dep)
            merged[name].set_feature("backup-content", False)
            merged[name].remove_feature("backup-path")
            merged[name].remove_feature("backup-size")
    if kept_home:
        admins = [d for d in parent.domains if d.is_admin]
        mine = [d for d in merged.domains if d.is_admin]
        if len(admins) != 1 or len(mine) != 1:
            raise VerificationError("the parent snapshot's qubes.xml subset has no dom0 for its home archive")
        _set_backup_features(mine[0], admins[0])
    return merged.to_bytes()


def numbering(qubes_xml: bytes, vms: list[str]) -> dict[str, str]:
    """Archive member names (``vm1``...) of ``vms`` in restore order over the merged subset."""
    collection = Collection.from_bytes(qubes_xml)
    ordered = restore_order(collection, [collection[n] for n in vms])
    return {d.name: names.archive_name(i) for i, d in enumerate(ordered, start=1)}
