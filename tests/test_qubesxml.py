"""qubesxml: the R4 collection read from a real qubes.xml, edited, subset for a manifest and written back."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from lxml import etree
from qubes_backup_dom0.qubes.qubesxml import Collection, QubesXmlError, parse_xml

SAMPLE = Path(__file__).parent / "data" / "qubes-r4-sample.xml"


@pytest.fixture
def coll() -> Collection:
    return Collection.load(SAMPLE)


def _canon(el: etree._Element) -> bytes:
    return etree.tostring(el, method="c14n")


def test_parse_reference_names_classes(coll: Collection) -> None:
    names = coll.names()
    assert len(names) == 20
    assert "dom0" in names and len(set(names)) == len(names)
    assert coll["dom0"].klass == "AdminVM" and coll["dom0"].qid == 0
    assert coll["fedora-25"].klass == "TemplateVM"
    assert coll["test-hvm"].klass == "StandaloneVM"
    assert coll["personal"].klass == "AppVM"
    assert coll["test-work"].qid == 3
    assert coll["test-work"].uuid == "07c17d1e-0982-417d-b19e-a81d51bed423"
    assert coll.get("nope") is None and "nope" not in coll


def test_labels_and_globals(coll: Collection) -> None:
    assert coll["test-d8test"].label == "gray"
    assert coll["test-standalonevm"].label == "blue"
    assert coll["sys-net"].label == "red"
    g = coll.global_properties
    assert g["default_netvm"] == "sys-firewall"
    assert g["default_template"] == "fedora-25"
    assert g["default_dispvm"] == "fedora-25-dvm"
    assert g["clockvm"] == "sys-net" and g["updatevm"] == "sys-firewall"
    assert coll.pools["default"]["driver"] == "file"
    assert coll.pools["default"]["dir_path"] == "/var/lib/qubes"
    assert coll.pools["lvm"]["driver"] == "lvm_thin"


def test_references_absent_vs_empty(coll: Collection) -> None:
    work, vault, personal = coll["test-work"], coll["vault"], coll["personal"]
    # absent -> default; explicit empty -> None
    assert work.raw_property("netvm") is None and work.netvm is None
    assert coll.effective_netvm(work) == "sys-firewall"
    assert vault.raw_property("netvm") == "" and vault.netvm is None
    assert coll.effective_netvm(vault) is None
    assert personal.netvm == "sys-firewall"
    assert coll["test-proxy"].netvm == "sys-net"
    assert coll["test-d8test"].template == "debian-8"
    assert coll.effective_template(coll["test-d8test"]) == "debian-8"
    assert coll.effective_template(coll["fedora-25"]) is None
    assert coll.effective_template(coll["test-standalonevm"]) is None
    assert coll.effective_netvm(coll["fedora-25"]) is None  # templates have no default network
    assert coll["untrusted"].default_dispvm == "fedora-25-clone-dvm"
    assert coll["untrusted"].dependency_names() == {"fedora-25", "fedora-25-clone-dvm"}
    assert coll["test-work"].dependency_names() == {"fedora-25"}
    assert coll["dom0"].dependency_names() == set()


def test_features_and_include_in_backups(coll: Collection) -> None:
    f = coll["personal"].features
    assert f == {"xxx": "1", "feat1": "1", "featdis": "", "feat2": "", "feat32": "1"}
    assert coll["personal"].feature_bool("feat1") and not coll["personal"].feature_bool("featdis")
    assert coll["test-work"].features["backup-path"] == "appvms/test-work"
    assert coll["dom0"].features["backup-path"] == "dom0-home/user"
    assert all(d.include_in_backups for d in coll.domains)
    coll["vault"].set_property("include_in_backups", False)
    assert not coll["vault"].include_in_backups


def test_volumes(coll: Collection) -> None:
    vols = {v.name: v for v in coll["test-work"].volumes}
    assert set(vols) == {"kernel", "root", "volatile", "private"}
    priv = vols["private"]
    assert (priv.pool, priv.vid, priv.size) == ("default", "appvms/test-work/private", 2147483648)
    assert priv.save_on_stop and priv.rw and not priv.snap_on_start and priv.source is None
    root = vols["root"]
    assert root.snap_on_start and not root.save_on_stop and not root.rw
    assert root.source == "vm-templates/fedora-25/root"
    assert vols["kernel"].size is None and vols["kernel"].attrib["revisions_to_keep"] == "0"
    tpl_root = coll["fedora-25"].volume("root")
    assert tpl_root is not None and tpl_root.save_on_stop


def test_volume_path_and_vm_dir(coll: Collection, tmp_path: Path) -> None:
    qroot = tmp_path / "dom0/var/lib/qubes"
    priv = coll["test-work"].volume("private")
    assert priv is not None
    assert coll.volume_path(priv, qroot) == qroot / "appvms/test-work/private.img"
    assert coll.volume_path(priv, Path("/var/lib/qubes")) == Path("/var/lib/qubes/appvms/test-work/private.img")
    # lvm and kernel pools have no file
    vault_priv = coll["vault"].volume("private")
    assert vault_priv is not None and coll.volume_path(vault_priv, qroot) is None
    kernel = coll["test-work"].volume("kernel")
    assert kernel is not None and coll.volume_path(kernel, qroot) is None
    # vm_dir follows the vid (test-proxy lives in appvms/d8test2), falls back by class for lvm-only VMs
    assert coll.vm_dir(coll["test-proxy"]) == "appvms/d8test2"
    assert coll.vm_dir(coll["fedora-25"]) == "vm-templates/fedora-25"
    assert coll.vm_dir(coll["fedora-25-lvm"]) == "vm-templates/fedora-25-lvm"
    assert coll.vm_dir(coll["dom0"]) is None


def test_volume_path_rejects_escaping_vid(coll: Collection, tmp_path: Path) -> None:
    el = coll["test-work"].element.find("volume-config/volume[@name='private']")
    el.set("vid", "appvms/../../../etc/shadow")
    vol = coll["test-work"].volume("private")
    assert vol is not None
    with pytest.raises(QubesXmlError):
        coll.volume_path(vol, tmp_path)


def test_round_trip_preserves_everything(coll: Collection) -> None:
    data = coll.to_bytes()
    assert data.startswith(b"<?xml version='1.0' encoding='UTF-8'?>\n<qubes>\n  <labels>")
    again = Collection.from_bytes(data)
    assert _canon(again.root) == _canon(coll.root)
    assert again.to_bytes() == data
    original = etree.parse(str(SAMPLE), etree.XMLParser(remove_blank_text=True)).getroot()
    assert _canon(again.root) == _canon(original)


def test_setters(coll: Collection) -> None:
    work = coll["test-work"]
    work.set_property("netvm", None)
    work.set_property("memory", 1234)
    work.set_feature("backup-content", True)
    work.set_feature("new-feature", "x")
    coll["personal"].remove_property("netvm")
    again = Collection.from_bytes(coll.to_bytes())
    assert again["test-work"].raw_property("netvm") == ""
    assert again.effective_netvm(again["test-work"]) is None
    assert again["test-work"].properties["memory"] == "1234"
    assert again["test-work"].features["new-feature"] == "x"
    assert again["test-work"].features["backup-content"] == "True"
    assert not again["personal"].has_property("netvm")
    assert again.effective_netvm(again["personal"]) == "sys-firewall"


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<qubes><labels><label id="label-1">&lol4;</label></labels></qubes>
"""


