"""Controls: the untouched backup restores through the same harness, so every refusal elsewhere is real."""

from __future__ import annotations

from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.restore import apply
from qubes_backup_dom0.restore.machine import Restore

from .harness import (
    OrderGuard,
    StreamTransport,
    World,
    backup_vm_names,
    clone_target,
    encode_stream,
    home_staging,
    run_restore,
    vm_state,
)


def _assert_complete(world: World, system: System, job: Restore) -> None:
    state = vm_state(system)
    assert set(job.restored) == backup_vm_names(world)
    assert set(state) == {"dom0", "backupvm", *backup_vm_names(world)}
    for name, (_klass, _state, tags) in state.items():
        assert apply.IN_PROGRESS not in tags and not any(t.startswith(apply.OWNER_PREFIX) for t in tags), name
    assert not home_staging(system)
    assert job.home_restored_to is not None and job.home_restored_to.is_dir()


def test_untouched_stream_restores(world: World, guard: OrderGuard) -> None:
    system = clone_target(world, "control-stream")
    path = world.base / "control.bin"
    path.write_bytes(encode_stream(world.a))
    job = run_restore(system, world.a_location, StreamTransport(path))
    _assert_complete(world, system, job)
    for stage in ("verify", "decrypt", "manifest.parse", "feed", "decompress", "extract", "qubes.xml", "kdf",
                  "volume import", "in-memory file"):  # fmt: skip
        assert guard.calls[stage] > 0, f"instrumentation of {stage} never ran"


def test_untouched_tar_restores_through_real_agent(world: World) -> None:
    system = clone_target(world, "control-agent")
    job = run_restore(system, world.a_location)
    _assert_complete(world, system, job)
