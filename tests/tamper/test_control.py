"""Controls: the untouched backup restores through the same harness, so every refusal elsewhere is real."""

from __future__ import annotations

from qubes_backup_dom0.qubesxml import Collection

from .harness import StreamTransport, World, clone_target, encode_stream, run_restore


def test_untouched_stream_restores(world: World, guard) -> None:  # type: ignore[no-untyped-def]
    system = clone_target(world, "control-stream")
    guard.trust_file(system.qubes_xml)
    path = world.base / "control.bin"
    path.write_bytes(encode_stream(world.a))
    job = run_restore(system, world.a_location, StreamTransport(path))
    guard.trust_file(system.qubes_xml)  # the restore's own output, read back by this test
    assert job.restored and set(job.restored) <= set(Collection.load(system.qubes_xml).names())
    for stage in ("verify", "decrypt", "manifest.parse", "feed", "decompress", "extract", "qubes.xml", "kdf"):
        assert guard.calls[stage] > 0, f"instrumentation of {stage} never ran"


def test_untouched_tar_restores_through_real_agent(world: World) -> None:
    system = clone_target(world, "control-agent")
    job = run_restore(system, world.a_location)
    assert len(job.restored) >= 3