@pytest.mark.parametrize(
    "doc",
    [
        BILLION_LAUGHS,
        b'<!DOCTYPE qubes SYSTEM "http://example.invalid/qubes.dtd"><qubes/>',
        b'<!DOCTYPE q [<!ENTITY x SYSTEM "file:///etc/passwd">]><qubes><labels>&x;</labels></qubes>',
        b"<qubes><labels>&undefined;</labels></qubes>",
        b"<qubes><?evil pi?></qubes>",
        b"<qubes><domains>",
        b"<notqubes/>",
    ],
)
def test_hostile_documents_rejected(doc: bytes) -> None:
    with pytest.raises(QubesXmlError):
        Collection.from_bytes(doc)


def test_oversized_and_bad_names_rejected() -> None:
    with pytest.raises(QubesXmlError):
        parse_xml(b"<qubes/>" + b" " * 100, max_bytes=50)
    bad = SAMPLE.read_bytes().replace(b">personal<", b">../../etc<")
    with pytest.raises(QubesXmlError, match="invalid VM name"):
        Collection.from_bytes(bad)
    dup = SAMPLE.read_bytes().replace(b">personal<", b">vault<")
    with pytest.raises(QubesXmlError, match="duplicate"):
        Collection.from_bytes(dup)


def test_dependencies_closure(coll: Collection) -> None:
    deps = coll.dependencies(["test-custom-template-appvm"])
    # explicit template; netvm and default_dispvm come from the global defaults, and their templates too
    assert set(deps) == {"test-fedora-25-clone", "sys-firewall", "fedora-25-dvm", "fedora-25"}
    assert "dom0" not in deps and "test-custom-template-appvm" not in deps
    # templates come before the VMs based on them
    assert deps.index("fedora-25") < deps.index("sys-firewall")
    assert deps.index("fedora-25") < deps.index("fedora-25-dvm")
    deps2 = coll.dependencies(["untrusted", "fedora-25"])
    assert set(deps2) == {"fedora-25-clone-dvm", "test-fedora-25-clone", "fedora-25-dvm", "sys-firewall"}
    assert "fedora-25" not in deps2
    assert deps2.index("test-fedora-25-clone") < deps2.index("fedora-25-clone-dvm")
    # vault has no network itself, but its default dispvm (global default) inherits default_netvm
    assert set(coll.dependencies(["vault"])) == {"fedora-25", "fedora-25-dvm", "sys-firewall"}
    assert coll.dependencies(["dom0"]) == []


