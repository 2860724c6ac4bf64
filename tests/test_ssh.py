"""ssh locations (``ssh://[user@]host[:port]/path``) against a real OpenSSH server on 127.0.0.1.

The server is Debian's ``openssh-server`` (installed by .ci/run), started here as a child process on a free
loopback port with a host key and a client key generated at test time; it lives only as long as the test
session (and at most SSHD_LIFETIME seconds even if pytest dies) and is always killed.  Clients reach it through
a small counting TCP proxy, so the tests can measure what a restore really transferred.  Without ``sshd`` or
``ssh-keygen`` these tests FAIL, they do not skip: ssh storage must not go untested silently.

The simulated backup VM's ssh setup lives where a real VM's would, in ``/home/user/.ssh`` of backupvm
(``id_ed25519``, ``known_hosts``); the agent points the client there (storage/ssh.py), never at the host
user's ``~/.ssh``.

Network: a simulated backup VM has none by design — the bubblewrap sandbox (transport.sandbox_argv) unshares
the network namespace, so a sandboxed agent's 127.0.0.1 is its own empty loopback.  The sandbox is started
before the LOCATION frame arrives and dom0 never interprets a location (it means something only inside the
VM), so "share the network for ssh:// locations" would make dom0 parse the VM's location grammar, and sharing
the host's network namespace would also hand the simulated VM every service on the host's (dom0's) loopback.
So, exactly like test_s3.py, the tests that need the server run the agent unsandboxed (``QUBES_SIM_SANDBOX=0``
for the CLIs, ``sandbox=False`` for the agent-level tests); path confinement (QUBES_AGENT_ROOT) still applies
inside the agent.  test_sandboxed_agent_has_no_network checks the sandboxed case fails with one clear line.

Two levels: the CLIs end to end (qvm-backup / qvm-backup-restore with ``-d backupvm ssh://...``) and the agent
alone, driven through its stdin/stdout frames like test_agent.py, covering the same cases without dom0.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Sim, make_fresh, new_sim, one_error_line
from helpers_agent import (
    BACKUP_NAME,
    RESTORE_REPLY,
    backup,
    make_sim,
    open_channel,
    outer_members,
    vm_home,
    write_tar,
)
from qubes_backup_agent.storage import StorageError, classify
from qubes_backup_agent.storage import ssh as ssh_storage
from qubes_backup_dom0.qubes.system import System
from qubes_backup_protocol import frames, names
from qubes_backup_protocol.frames import FrameType
from qubes_backup_sim import simgen
from test_cli_restore import assert_same_vm

LOOPBACK = "127.0.0.1"
SSHD_LIFETIME = 1800  # seconds: the server ends by itself even if pytest is killed
SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
NAME_RE = re.compile(r"qubes-backup-\d{4}-\d\d-\d\dT\d{6}(?:-\d+)?")
HAVE_BWRAP = shutil.which("bwrap") is not None


# -- the server ---------------------------------------------------------------------------------------------


class CountingProxy:
    """127.0.0.1:port -> the sshd; counts the bytes sent from the server to clients, and connections."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.down = 0
        self.connections = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection((LOOPBACK, self.target_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while piece := src.recv(1 << 16):
                dst.sendall(piece)
                if count:
                    with self.lock:
                        self.down += len(piece)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                src.shutdown(socket.SHUT_RD)

    def received(self) -> tuple[int, int]:
        """(bytes sent to clients so far, connections so far)."""
        with self.lock:
            return self.down, self.connections

    def close(self) -> None:
        self.closed = True
        self.sock.close()


@dataclass
class SshServer:
    dir: Path
    port: int  # the proxy's port: what clients use
    user: str
    host_key_pub: str
    client_key: Path  # authorized
    other_key: Path  # not authorized
    proxy: CountingProxy
    log: Path

    def url(self, path: Path | str, port: int | None = None) -> str:
        return f"ssh://{self.user}@{LOOPBACK}:{port or self.port}{path}"

    @property
    def known_hosts_line(self) -> str:
        return f"[{LOOPBACK}]:{self.port} {self.host_key_pub}\n"

    def remote_dir(self, base: Path) -> Path:
        d = base / "remote backups"  # a space: the remote path must be quoted for the remote shell
        d.mkdir(parents=True)
        return d


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=SBIN_PATH)
    if found is None:
        pytest.fail(f"{name} is needed for the ssh tests: apt-get install openssh-server openssh-client", pytrace=False)
    return found


def _keygen(path: Path) -> None:
    subprocess.run([_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", "qb-test", "-f", str(path)], check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> bool:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=1) as s:
            if s.recv(4).startswith(b"SSH-"):
                return True
        time.sleep(0.05)
    pytest.fail(f"sshd did not start: {log.read_text(errors='replace')[-2000:]}", pytrace=False)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    sshd_bin, timeout_bin = _tool("sshd"), _tool("timeout")
    _tool("ssh")
    base = tmp_path_factory.mktemp("sshd")
    _keygen(base / "host_key")
    _keygen(base / "client_key")
    _keygen(base / "other_key")
    shutil.copy(base / "client_key.pub", base / "authorized_keys")
    user = getpass.getuser()
    if os.geteuid() == 0:
        # Debian's sshd refuses to start as root without its privilege separation directory (the package's
        # service creates it at boot; in a container nothing did).
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    log = base / "sshd.log"
    proc: subprocess.Popen[bytes] | None = None
    for _attempt in range(5):  # a free port can be taken between the check and sshd's bind: retry
        port = _free_port()
        config = base / "sshd_config"
        config.write_text(
            f"ListenAddress {LOOPBACK}\nPort {port}\nHostKey {base / 'host_key'}\n"
            f"AuthorizedKeysFile {base / 'authorized_keys'}\nStrictModes no\nPidFile none\nUsePAM no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nPrintMotd no\nPrintLastLog no\nBanner none\nPermitUserRC no\n"
            "AllowTcpForwarding no\nX11Forwarding no\nMaxStartups 100\nLoginGraceTime 30\nLogLevel VERBOSE\n"
            "Subsystem sftp internal-sftp\n"  # repositories (test_repo_remote.py)
        )
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [timeout_bin, str(SSHD_LIFETIME), sshd_bin, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip
        if _wait_listening(port, proc, log):
            break
        proc.wait()
        proc = None
    if proc is None:
        pytest.fail(f"sshd did not start: {log.read_text(errors='replace')[-2000:]}", pytrace=False)
    proxy = CountingProxy(port)
    try:
        yield SshServer(
            base, proxy.port, user, (base / "host_key.pub").read_text().strip(),
            base / "client_key", base / "other_key", proxy, log,
        )  # fmt: skip
    finally:
        proxy.close()
        proc.terminate()  # timeout passes SIGTERM on to sshd
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # our own process group (start_new_session): sshd and children
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def install_client(vm_root: Path, server: SshServer, *, known: bool = True, authorized: bool = True) -> Path:
    """The backup VM's own ssh setup, where a real VM has it: /home/user/.ssh/{id_ed25519,known_hosts}."""
    ssh_dir = vm_root / "home" / "user" / ".ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ssh_dir / "id_ed25519"
    key.write_bytes((server.client_key if authorized else server.other_key).read_bytes())
    key.chmod(0o600)
    (ssh_dir / "known_hosts").write_text(server.known_hosts_line if known else "")
    return ssh_dir


def remote_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def partials(directory: Path) -> list[str]:
    return [n for n in remote_names(directory) if ".partial-" in n]


# -- the CLIs end to end ------------------------------------------------------------------------------------


@dataclass
class SshSim(Sim):
    """A simulated system whose agent may reach the test server (unsandboxed: see the module docstring)."""

    extra: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = super().env()
        env.update(self.extra)
        env["QUBES_SIM_SANDBOX"] = "0"
        return env


def sshsim(sim: Sim, server: SshServer, **client: bool) -> SshSim:
    install_client(sim.vm_root("backupvm"), server, **client)
    return SshSim(sim.dir)


def written_name(stdout: str, url: str) -> str:
    m = re.fullmatch(rf"Backup written to: backupvm:{re.escape(url)}/({NAME_RE.pattern}) \(backup id [0-9a-f]{{32}}, "
                     r"created [0-9TZ:-]+, [0-9.]+ [KMGT]?i?B\)", stdout.strip())  # fmt: skip
    assert m, stdout
    return m.group(1)


def test_cli_round_trip(tmp_path: Path, sshd: SshServer) -> None:
    remote = sshd.remote_dir(tmp_path)
    src = sshsim(new_sim(tmp_path / "sim"), sshd)
    url = sshd.url(remote)
    r = src.backup("-q", "-d", "backupvm", url)
    assert r.returncode == 0, r.stderr
    name = written_name(r.stdout, url)
    assert remote_names(remote) == [name]
    assert (remote / name).stat().st_mode & 0o077 == 0
    with tarfile.open(remote / name) as tar:
        assert tar.next().name == "backup-header"  # type: ignore[union-attr]
    # Nothing was stored in the backup VM itself.
    assert not any("qubes-backup-" in p.name for p in src.vm_root("backupvm").rglob("*"))

    dst = sshsim(make_fresh(tmp_path / "fresh", src), sshd)
    r = dst.restore("-d", "backupvm", f"{url}/{name}")
    assert r.returncode == 0, r.stderr
    restored = set(dst.collection().names()) - {"dom0", "backupvm"}
    assert restored <= set(src.collection().names()) and len(restored) >= 3, restored
    for vm in sorted(restored):
        assert_same_vm(src, vm, dst)


@pytest.fixture(scope="module")
def big_backup(tmp_path_factory: pytest.TempPathFactory, sshd: SshServer) -> tuple[Sim, Path, str]:
    """A 40 MiB-data system backed up over ssh; returns (source, remote file, its ssh url)."""
    base = tmp_path_factory.mktemp("big")
    simgen.generate(base / "sim", "bench", seed=1, data_mib=40, apparent_gib=1)
    (base / "sim" / "dom0" / "pw").write_text("correct horse battery staple\n")
    sim = sshsim(Sim(base / "sim"), sshd)
    remote = sshd.remote_dir(base)
    r = sim.backup("-q", "-d", "backupvm", sshd.url(remote))
    assert r.returncode == 0, r.stderr
    name = written_name(r.stdout, sshd.url(remote))
    return sim, remote / name, sshd.url(remote / name)


def test_cli_partial_restore_transfers_little(
    tmp_path: Path, big_backup: tuple[Sim, Path, str], sshd: SshServer
) -> None:
    """One VM: the other VMs' archives are skipped on the remote, not transferred."""
    src, path, url = big_backup
    size = path.stat().st_size
    dst = sshsim(make_fresh(tmp_path / "fresh", src), sshd)
    before, conns_before = sshd.proxy.received()
    r = dst.restore("-d", "backupvm", url, "legacy-hvm")
    assert r.returncode == 0, r.stderr
    assert sorted(dst.collection().names()) == ["backupvm", "dom0", "legacy-hvm"]
    assert_same_vm(src, "legacy-hvm", dst)
    got, conns = sshd.proxy.received()
    transferred = got - before
    assert transferred < size // 3, (transferred, size)
    assert conns - conns_before < 20, conns - conns_before

    # The measurement is real: a full verification reads (and transfers) the whole file.
    before, _ = sshd.proxy.received()
    r = dst.restore("-d", "backupvm", "--verify-only", url)
    assert r.returncode == 0, r.stderr
    assert sshd.proxy.received()[0] - before >= size


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_cli_interrupted_backup_leaves_nothing(tmp_path: Path, sshd: SshServer, sig: signal.Signals) -> None:
    simgen.generate(tmp_path / "sim", "bench", seed=2, data_mib=60, apparent_gib=1)
    (tmp_path / "sim" / "dom0" / "pw").write_text("correct horse battery staple\n")
    sim = sshsim(Sim(tmp_path / "sim"), sshd)
    remote = sshd.remote_dir(tmp_path)
    proc = sim.popen("qvm-backup", "-y", "-q", "-p", "/pw", "--kdf-n", "1024", "--weak-kdf-ok", "-d", "backupvm",
                     sshd.url(remote))
    try:
        deadline = time.monotonic() + 60
        while True:  # wait until the stream is flowing into the temporary file, then stop dom0 mid-stream
            parts = partials(remote)
            if parts and (remote / parts[0]).stat().st_size > (1 << 20):
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "nothing arrived on the server"
            time.sleep(0.02)
        assert all(n.startswith(".qubes-backup-") for n in remote_names(remote)), remote_names(remote)
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(sig)
        if sig != signal.SIGKILL:
            proc.send_signal(signal.SIGCONT)
        out, _err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out
    assert "Backup written" not in out
    deadline = time.monotonic() + 30  # the orphaned agent sees end of stream and removes the partial file
    while remote_names(remote) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert remote_names(remote) == []


def test_cli_unknown_host_is_one_line(tmp_path: Path, sshd: SshServer) -> None:
    sim = sshsim(new_sim(tmp_path / "sim"), sshd, known=False)
    remote = sshd.remote_dir(tmp_path)
    r = sim.backup("-q", "-d", "backupvm", sshd.url(remote))
    assert r.returncode != 0
    assert "Backup written" not in r.stdout
    line = one_error_line(r.stderr)
    assert f"host key of {sshd.user}@{LOOPBACK}:{sshd.port} is not in the backup VM's known_hosts" in line, line
    assert "(Host key verification failed.)" in line, line
    assert remote_names(remote) == []
    r = sim.restore("-d", "backupvm", sshd.url(remote / "qubes-backup-2020-01-01T000000"))
    assert r.returncode != 0
    assert "Host key verification failed." in one_error_line(r.stderr)


def test_cli_refused_key_is_one_line(tmp_path: Path, sshd: SshServer) -> None:
    sim = sshsim(new_sim(tmp_path / "sim"), sshd, authorized=False)
    remote = sshd.remote_dir(tmp_path)
    r = sim.backup("-q", "-d", "backupvm", sshd.url(remote))
    assert r.returncode != 0
    line = one_error_line(r.stderr)
    assert f"ssh: {sshd.user}@{LOOPBACK}:{sshd.port} refused the backup VM's key" in line, line
    assert "Permission denied (publickey)" in line, line
    assert remote_names(remote) == []


def test_cli_missing_remote_file_is_one_line(tmp_path: Path, sshd: SshServer) -> None:
    sim = sshsim(new_sim(tmp_path / "sim"), sshd)
    missing = sshd.url(tmp_path / "nothing" / "qubes-backup-2020-01-01T000000")
    r = sim.restore("-d", "backupvm", missing)
    assert r.returncode != 0
    assert f"location does not exist: {missing}" in one_error_line(r.stderr)


# -- the agent alone, through its frames ----------------------------------------------------------------------


@pytest.fixture
def system(tmp_path: Path, sshd: SshServer) -> System:
    system = make_sim(tmp_path)
    install_client(system.vm_root("backupvm"), sshd)
    return system


def agent_backup(system: System, location: str, chunks: list[bytes], commit: bool = True) -> tuple[str, int, str]:
    """qubes.Backup over ssh; returns (reply kind and text, exit status, stderr)."""
    reply, rc, tail = backup(system, location, chunks, commit=commit, sandbox=False)
    if reply is None:
        return "", rc, tail
    return f"{reply.type.name}: {bytes(reply.data).decode()}", rc, tail


def test_agent_backup_stores_exact_bytes(tmp_path: Path, system: System, sshd: SshServer) -> None:
    remote = sshd.remote_dir(tmp_path)
    data = os.urandom(9 << 20)
    pieces = [data[i : i + frames.MAX_DATA_FRAME] for i in range(0, len(data), frames.MAX_DATA_FRAME)]
    reply, rc, _ = agent_backup(system, sshd.url(remote), [*pieces, b""])
    assert (reply, rc) == (f"DONE: {sshd.url(remote)}/{BACKUP_NAME}", 0)
    assert remote_names(remote) == [BACKUP_NAME]
    assert (remote / BACKUP_NAME).read_bytes() == data


def test_agent_backup_without_commit_removes_partial(tmp_path: Path, system: System, sshd: SshServer) -> None:
    remote = sshd.remote_dir(tmp_path)
    reply, rc, tail = agent_backup(system, sshd.url(remote), [os.urandom(1 << 20)] * 3, commit=False)
    assert rc != 0
    assert reply == "" or reply.startswith("ERROR")
    assert "COMMIT" in tail
    assert remote_names(remote) == []


def test_agent_backup_killed_mid_stream_removes_partial(tmp_path: Path, system: System, sshd: SshServer) -> None:
    """SIGTERM to the agent while the stream flows (as dom0 or qrexec would): the partial file goes away."""
    remote = sshd.remote_dir(tmp_path)
    with open_channel(system, "qubes.Backup", sandbox=False) as ch:
        ch.send(FrameType.LOCATION, BACKUP_NAME, sshd.url(remote).encode())
        for _ in range(3):
            ch.send(FrameType.DATA, "", os.urandom(1 << 20))
        deadline = time.monotonic() + 30
        while not (partials(remote) and (remote / partials(remote)[0]).stat().st_size >= 3 << 20):
            assert time.monotonic() < deadline, remote_names(remote)
            time.sleep(0.02)
        assert partials(remote)[0].startswith(f".{BACKUP_NAME}.partial-")
        ch.proc.send_signal(signal.SIGTERM)
        assert ch.wait(30) != 0
    assert remote_names(remote) == []


def test_agent_backup_never_replaces(tmp_path: Path, system: System, sshd: SshServer) -> None:
    remote = sshd.remote_dir(tmp_path)
    (remote / BACKUP_NAME).write_bytes(b"old")
    reply, rc, _ = agent_backup(system, sshd.url(remote), [b"new"])
    assert rc != 0
    assert reply == f"ERROR: backup already exists: {sshd.url(remote)}/{BACKUP_NAME}"
    assert remote_names(remote) == [BACKUP_NAME]
    assert (remote / BACKUP_NAME).read_bytes() == b"old"


def test_agent_backup_name_appearing_during_upload_is_not_replaced(
    tmp_path: Path, system: System, sshd: SshServer
) -> None:
    remote = sshd.remote_dir(tmp_path)
    with open_channel(system, "qubes.Backup", sandbox=False) as ch:
        ch.send(FrameType.LOCATION, BACKUP_NAME, sshd.url(remote).encode())
        ch.send(FrameType.DATA, "", b"new")
        deadline = time.monotonic() + 30
        while not partials(remote):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        (remote / BACKUP_NAME).write_bytes(b"old")
        ch.send(FrameType.COMMIT)
        ch.close_input()
        reply = ch.recv({FrameType.ERROR: (0, frames.MAX_ERROR_LEN)})
        assert reply is not None and b"backup already exists" in bytes(reply.data)
        assert ch.wait(30) != 0
    assert remote_names(remote) == [BACKUP_NAME]
    assert (remote / BACKUP_NAME).read_bytes() == b"old"


def test_agent_remote_path_is_quoted(tmp_path: Path, system: System, sshd: SshServer) -> None:
    """Shell syntax in the remote path is a part of the name, never run on the server."""
    remote = tmp_path / "x'; touch PWNED; echo '$(touch PWNED2) `touch PWNED3` & ;|*"
    remote.mkdir()
    reply, rc, _ = agent_backup(system, sshd.url(remote), [b"data"])
    assert (reply, rc) == (f"DONE: {sshd.url(remote)}/{BACKUP_NAME}", 0)
    assert (remote / BACKUP_NAME).read_bytes() == b"data"
    assert not list(Path.home().glob("PWNED*")) and not list(tmp_path.rglob("PWNED*"))


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown-host", "is not in the backup VM's known_hosts or has changed (Host key verification failed.)"),
        ("refused-key", "refused the backup VM's key ({user}@127.0.0.1: Permission denied (publickey).)"),
        ("connection-refused", "ssh: cannot connect to {user}@127.0.0.1:{dead}"),
        ("no-such-dir", "location does not exist: {url}"),
    ],
)
@pytest.mark.parametrize("service", ["qubes.Backup", "qubes.Restore"])
def test_agent_errors_are_one_line(
    tmp_path: Path, system: System, sshd: SshServer, case: str, expected: str, service: str
) -> None:
    dead = _free_port()
    where = tmp_path / "nowhere"
    url = sshd.url(where) if service == "qubes.Backup" else sshd.url(where / BACKUP_NAME)
    if case == "unknown-host":
        install_client(system.vm_root("backupvm"), sshd, known=False)
    elif case == "refused-key":
        install_client(system.vm_root("backupvm"), sshd, authorized=False)
    elif case == "connection-refused":
        url = sshd.url(where, port=dead)
    with open_channel(system, service, sandbox=False) as ch:
        ch.send(FrameType.LOCATION, BACKUP_NAME if service == "qubes.Backup" else "", url.encode())
        frame = ch.recv(RESTORE_REPLY)
        assert frame is not None and frame.type == FrameType.ERROR, frame
        text = bytes(frame.data).decode()
        assert ch.wait(30) != 0
    assert "\n" not in text and len(text) <= frames.MAX_ERROR_LEN
    assert expected.format(user=sshd.user, dead=dead, url=url) in text, text
    if case == "connection-refused":
        assert "Connection refused" in text, text
    assert not where.exists()


def test_agent_restore_reads_only_wanted_archives(tmp_path: Path, system: System, sshd: SshServer) -> None:
    remote = sshd.remote_dir(tmp_path)
    members = outer_members({"vm0": 1, "vm1": 2})
    members += [(names.chunk_name("vm2", i), os.urandom(1 << 20)) for i in range(8)]
    members += [(names.chunk_name("vm3", i), bytes([i]) * 3000) for i in range(3)]
    members += [(names.chunk_name("vm4", i), os.urandom(1 << 20)) for i in range(8)]
    members += [(names.chunk_name("vm5", i), bytes([i]) * 5000) for i in range(2)]
    write_tar(remote / BACKUP_NAME, members)
    size = (remote / BACKUP_NAME).stat().st_size
    wanted = ("vm1", "vm3", "vm5")
    before, conns_before = sshd.proxy.received()
    with open_channel(system, "qubes.Restore", sandbox=False) as ch:
        ch.send(FrameType.LOCATION, "", sshd.url(remote / BACKUP_NAME).encode())
        got = []
        while True:
            frame = ch.recv(RESTORE_REPLY, names.is_member_name)
            assert frame is not None and frame.type != FrameType.ERROR, frame
            if frame.type == FrameType.END:
                break
            got.append((frame.name, bytes(frame.data)))
            if frame.name == "manifest.hmac":
                for archive in wanted:
                    ch.send(FrameType.WANT, archive)
                ch.send(FrameType.WANT_END)
        assert ch.wait(30) == 0
    head = members[:4]
    assert got == head + [m for m in members[4:] if names.archive_of(m[0]) in wanted]
    transferred, conns = (a - b for a, b in zip(sshd.proxy.received(), (before, conns_before), strict=True))
    assert transferred < size // 4, (transferred, size)
    assert conns == 1, conns  # one connection: skipping is a matter of requests, not reconnections


def test_agent_restore_everything_is_exact(tmp_path: Path, system: System, sshd: SshServer) -> None:
    """Sequential reads past several range windows (1 MiB, then doubling) give back every byte."""
    remote = sshd.remote_dir(tmp_path)
    members = outer_members({"vm0": 1})
    members += [(names.chunk_name("vm1", i), os.urandom((3 << 20) + 17 * i)) for i in range(4)]
    write_tar(remote / BACKUP_NAME, members)
    with open_channel(system, "qubes.Restore", sandbox=False) as ch:
        ch.send(FrameType.LOCATION, "", sshd.url(remote / BACKUP_NAME).encode())
        got = []
        while (frame := ch.recv(RESTORE_REPLY, names.is_member_name)) is not None:
            assert frame.type != FrameType.ERROR, frame
            if frame.type == FrameType.END:
                break
            got.append((frame.name, bytes(frame.data)))
            if frame.name == "manifest.hmac":
                ch.send(FrameType.WANT, "vm0")
                ch.send(FrameType.WANT, "vm1")
                ch.send(FrameType.WANT_END)
        assert ch.wait(30) == 0
    assert got == members


def test_agent_restore_truncated_remote_file(tmp_path: Path, system: System, sshd: SshServer) -> None:
    remote = sshd.remote_dir(tmp_path)
    members = outer_members({"vm1": 2})
    write_tar(remote / BACKUP_NAME, members)
    raw = (remote / BACKUP_NAME).read_bytes()
    (remote / BACKUP_NAME).write_bytes(raw[: 512 * 5 + 50])  # inside the manifest's data
    with open_channel(system, "qubes.Restore", sandbox=False) as ch:
        ch.send(FrameType.LOCATION, "", sshd.url(remote / BACKUP_NAME).encode())
        with pytest.raises(Exception, match=r"ended inside a frame"):
            for _ in range(10):
                if ch.recv(RESTORE_REPLY, names.is_member_name) is None:
                    break
        assert ch.wait(30) != 0


def test_agent_ssh_config_from_the_vm(tmp_path: Path, system: System, sshd: SshServer,
                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """QUBES_AGENT_SSH_CONFIG names a config file inside the VM: a Host alias with its port and user."""
    config = vm_home(system) / "qb-ssh-config"
    config.write_text(f"Host backupserver\n  HostName {LOOPBACK}\n  Port {sshd.port}\n  User {sshd.user}\n")
    config.chmod(0o600)
    monkeypatch.setenv(ssh_storage.CONFIG_ENV, "/home/user/qb-ssh-config")
    remote = sshd.remote_dir(tmp_path)
    reply, rc, _ = agent_backup(system, f"ssh://backupserver{remote}", [b"via alias"])
    assert (reply, rc) == (f"DONE: ssh://backupserver{remote}/{BACKUP_NAME}", 0)
    assert (remote / BACKUP_NAME).read_bytes() == b"via alias"
    monkeypatch.setenv(ssh_storage.CONFIG_ENV, "/../../../etc/ssh/ssh_config")
    reply, rc, _ = agent_backup(system, f"ssh://backupserver{remote}", [b"x"])
    assert rc != 0 and "VM root" in reply, reply


@pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap is not installed (.ci/run installs it)")
def test_sandboxed_agent_has_no_network(tmp_path: Path, system: System, sshd: SshServer) -> None:
    """Confined like a simulated VM (no network namespace of its own): one clear line, nothing written."""
    remote = sshd.remote_dir(tmp_path)
    reply, rc, _ = backup(system, sshd.url(remote), [b"x"], sandbox=True)
    assert reply is not None and reply.type == FrameType.ERROR and rc != 0
    text = bytes(reply.data).decode()
    assert text.startswith(f"ssh: cannot connect to {sshd.user}@{LOOPBACK}:{sshd.port}"), text
    assert remote_names(remote) == []


# -- parsing and the client's configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "user", "host", "port", "path"),
    [
        ("ssh://nas/backups", "", "nas", None, "/backups"),
        ("ssh://u@nas.example:2222/srv/b/", "u", "nas.example", 2222, "/srv/b"),
        ("ssh://u@[::1]:22/x", "u", "::1", 22, "/x"),
        ("ssh://[fe80::1%eth0]/x", "", "fe80::1%eth0", None, "/x"),
        ("ssh://nas/", "", "nas", None, "/"),
        ("ssh://nas/~/backups", "", "nas", None, "./backups"),
        ("ssh://nas/~", "", "nas", None, "."),
        ("ssh://nas/~/-rf", "", "nas", None, "./-rf"),
        ("ssh://nas/a b/%20?#", "", "nas", None, "/a b/%20?#"),
    ],
)
def test_parse_url(url: str, user: str, host: str, port: int | None, path: str) -> None:
    target = ssh_storage.parse_url(url)
    assert (target.user, target.host, target.port, target.path) == (user, host, port, path)
    assert target.destination()[-1] == host and target.destination()[-2] == "--"


@pytest.mark.parametrize(
    "url",
    [
        "ssh://-oProxyCommand=touch%20x/p",
        "ssh://nas",
        "ssh:///p",
        "ssh://-l@nas/p",
        "ssh://nas:0/p",
        "ssh://nas:99999/p",
        "ssh://nas/a\nb",
        "ssh://nas/a\x1b[2Jb",
        "ssh://na s/p",
        "ssh://nas;id/p",
    ],
)
def test_parse_url_refuses(url: str) -> None:
    with pytest.raises(StorageError) as info:
        ssh_storage.parse_url(url)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)


def test_ssh_is_a_location_kind(tmp_path: Path) -> None:
    assert classify("ssh://nas/backups", tmp_path, want_dir=True).kind == "ssh"
    assert classify(f"ssh://nas/b/{BACKUP_NAME}", tmp_path, want_dir=False).kind == "ssh"


def test_simulated_vm_uses_its_own_ssh_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the simulation the client reads the VM's ~/.ssh, never the host user's (ssh ignores $HOME)."""
    monkeypatch.delenv(ssh_storage.CONFIG_ENV, raising=False)
    root = tmp_path / "vm"
    ssh_dir = root / "home" / "user" / ".ssh"
    ssh_dir.mkdir(parents=True)
    opts = ssh_storage.client_options(root)
    assert opts[:2] == ["-F", os.devnull]
    assert f'UserKnownHostsFile="{ssh_dir}/known_hosts"' in opts
    assert f'IdentityFile="{ssh_dir}/id_ed25519"' in opts
    (ssh_dir / "config").write_text("")
    (ssh_dir / "id_rsa").write_text("")
    opts = ssh_storage.client_options(root)
    assert opts[:2] == ["-F", str(ssh_dir / "config")]
    assert [o for o in opts if o.startswith("IdentityFile=")] == [f'IdentityFile="{ssh_dir}/id_rsa"']
    assert ssh_storage.client_options(Path("/")) == []  # a real VM: ssh's own configuration, untouched
