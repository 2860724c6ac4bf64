"""The VM agent through its real entry points (rpc-policy/qubes.*), as a separate process via SimTransport."""

from __future__ import annotations

import errno
import io
import os
import select
import shlex
import shutil
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from helpers_agent import (
    BACKUP_NAME,
    RESTORE_REPLY,
    VM,
    backup,
    make_sim,
    open_channel,
    outer_members,
    vm_home,
    write_tar,
)
from qubes_backup_agent import confine, restore_service
from qubes_backup_agent.outer_tar import OuterReader
from qubes_backup_agent.storage import StorageError
from qubes_backup_agent.storage.directory import DirectorySink
from qubes_backup_dom0.qubes.system import System
from qubes_backup_protocol import frames, names
from qubes_backup_protocol.frames import FrameType

HAVE_BWRAP = shutil.which("bwrap") is not None and os.environ.get("QUBES_SIM_SANDBOX") != "0"
PY = shlex.quote(sys.executable)


@pytest.fixture
def system(tmp_path: Path) -> System:
    return make_sim(tmp_path)


def backup_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- qubes.Backup --------------------------------------------------------------------------------------


def test_backup_to_directory_stores_exact_bytes(system: System) -> None:
    chunks = [os.urandom(frames.MAX_DATA_FRAME), os.urandom(12345), b"", os.urandom(3 << 20)]
    reply, rc, _ = backup(system, "/home/user/backups", chunks)
    assert reply is not None and reply.type == FrameType.DONE, reply
    assert rc == 0
    assert reply.data.decode() == f"/home/user/backups/{BACKUP_NAME}"
    backups = vm_home(system) / "backups"
    assert backup_files(backups) == [BACKUP_NAME]
    assert (backups / BACKUP_NAME).read_bytes() == b"".join(chunks)


def test_backup_relative_and_tilde_locations(system: System) -> None:
    for loc in ("backups", "~/backups"):
        for p in (vm_home(system) / "backups").iterdir():
            p.unlink()
        reply, rc, _ = backup(system, loc, [b"abc"])
        assert reply is not None and reply.type == FrameType.DONE and rc == 0
        assert (vm_home(system) / "backups" / BACKUP_NAME).read_bytes() == b"abc"


def test_backup_without_commit_leaves_nothing(system: System) -> None:
    reply, rc, tail = backup(system, "/home/user/backups", [os.urandom(100000)] * 3, commit=False)
    assert rc != 0
    assert reply is None or reply.type == FrameType.ERROR
    assert backup_files(vm_home(system) / "backups") == []
    assert "COMMIT" in tail


def test_backup_existing_name_refused(system: System) -> None:
    target = vm_home(system) / "backups" / BACKUP_NAME
    target.write_bytes(b"old")
    reply, rc, _ = backup(system, "/home/user/backups", [b"new"])
    assert reply is not None and reply.type == FrameType.ERROR and rc != 0
    assert target.read_bytes() == b"old"
    assert backup_files(target.parent) == [BACKUP_NAME]


def test_backup_command_hook_receives_bytes(system: System) -> None:
    data = os.urandom(5 << 20)
    pieces = [data[i : i + frames.MAX_DATA_FRAME] for i in range(0, len(data), frames.MAX_DATA_FRAME)]
    reply, rc, _ = backup(system, "dd of=out.bin bs=1M status=none", pieces)
    assert reply is not None and reply.type == FrameType.DONE, reply
    assert rc == 0
    assert (vm_home(system) / "out.bin").read_bytes() == data


def test_backup_hook_gets_backup_name(system: System) -> None:
    code = "import os,sys; open(os.environ['QUBES_BACKUP_NAME'],'wb').write(sys.stdin.buffer.read())"
    reply, rc, _ = backup(system, f"{PY} -c {shlex.quote(code)}", [b"xyz"])
    assert reply is not None and reply.type == FrameType.DONE and rc == 0
    assert (vm_home(system) / BACKUP_NAME).read_bytes() == b"xyz"


