"""store.write_atomic: qubes.xml is replaced atomically (only the simulated qubesd and simgen write it)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from qubes_backup_dom0.qubes.qubesxml import Collection
from qubes_backup_sim.store import write_atomic

SAMPLE = Path("/work/shared/reference/qubes-r4-sample.xml")


def test_write_atomic(tmp_path: Path) -> None:
    coll = Collection.load(SAMPLE)
    target = tmp_path / "qubes.xml"
    write_atomic(coll, target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o664
    assert os.listdir(tmp_path) == ["qubes.xml"]
    again = Collection.load(target)
    assert again.to_bytes() == coll.to_bytes()
    # an existing file keeps its mode; the content is replaced
    target.chmod(0o640)
    again["test-work"].set_property("memory", 999)
    write_atomic(again, target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert Collection.load(target)["test-work"].properties["memory"] == "999"
    assert os.listdir(tmp_path) == ["qubes.xml"]


def test_write_atomic_failure_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    coll = Collection.load(SAMPLE)
    target = tmp_path / "qubes.xml"
    write_atomic(coll, target)
    old = target.read_bytes()

    def boom(*a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    coll["test-work"].set_property("memory", 1)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(coll, target)
    assert target.read_bytes() == old
    assert os.listdir(tmp_path) == ["qubes.xml"]
