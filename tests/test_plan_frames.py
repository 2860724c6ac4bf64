"""The paranoid plan grammar (protocol/plan_frames.py) and dom0's planning on it (restore/paranoid_plan.py).

A record that decodes is in the grammar and is the one encoding of its value (so nothing can hide in it);
arbitrary bytes decode or are refused with PlanError, never anything else; the largest valid record fits the
frame limit.  Planning: Qubes' selection, conflict and missing-template semantics on checked plans.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qubes_backup_dom0.errors import UsageError
from qubes_backup_dom0.format import header as header_mod
from qubes_backup_dom0.restore.paranoid_plan import Here, plan_paranoid
from qubes_backup_dom0.restore.plan import RestoreOptions
from qubes_backup_protocol import plan_frames as pf

NAMES = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_.-]{0,30}", fullmatch=True).filter(pf.is_vm_name)
FEATURE_KEYS = st.one_of(st.sampled_from(sorted(pf.FEATURES)),
                         st.from_regex(r"service\.[a-z0-9][a-z0-9_-]{0,47}", fullmatch=True))  # fmt: skip
VALUES = st.from_regex(r"[A-Za-z0-9._+-]{0,64}", fullmatch=True)


@st.composite
def plan_vms(draw: st.DrawFn) -> pf.PlanVm:
    klass = draw(st.sampled_from(sorted(pf.CLASS_VOLUMES)))
    name = draw(NAMES)
    template = draw(st.one_of(st.none(), NAMES.filter(lambda t: t != name))) if klass in ("AppVM", "DispVM") else None
    props = {}
    for _code, (prop, low, high, _texts) in pf.PROPERTIES.items():
        if prop == "template_for_dispvms" and klass != "AppVM":
            continue
        if draw(st.booleans()):
            props[prop] = draw(st.integers(low, high))
    features = draw(st.dictionaries(FEATURE_KEYS, VALUES, max_size=pf.MAX_FEATURES))
    vols = draw(st.lists(st.sampled_from(pf.CLASS_VOLUMES[klass]), unique=True))
    volumes = []
    for v in vols:
        size = draw(st.integers(1, pf.MAX_VOLUME_SIZE))
        volumes.append(pf.PlanVolume(v, size, draw(st.integers(0, size))))
    return pf.PlanVm(f"vm{draw(st.integers(1, 99999))}", name, klass, draw(st.from_regex(r"[A-Za-z0-9_.-]{1,32}",
                     fullmatch=True)), template, draw(st.booleans()), draw(st.booleans()), props, features,
                     tuple(volumes))  # fmt: skip


@settings(max_examples=300)
@given(plan_vms())
def test_records_round_trip(vm: pf.PlanVm) -> None:
    data = pf.encode_vm(vm)
    assert len(data) <= pf.MAX_VM_RECORD
    assert pf.decode_vm(vm.archive, data) == vm


@settings(max_examples=1000)
@given(st.binary(max_size=600), st.sampled_from(["vm1", "vm99999"]))
def test_arbitrary_bytes_are_refused_or_canonical(data: bytes, archive: str) -> None:
    try:
        vm = pf.decode_vm(archive, data)
    except pf.PlanError:
        return
    assert pf.encode_vm(vm) == data  # the one encoding: no slack, no hidden bytes


@settings(max_examples=500)
@given(st.binary(min_size=pf.INFO_SIZE, max_size=pf.INFO_SIZE))
def test_arbitrary_info_is_refused_or_canonical(data: bytes) -> None:
    try:
        info = pf.decode_info(data)
    except pf.PlanError:
        return
    assert pf.encode_info(info) == data


def test_the_largest_record_fits_the_frame_limit() -> None:
    key = "service." + "a" * 48
    vm = pf.PlanVm("vm99999", "a" * 31, "AppVM", "l" * 32, "t" * 31, True, True,
                   {p: high for _c, (p, _low, high, _t) in pf.PROPERTIES.items()},
                   {key[:-2] + f"{i:02d}": "v" * 64 for i in range(pf.MAX_FEATURES)},
                   (pf.PlanVolume("private", pf.MAX_VOLUME_SIZE, 0),))  # fmt: skip
    assert len(pf.encode_vm(vm)) <= pf.MAX_VM_RECORD


def test_chunk_size_rule_is_the_headers() -> None:
    assert (pf.CHUNK_MIN, pf.CHUNK_MAX, pf.CHUNK_ALIGN) == (header_mod.CHUNK_MIN, header_mod.CHUNK_MAX,
                                                            header_mod.CHUNK_ALIGN)  # fmt: skip
    assert set(pf.COMPRESSIONS.values()) == set(header_mod.COMPRESSIONS)


@pytest.mark.parametrize("vm", [
    pf.PlanVm("vm1", "dom0", "AppVM", "red", None, False, False),
    pf.PlanVm("vm0", "a", "AppVM", "red", None, False, False),  # vm0 is dom0's home
    pf.PlanVm("vm1", "a", "AdminVM", "red", None, False, False),
    pf.PlanVm("vm1", "a", "TemplateVM", "red", "b", False, False),  # a template has no template
    pf.PlanVm("vm1", "a", "AppVM", "red", "a", False, False),
    pf.PlanVm("vm1", "a", "AppVM", "red\n", None, False, False),
    pf.PlanVm("vm1", "a", "AppVM", "red", None, False, False, {"kernelopts": 1}),
    pf.PlanVm("vm1", "a", "AppVM", "red", None, False, False, {"virt_mode": 2}),  # pv is not in the grammar
    pf.PlanVm("vm1", "a", "TemplateVM", "red", None, False, False, {"template_for_dispvms": 1}),
    pf.PlanVm("vm1", "a", "AppVM", "red", None, False, False, {}, {"gui-allow-fullscreen": "1"}),
    pf.PlanVm("vm1", "a", "AppVM", "red", None, False, False, {}, {"service.x": "a b"}),
    pf.PlanVm("vm1", "a", "AppVM", "red", None, False, False, {}, {}, (pf.PlanVolume("private", 0, 0),)),
    pf.PlanVm("vm1", "a", "AppVM", "red", None, False, False, {}, {}, (pf.PlanVolume("private", 5, 6),)),
    pf.PlanVm("vm1", "a", "DispVM", "red", None, False, False, {}, {}, (pf.PlanVolume("root", 5, 0),)),
])  # fmt: skip
def test_records_outside_the_grammar_are_refused(vm: pf.PlanVm) -> None:
    with pytest.raises(pf.PlanError):
        pf.encode_vm(vm)


def _vm(archive: str, name: str, klass: str = "AppVM", template: str | None = None, label: str = "red") -> pf.PlanVm:
    vols = (pf.PlanVolume("private", 1 << 20, 4096),)
    return pf.PlanVm(archive, name, klass, label, template, False, False, {}, {}, vols)


INFO = pf.PlanInfo(bytes(16), "2026-01-01T00:00:00Z", "zstd", 1 << 20, 0, 3)
BACKUP = [_vm("vm1", "tpl", "TemplateVM"), _vm("vm2", "work", template="tpl", label="blue"),
          _vm("vm3", "mail", template="gone")]  # fmt: skip
HERE = Here({"tpl": "TemplateVM", "fedora": "TemplateVM"}, frozenset({"red", "black"}),
            {"default_template": "fedora", "default_dispvm": None})  # fmt: skip


def test_planning_follows_qubes_semantics() -> None:
    plan = plan_paranoid(HERE, BACKUP, INFO, RestoreOptions())
    assert plan.errors[0].startswith("VM tpl already exists") and "mail: missing template gone" in plan.errors[1]
    plan = plan_paranoid(HERE, BACKUP, INFO, RestoreOptions(rename_conflicting=True, ignore_missing=True))
    assert [(a.target_name, a.template, a.label) for a in plan.wanted] == [
        ("tpl1", None, "red"), ("work", "tpl1", "red"), ("mail", "fedora", "red")]
    assert plan.warnings == ["VM work: label blue does not exist here; using red"] and not plan.errors
    plan = plan_paranoid(HERE, BACKUP, INFO, RestoreOptions(skip_conflicting=True, skip_broken=True))
    assert [a.name for a in plan.wanted] == ["work"] and plan.vms[2].reason == "missing template gone"
    assert plan.vms[1].template == "tpl"  # the one here
    plan = plan_paranoid(HERE, BACKUP, INFO, RestoreOptions(vms=("tpl", "work"), rename_conflicting=True))
    assert [a.target_name for a in plan.wanted] == ["tpl1", "work"] and plan.vms[2].reason == "not selected"
    with pytest.raises(UsageError, match="VM nosuch is not in this backup"):
        plan_paranoid(HERE, BACKUP, INFO, RestoreOptions(vms=("nosuch",)))
    plan = plan_paranoid(HERE, BACKUP, INFO, RestoreOptions(exclude=("tpl", "mail")))
    assert [a.name for a in plan.wanted] == ["work"] and not plan.errors