def test_backup_location_never_reaches_a_shell(system: System) -> None:
    code = "import sys; open('out.bin','wb').write(sys.stdin.buffer.read())"
    for tail in ("; touch pwned1", "&& touch pwned2", "| touch pwned3", "$(touch pwned4)", "`touch pwned5`"):
        reply, rc, _ = backup(system, f"{PY} -c {shlex.quote(code)} {tail}", [b"data"])
        assert reply is not None and reply.type == FrameType.DONE and rc == 0
        assert (vm_home(system) / "out.bin").read_bytes() == b"data"
    reply, rc, _ = backup(system, "; touch pwned6", [b"data"])
    assert reply is not None and reply.type == FrameType.ERROR and rc != 0
    assert not list(vm_home(system).glob("pwned*"))
    # Without a shell, redirection and ";" are plain arguments of touch: it creates files named so.
    backup(system, "touch made > redirected; true", [b"data"])
    made = sorted(p.name for p in vm_home(system).iterdir() if p.is_file())
    assert made == [">", "made", "out.bin", "redirected;", "true"]


def test_backup_missing_directory_is_one_line_error(system: System) -> None:
    reply, rc, _ = backup(system, "/home/user/nonexistent", [b"x"])
    assert reply is not None and reply.type == FrameType.ERROR and rc != 0
    text = reply.data.decode()
    assert "\n" not in text and "location does not exist: /home/user/nonexistent" in text


def test_backup_unknown_command_is_one_line_error(system: System) -> None:
    reply, rc, _ = backup(system, "no-such-command-xyz --flag", [b"x"])
    assert reply is not None and reply.type == FrameType.ERROR and rc != 0
    assert reply.data.decode() == "command not found: no-such-command-xyz"


def test_backup_failing_hook_is_an_error(system: System) -> None:
    reply, rc, _ = backup(system, f"{PY} -c 'import sys; sys.stdin.buffer.read(); sys.exit(3)'", [b"x"])
    assert reply is not None and reply.type == FrameType.ERROR and rc != 0
    assert "status 3" in reply.data.decode()


def test_backup_hook_killed_without_commit(system: System) -> None:
    code = "import sys; open('out.bin','wb').write(sys.stdin.buffer.read())"
    reply, rc, _ = backup(system, f"{PY} -c {shlex.quote(code)}", [b"x" * 1000], commit=False)
    assert rc != 0
    assert reply is None or reply.type == FrameType.ERROR


@pytest.mark.parametrize(
    "location",
    ["/../../dom0/home/user", "../../../dom0", "/home/user/../../../../dom0/home", "~/../../.."],
)
def test_backup_path_escape_refused(system: System, location: str) -> None:
    reply, rc, _ = backup(system, location, [b"x"])
    assert reply is not None and reply.type == FrameType.ERROR and rc != 0
    assert "VM root" in reply.data.decode()
    assert not list((system.sim_dir / "dom0").rglob("qubes-backup-*"))  # type: ignore[operator]


def test_backup_symlink_out_refused(system: System) -> None:
    (vm_home(system) / "escape").symlink_to(system.dom0_root / "home" / "user")
    reply, rc, _ = backup(system, "/home/user/escape", [b"x"])
    assert reply is not None and reply.type == FrameType.ERROR and rc != 0
    assert not list(system.dom0_root.rglob("*qubes-backup*"))


def test_backup_bad_name_refused(system: System) -> None:
    with open_channel(system, "qubes.Backup") as ch:
        ch.send(FrameType.LOCATION, "../qubes-backup-x", b"/home/user/backups")
        reply = ch.recv({FrameType.ERROR: (0, frames.MAX_ERROR_LEN)})
        assert reply is not None and reply.type == FrameType.ERROR
        assert ch.wait(10) != 0