def test_subset_contents(coll: Collection) -> None:
    backed = {"test-work": ("appvms/test-work", 1000), "dom0": ("dom0-home/user", 20)}
    deps = coll.dependencies(["test-work"])
    sub = coll.subset(backed, deps)
    assert set(sub.names()) == {"dom0", "test-work", *deps}
    assert sub.labels == coll.labels and sub.pools == coll.pools
    assert sub.global_properties == coll.global_properties
    w = sub["test-work"].features
    assert (w["backup-content"], w["backup-path"], w["backup-size"]) == ("True", "appvms/test-work", "1000")
    assert w["service.meminfo-writer"] == "1"  # other features kept
    assert sub["dom0"].features["backup-path"] == "dom0-home/user"
    for name in deps:
        f = sub[name].features
        assert f["backup-content"] == "False" and "backup-path" not in f and "backup-size" not in f
        assert not sub[name].feature_bool("backup-content")
    # the original is untouched and the subset survives a round trip
    assert "personal" in coll and coll["test-work"].features["backup-size"] == "2097152000"
    again = Collection.from_bytes(sub.to_bytes())
    assert again.names() == sub.names()
    # without dom0 backed up, dom0 is there but marked as not backed up
    sub2 = coll.subset({"vault": ("appvms/vault", 5)})
    assert set(sub2.names()) == {"dom0", "vault", "fedora-25", "fedora-25-dvm", "sys-firewall"}
    assert sub2["dom0"].features["backup-content"] == "False"
    assert "backup-path" not in sub2["dom0"].features
    with pytest.raises(QubesXmlError):
        coll.subset({"missing": ("appvms/missing", 1)})


def test_add_domain_fresh_identity(coll: Collection) -> None:
    backup = Collection.load(SAMPLE)
    src = backup["test-proxy"]  # lives in appvms/d8test2: the directory must follow the new name
    before_qids = {d.qid for d in coll.domains}
    before_uuids = {d.uuid for d in coll.domains}
    before_ids = {d.element.get("id") for d in coll.domains}
    expected_qid = coll.next_qid()
    new = coll.add_domain(src, "test-proxy1")
    assert new.name == "test-proxy1" and new.klass == "AppVM"
    assert new.qid == expected_qid and new.qid not in before_qids
    assert new.uuid not in before_uuids and uuid.UUID(new.uuid).version == 4
    assert new.element.get("id") not in before_ids
    vids = {v.name: v.vid for v in new.volumes}
    assert vids["private"] == "appvms/test-proxy1/private"
    assert vids["root"] == "appvms/test-proxy1/root"
    assert vids["volatile"] == "appvms/test-proxy1/volatile"
    assert vids["kernel"] == "4.9.31-17"  # not a file pool: untouched
    assert new.volume("root").source == "vm-templates/debian-8/root"  # type: ignore[union-attr]
    assert coll.vm_dir(new) == "appvms/test-proxy1"
    assert new.label == "red" and new.template == "debian-8" and new.netvm == "sys-net"
    assert not any(k.startswith("backup-") for k in new.features)  # backup markers do not stick
    # the source collection is unchanged
    assert backup["test-proxy"].volume("private").vid == "appvms/d8test2/private"  # type: ignore[union-attr]
    # a template goes to vm-templates/, and a second add gets yet another qid/uuid
    tpl = coll.add_domain(backup["fedora-25"].element, "fedora-25-restored")
    assert tpl.volume("root").vid == "vm-templates/fedora-25-restored/root"  # type: ignore[union-attr]
    assert tpl.qid != new.qid and tpl.uuid != new.uuid
    again = Collection.from_bytes(coll.to_bytes())
    assert len({d.uuid for d in again.domains if d.name in ("test-proxy1", "fedora-25-restored")}) == 2
    with pytest.raises(QubesXmlError, match="already exists"):
        coll.add_domain(src)
    with pytest.raises(QubesXmlError):
        coll.add_domain(src, "bad/name")


def test_next_qid_fills_gaps() -> None:
    c = Collection.from_bytes(SAMPLE.read_bytes())
    assert c.next_qid() == 1  # sample uses 0,2..; qid 1 is free
    c.add_domain(c["vault"], "v1")
    assert c.next_qid() == 12


def test_rename_references(coll: Collection) -> None:
    coll.add_domain(coll["fedora-25"], "fedora-25-new")
    coll.rename_references("fedora-25", "fedora-25-new", ["personal", "untrusted"])
    assert coll["personal"].template == "fedora-25-new"
    assert coll["untrusted"].template == "fedora-25-new"
    assert coll["personal"].volume("root").source == "vm-templates/fedora-25-new/root"  # type: ignore[union-attr]
    assert coll["test-work"].template == "fedora-25"  # not in the list
    coll.rename_references("sys-firewall", "sys-fw2")
    assert coll["personal"].netvm == "sys-fw2"
