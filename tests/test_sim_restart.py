"""The simulated qubesd exits when idle and is started on demand: a dom0 process that holds a ``Qubes`` across
the exit (a long archive read during a backup, a long import) gets it started again on its next call."""

from __future__ import annotations

from pathlib import Path

from conftest import Sim
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_sim import launch, simgen


def test_qubes_survives_an_idle_exit_of_the_simulated_qubesd(tmp_path: Path) -> None:
    simgen.generate(tmp_path / "sim", "small", keep=("backupvm",))
    sim = Sim(tmp_path / "sim")
    qubes = Qubes(sim.system)
    before = qubes.vm_list()
    assert "backupvm" in before
    launch.stop_qubesd(sim.dir)  # what its idle timeout does
    sock = sim.dom0 / "var/run/qubesd.sock"
    assert not sock.exists()
    assert qubes.vm_list() == before  # started again, same state (saved after every change)
    assert sock.is_socket()