def test_directory_sink_enospc_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC cannot be provoked portably without a small filesystem: fake it at os.write and os.pwrite (the
    O_DIRECT writer's thread).  Its writes are asynchronous: the error comes from a later write or commit."""
    sink = DirectorySink(tmp_path, BACKUP_NAME, Path("/"))
    sink.write(b"first")

    def full(fd: int, data: object, *offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(StorageError) as info:
        for _ in range(4):  # more than the direct writer's buffers hold
            sink.write(bytes(4 << 20))
        sink.commit()
    monkeypatch.undo()
    sink.abort()
    assert str(info.value) in (
        f"No space left on device writing {tmp_path}/{BACKUP_NAME}",
        f"No space left on device finishing {tmp_path}/{BACKUP_NAME}",
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("total", [0, 1, 4095, 4096, (4 << 20) - 1, 4 << 20, (4 << 20) + 1, 9_000_001])
def test_directory_sink_direct_writes_every_byte(tmp_path: Path, total: int) -> None:
    """Written (where the filesystem allows it) with O_DIRECT from reused buffers, whole buffers at aligned
    offsets and the unaligned tail without O_DIRECT at commit: the file holds exactly the bytes given, by
    write() and by splice_from() (read from a pipe into the buffers) mixed."""
    data = os.urandom(total)
    sink = DirectorySink(tmp_path, BACKUP_NAME, tmp_path)
    first = min(1000, total)
    sink.write(data[:first])
    r, w = os.pipe()

    def feed() -> None:
        view = memoryview(data)[first:]
        while view:
            view = view[os.write(w, view) :]
        os.close(w)

    writer = threading.Thread(target=feed)
    writer.start()
    assert sink.splice_from(r, total - first) == total - first
    writer.join()
    os.close(r)
    sink.commit()
    assert (tmp_path / BACKUP_NAME).read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == [BACKUP_NAME]


def test_confine_resolve(tmp_path: Path) -> None:
    root = tmp_path / "vm"
    (root / "home" / "user").mkdir(parents=True)
    assert confine.resolve("/home/user", root) == root / "home" / "user"
    assert confine.resolve("x", root) == root / "home" / "user" / "x"
    assert confine.resolve("~", root) == root / "home" / "user"
    assert confine.resolve("/", root) == root
    for bad in ("/..", "../../..", "/home/../../etc", "~/../../../x"):
        with pytest.raises(confine.ConfinementError):
            confine.resolve(bad, root)
    (root / "home" / "user" / "out").symlink_to("/etc")
    with pytest.raises(confine.ConfinementError):
        confine.resolve("out/passwd", root)
    (root / "home" / "user" / "in").symlink_to("../user")
    assert confine.resolve("in", root) == root / "home" / "user"


# -- qubes.Restore -------------------------------------------------------------------------------------

ARCHIVES = {"vm0": 1, "vm1": 3, "vm2": 2, "vm3": 1}


def restore_until_manifest(ch, members: list[tuple[str, bytes]]) -> int:  # type: ignore[no-untyped-def]
    """Receive the members up to manifest.hmac and check them; returns how many were read."""
    count = 0
    while True:
        frame = ch.recv(RESTORE_REPLY, names.is_member_name)
        assert frame is not None and frame.type == FrameType.MEMBER, frame
        assert (frame.name, frame.data) == members[count]
        count += 1
        if frame.name == "manifest.hmac":
            return count


def nothing_pending(ch, seconds: float = 0.3) -> bool:  # type: ignore[no-untyped-def]
    if ch._buf:
        return False
    poller = select.poll()
    poller.register(ch.proc.stdout.fileno(), select.POLLIN)
    return not poller.poll(seconds * 1000)


def finish_restore(ch, wanted: list[str]) -> list[tuple[str, bytes]]:  # type: ignore[no-untyped-def]
    for archive in wanted:
        ch.send(FrameType.WANT, archive)
    ch.send(FrameType.WANT_END)
    got = []
    while True:
        frame = ch.recv(RESTORE_REPLY, names.is_member_name)
        assert frame is not None, "stream ended without END"
        if frame.type == FrameType.END:
            break
        assert frame.type == FrameType.MEMBER, frame
        got.append((frame.name, frame.data))
    assert ch.recv(RESTORE_REPLY) is None
    return got


@pytest.mark.parametrize("how", ["file", "command"])
def test_restore_selected_archives(system: System, how: str) -> None:
    members = outer_members(ARCHIVES)
    tar_path = vm_home(system) / "backups" / BACKUP_NAME
    write_tar(tar_path, members)
    location = f"/home/user/backups/{BACKUP_NAME}" if how == "file" else f"cat backups/{BACKUP_NAME}"
    with open_channel(system, "qubes.Restore") as ch:
        ch.send(FrameType.LOCATION, "", location.encode())
        n = restore_until_manifest(ch, members)
        assert n == 4
        assert nothing_pending(ch), "agent must wait for WANT_END after manifest.hmac"
        got = finish_restore(ch, ["vm0", "vm2"])
        assert ch.wait(10) == 0
    expected = [m for m in members[4:] if names.archive_of(m[0]) in ("vm0", "vm2")]
    assert got == expected


def test_restore_want_nothing(system: System) -> None:
    members = outer_members(ARCHIVES)
    write_tar(vm_home(system) / "b.tar", members)
    with open_channel(system, "qubes.Restore") as ch:
        ch.send(FrameType.LOCATION, "", b"b.tar")
        restore_until_manifest(ch, members)
        assert finish_restore(ch, []) == []
        assert ch.wait(10) == 0


def test_restore_dom0_hangs_up_quietly(system: System) -> None:
    members = outer_members(ARCHIVES)
    write_tar(vm_home(system) / "b.tar", members)
    with open_channel(system, "qubes.Restore") as ch:
        ch.send(FrameType.LOCATION, "", b"b.tar")
        restore_until_manifest(ch, members)
        ch.close_input()
        assert ch.recv(RESTORE_REPLY) is None
        assert ch.wait(10) == 0
        assert "Traceback" not in ch.stderr_tail()


@pytest.mark.parametrize("bad", ["../etc/passwd", "vm1/000000/x", "vm01/000000", "backup-header2"])
def test_restore_bad_member_name(system: System, bad: str) -> None:
    members = outer_members({"vm1": 1})
    members.insert(2, (bad, b"evil"))
    write_tar(vm_home(system) / "b.tar", members)
    with open_channel(system, "qubes.Restore") as ch:
        ch.send(FrameType.LOCATION, "", b"b.tar")
        frames_seen = []
        while True:
            frame = ch.recv(RESTORE_REPLY, names.is_member_name)
            assert frame is not None
            frames_seen.append(frame.type)
            if frame.type != FrameType.MEMBER:
                break
        assert frame.type == FrameType.ERROR
        assert "unexpected member name" in frame.data.decode()
        assert ch.wait(10) != 0
    assert frames_seen == [FrameType.MEMBER, FrameType.MEMBER, FrameType.ERROR]


def test_restore_non_regular_member(system: System) -> None:
    path = vm_home(system) / "b.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("backup-header")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with open_channel(system, "qubes.Restore") as ch:
        ch.send(FrameType.LOCATION, "", b"b.tar")
        frame = ch.recv(RESTORE_REPLY, names.is_member_name)
        assert frame is not None and frame.type == FrameType.ERROR
        assert "non-regular" in frame.data.decode()


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("/home/user/missing.tar", "location does not exist"),
        ("/../../dom0/x", "VM root"),
        ("no-such-command-xyz arg", "command not found"),
        ("/home/user/backups", "not a regular file"),
        ("s3://", "bad S3 location"),
    ],
)
def test_restore_location_errors(system: System, location: str, message: str) -> None:
    with open_channel(system, "qubes.Restore") as ch:
        ch.send(FrameType.LOCATION, "", location.encode())
        frame = ch.recv(RESTORE_REPLY)
        assert frame is not None and frame.type == FrameType.ERROR
        text = frame.data.decode()
        assert message in text or "boto3" in text, text
        assert "\n" not in text
        assert ch.wait(10) != 0


def test_restore_symlink_out_refused(system: System) -> None:
    secret = system.dom0_root / "secret.tar"
    write_tar(secret, outer_members({"vm1": 1}))
    (vm_home(system) / "link.tar").symlink_to(secret)
    with open_channel(system, "qubes.Restore") as ch:
        ch.send(FrameType.LOCATION, "", b"link.tar")
        frame = ch.recv(RESTORE_REPLY)
        assert frame is not None and frame.type == FrameType.ERROR, frame


def test_restore_not_a_tar(system: System) -> None:
    (vm_home(system) / "junk").write_bytes(os.urandom(3000))
    with open_channel(system, "qubes.Restore") as ch:
        ch.send(FrameType.LOCATION, "", b"junk")
        frame = ch.recv(RESTORE_REPLY)
        assert frame is not None and frame.type == FrameType.ERROR
        assert ch.wait(10) != 0


def test_restore_truncated_member_ends_stream(system: System) -> None:
    members = outer_members({"vm1": 2})
    path = vm_home(system) / "b.tar"
    write_tar(path, members)
    raw = path.read_bytes()
    path.write_bytes(raw[: 512 * 5 + 50])  # inside the manifest's data
    with open_channel(system, "qubes.Restore") as ch:
        ch.send(FrameType.LOCATION, "", b"b.tar")
        with pytest.raises(Exception, match=r"ended inside a frame"):
            for _ in range(10):
                if ch.recv(RESTORE_REPLY, names.is_member_name) is None:
                    break
        assert ch.wait(10) != 0


def test_restore_skips_unwanted_data_without_reading_it(tmp_path: Path) -> None:
    """In-process: with a seekable source, an unwanted archive's data bytes are never read."""
    members = outer_members({"vm1": 1})
    big = [(names.chunk_name("vm2", i), os.urandom(1 << 20)) for i in range(8)]
    members += big
    tar_path = tmp_path / "b.tar"
    write_tar(tar_path, members)

    class Counting(io.FileIO):
        read_bytes = 0

        def readinto(self, b):  # type: ignore[no-untyped-def, override]
            n = super().readinto(b)
            Counting.read_bytes += n or 0
            return n

    stdin = io.BytesIO(frames.encode(FrameType.WANT, "vm1") + frames.encode(FrameType.WANT_END))
    stdout = io.BytesIO()
    with Counting(tar_path) as raw:
        restore_service.stream_members(OuterReader(raw, seekable=True), stdin, stdout)
    assert Counting.read_bytes < (1 << 20)
    stdout.seek(0)
    got = []
    while (frame := frames.read_frame(stdout, RESTORE_REPLY)) is not None:
        got.append(frame.name if frame.type == FrameType.MEMBER else frame.type.name)
    assert got == [m[0] for m in members if not m[0].startswith("vm2/")] + ["END"]


# -- confinement by bubblewrap ---------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap (bwrap) not installed: agent runs unconfined")
def test_sandboxed_agent_cannot_read_dom0(system: System) -> None:
    secret = system.dom0_root / "secret.tar"
    write_tar(secret, outer_members({"vm1": 1}))
    # A hook is not path-confined by the agent (it is the VM's own program); only the sandbox stops it.
    for loc in (f"cat {shlex.quote(str(secret))}", f"{PY} -c 'print(open({str(secret)!r}).read())'"):
        with open_channel(system, "qubes.Restore", sandbox=True) as ch:
            ch.send(FrameType.LOCATION, "", loc.encode())
            frame = ch.recv(RESTORE_REPLY)
            assert frame is not None and frame.type == FrameType.ERROR, frame
            assert ch.wait(10) != 0
    # the same command works unconfined: the test above is meaningful
    with open_channel(system, "qubes.Restore", sandbox=False) as ch:
        ch.send(FrameType.LOCATION, "", f"cat {shlex.quote(str(secret))}".encode())
        frame = ch.recv(RESTORE_REPLY)
        assert frame is not None and frame.type == FrameType.MEMBER


@pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap (bwrap) not installed: agent runs unconfined")
def test_sandboxed_agent_has_no_network(system: System) -> None:
    code = "import socket; s=socket.socket(); s.connect(('127.0.0.1', 9)); print('connected')"
    with open_channel(system, "qubes.Restore", sandbox=True) as ch:
        ch.send(FrameType.LOCATION, "", f"{PY} -c {shlex.quote(code)} ; {VM}".encode())
        frame = ch.recv(RESTORE_REPLY)
        assert frame is not None and frame.type == FrameType.ERROR


def test_restore_large_member_in_pieces(system: System) -> None:
    members = outer_members({"vm1": 1})
    big = os.urandom(9 << 20)  # more than two COPY_PIECEs
    members[4] = (members[4][0], big)
    write_tar(vm_home(system) / "b.tar", members)
    with open_channel(system, "qubes.Restore") as ch:
        ch.send(FrameType.LOCATION, "", b"b.tar")
        restore_until_manifest(ch, members)
        got = finish_restore(ch, ["vm1"])
        assert ch.wait(10) == 0
    assert got == members[4:]


# -- the strict outer tar reader (FORMAT.md section 1) ----------------------------------------------------


@pytest.mark.parametrize("name", ["backup-header", "manifest.hmac", "vm0/000000", "vm99999/trailer.hmac"])
@pytest.mark.parametrize("size", [0, 1, 65, 511, 512, 513, (256 << 20) + 16])
def test_outer_reader_header_is_the_writers(name: str, size: int) -> None:
    """The one header the reader accepts is byte-identical to what dom0's outer writer emits."""
    from qubes_backup_agent.outer_tar import member_header
    from qubes_backup_dom0.format.outer import member_header as writer_header

    assert member_header(name, size) == writer_header(name, size)


def test_outer_reader_stream_skips_and_checks_padding() -> None:
    """A non-seekable stream: unwanted members are read through, wanted ones copied, the end marker ends it
    and nothing after it is read."""
    members = outer_members({"vm1": 2, "vm2": 1})
    from qubes_backup_dom0.format.outer import OuterWriter

    buf = io.BytesIO()
    writer = OuterWriter(buf)
    for name, data in members:
        writer.add(name, data)
    writer.close()
    raw = buf.getvalue() + b"junk after the end marker"

    class Stream(io.RawIOBase):
        def __init__(self) -> None:
            self.pos = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b):  # type: ignore[no-untyped-def, override]
            n = min(len(b), 100, len(raw) - self.pos)  # short reads
            b[:n] = raw[self.pos : self.pos + n]
            self.pos += n
            return n

    src = Stream()
    stdin = io.BytesIO(frames.encode(FrameType.WANT, "vm2") + frames.encode(FrameType.WANT_END))
    stdout = io.BytesIO()
    restore_service.stream_members(OuterReader(src, seekable=False), stdin, stdout)  # type: ignore[arg-type]
    assert src.pos <= len(raw) - len(b"junk after the end marker")
    stdout.seek(0)
    got = []
    while (frame := frames.read_frame(stdout, RESTORE_REPLY)) is not None:
        got.append((frame.name, bytes(frame.data)) if frame.type == FrameType.MEMBER else frame.type.name)
    assert got == [m for m in members if not m[0].startswith("vm1/")] + ["END"]


def test_agent_caps_its_memory_when_reading_a_file(system: System) -> None:
    """Reading a stored file, the agent runs with RLIMIT_AS = MEMORY_LIMIT (bubblewrap or not)."""
    members = outer_members({"vm1": 1})
    write_tar(vm_home(system) / "b.tar", members)
    with open_channel(system, "qubes.Restore", sandbox=False) as ch:
        ch.send(FrameType.LOCATION, "", b"b.tar")
        restore_until_manifest(ch, members)  # the agent now waits for WANT_END
        limits = Path(f"/proc/{ch.proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max address space"))
        assert line.split()[3:5] == [str(restore_service.MEMORY_LIMIT)] * 2, line
        assert finish_restore(ch, ["vm1"]) == members[4:]
        assert ch.wait(10) == 0


def test_backup_spliced_frames_store_exact_bytes(system: System) -> None:
    """DATA frames of every size (empty, one byte, odd, the largest) arrive in the file byte for byte, also
    when they go from the pipe into the file with splice(2) (the entry point's stdin is spliceable)."""
    rnd = os.urandom(frames.MAX_DATA_FRAME)
    chunks = [b"", b"x", rnd[:65535], rnd, rnd[:3 * 65536 + 7], b"", rnd[: frames.MAX_DATA_FRAME - 1]]
    reply, rc, err = backup(system, "/home/user/backups", chunks)
    assert rc == 0 and reply is not None and reply.type == FrameType.DONE, err
    assert (vm_home(system) / "backups" / BACKUP_NAME).read_bytes() == b"".join(chunks)


def test_receive_stream_splices_after_the_buffered_part(tmp_path: Path) -> None:
    """What the buffered reader already holds goes first, the rest is spliced: order and bytes kept; a stream
    that ends inside a frame is an early end."""
    from qubes_backup_agent import backup_service
    from qubes_backup_agent.handover import _Replayed

    data = [os.urandom(n) for n in (10, 200_000, 1, 70_000)]
    raw = b"".join(frames.encode(FrameType.DATA, "", d) for d in data) + frames.encode(FrameType.COMMIT)
    r, w = os.pipe()

    def feed() -> None:
        view = memoryview(raw)
        while view:
            view = view[os.write(w, view) :]
        os.close(w)

    writer = threading.Thread(target=feed)
    writer.start()
    sink = DirectorySink(tmp_path, BACKUP_NAME, tmp_path)
    stdin = io.BufferedReader(_Replayed(b"", r), buffer_size=1 << 16)
    backup_service.receive_stream(stdin, sink)  # type: ignore[arg-type]
    writer.join()
    os.close(r)
    sink.commit()
    assert (tmp_path / BACKUP_NAME).read_bytes() == b"".join(data)
    r, w = os.pipe()  # a stream that ends inside a spliced frame: refused like a short read
    os.write(w, frames.encode(FrameType.DATA, "", bytes(100_000))[:60_000])  # fits in the pipe
    os.close(w)
    short = DirectorySink(tmp_path, BACKUP_NAME + "0", tmp_path)
    with pytest.raises(frames.ProtocolError, match="stream ended inside a frame"):
        backup_service.receive_stream(io.BufferedReader(_Replayed(b"", r)), short)  # type: ignore[arg-type]
    short.abort()
    os.close(r)
    with pytest.raises(backup_service._EarlyEnd):  # no COMMIT
        backup_service.receive_stream(io.BytesIO(frames.encode(FrameType.DATA, "", b"abc")),
                                      DirectorySink(tmp_path, BACKUP_NAME + "1", tmp_path))  # fmt: skip


def test_directory_sink_no_direct_on_tmpfs() -> None:
    """On a tmpfs O_DIRECT would only add a copy (its pages are the file): the sink splices there."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    import tempfile

    with tempfile.TemporaryDirectory(dir=shm) as d:
        sink = DirectorySink(Path(d), BACKUP_NAME, Path(d))
        try:
            from qubes_backup_agent.storage import directory

            if directory._fs_type(sink.fd or 0) != directory.TMPFS_MAGIC:
                pytest.skip("/dev/shm is not a tmpfs here")
            assert sink._direct is None
            sink.write(b"abc")
            sink.commit()
            assert (Path(d) / BACKUP_NAME).read_bytes() == b"abc"
        finally:
            sink.abort()
