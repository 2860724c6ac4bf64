"""`make install-dom0` / `make install-vm` into temporary DESTDIRs, and backups and restores run through the
installed files: the installed qvm-backup / qvm-backup-restore with QUBES_SIM, the installed agent services.

Also: the installs stay off Qubes' own files, `make uninstall-*` removes exactly what was installed, the
installed services hand requests in Qubes' own protocol to Qubes' own service (a fake one here), and
qvm-backup-restore names a backup in Qubes' own format with Qubes' own qvm-backup-restore's command, and runs
that (a fake one here) only with --use-qubes-restore.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from conftest import KDF, PASSPHRASE, VM_BACKUPS, Sim, make_fresh
from qubes_backup_dom0.format import header
from qubes_backup_dom0.format.sparse import same_content
from qubes_backup_sim import simgen

REPO = Path(__file__).resolve().parent.parent
PREFIX = "/usr/local"
LIB = f"{PREFIX}/lib/qubes-backup"
SERVICES = "/usr/local/etc/qubes-rpc"
# What Qubes' own packages install, and where this install must never put anything.
QUBES_OWN = ("/usr/bin/qvm-backup", "/usr/bin/qvm-backup-restore", "/etc/qubes-rpc/qubes.Backup",
             "/etc/qubes-rpc/qubes.Restore")  # fmt: skip
# Where a real install would write: a DESTDIR install must not touch any of them on this machine.
REAL_TARGETS = (f"{PREFIX}/bin/qvm-backup", f"{PREFIX}/bin/qvm-backup-restore", f"{PREFIX}/bin/qvm-backup-prune",
                LIB, f"{SERVICES}/qubes.Backup",
                f"{SERVICES}/qubes.Restore", "/etc/qubes/policy.d/50-qubes-backup.policy")  # fmt: skip

QUBES_HEADER = (
    b"version=4\nencrypted=True\ncompressed=True\ncompression-filter=gzip\nhmac-algorithm=scrypt\n"
    b"backup-id=20240102T030405-1234\n"
)  # as Qubes' qubesadmin.backup BackupHeader.save writes it


def make(target: str, destdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "-C", str(REPO), target, f"DESTDIR={destdir}", f"INSTALL_PYTHON={sys.executable}",
         f"PYTHON={sys.executable}", *extra],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def at(destdir: Path, path: str) -> Path:
    return Path(f"{destdir}{path}")


def files_under(root: Path) -> set[str]:
    """Every file below ``root`` as its installed path, bytecode caches left out."""
    return {
        "/" + str(p.relative_to(root))
        for p in root.rglob("*")
        if (p.is_file() or p.is_symlink()) and "__pycache__" not in p.parts
    }


def manifest(destdir: Path, side: str) -> set[str]:
    text = at(destdir, f"{LIB}/installed-{side}.manifest").read_text()
    return {line[2:] for line in text.splitlines() if line.startswith("f ")}


def site_packages_listing() -> list[str]:
    import sysconfig

    return sorted(os.listdir(sysconfig.get_paths()["purelib"]))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUBES_", "PYTHON"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """dom0's and the backup VM's DESTDIR, each installed once for the module."""
    base = tmp_path_factory.mktemp("install")
    before = {p: os.path.lexists(p) for p in REAL_TARGETS}
    packages = site_packages_listing()
    dom0, vm = base / "dom0-root", base / "vm-root"
    for target, dest in (("install-dom0", dom0), ("install-vm", vm)):
        r = make(target, dest)
        assert r.returncode == 0, r.stderr
    assert {p: os.path.lexists(p) for p in REAL_TARGETS} == before, "an install wrote outside DESTDIR"
    assert site_packages_listing() == packages, "an install changed the build machine's Python"
    return dom0, vm


def test_layout_stays_off_qubes_own_files(installed: tuple[Path, Path]) -> None:
    dom0, vm = installed
    for dest in (dom0, vm):
        for path in QUBES_OWN:
            assert not os.path.lexists(at(dest, path)), path
    # Exactly the manifest's files (and the manifest) are there: nothing else landed anywhere in DESTDIR.
    assert files_under(dom0) == manifest(dom0, "dom0") | {f"{LIB}/installed-dom0.manifest"}
    assert files_under(vm) == manifest(vm, "vm") | {f"{LIB}/installed-vm.manifest"}
    assert {f"{PREFIX}/bin/qvm-backup", f"{PREFIX}/bin/qvm-backup-restore", f"{PREFIX}/bin/qvm-backup-prune",
            f"{LIB}/rpc-policy/qubes.Restore",
            "/etc/qubes/policy.d/50-qubes-backup.policy"} <= manifest(dom0, "dom0")  # fmt: skip
    assert {f"{SERVICES}/qubes.Backup", f"{SERVICES}/qubes.Restore"} <= manifest(vm, "vm")
    # No simulator in dom0: the installed commands reach a simulated system through its endpoints only.
    assert not [p for p in manifest(dom0, "dom0") if "qubes_backup_sim" in p or p.startswith(f"{LIB}/sim/")]
    for path in (f"{PREFIX}/bin/qvm-backup", f"{SERVICES}/qubes.Backup"):
        dest = dom0 if "bin" in path else vm
        assert os.access(at(dest, path), os.X_OK)
        assert at(dest, path).read_text().startswith(f"#!{sys.executable} -s\n")


def test_backup_and_restore_through_installed_files(tmp_path: Path, installed: tuple[Path, Path]) -> None:
    dom0, vm = installed
    src = Sim(tmp_path / "src")
    simgen.generate(src.dir, "small", seed=0, pool="file")
    (src.dom0 / "pw").write_text(PASSPHRASE + "\n")
    qvm_backup = str(at(dom0, f"{PREFIX}/bin/qvm-backup"))
    qvm_restore = str(at(dom0, f"{PREFIX}/bin/qvm-backup-restore"))
    # The backup VM runs the installed services (outside bubblewrap: the sandbox only shows it dom0's copy).
    vm_env = clean_env(QUBES_SIM=str(src.dir), QUBES_BACKUP_RPC_DIR=str(at(vm, SERVICES)), QUBES_SIM_SANDBOX="0")

    def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)

    r = run([qvm_backup, "-y", "-p", "/pw", *KDF, "-d", "backupvm", VM_BACKUPS], vm_env)
    assert r.returncode == 0, r.stderr
    (backup,) = src.vm_backups.glob("qubes-backup-*")
    r = run([qvm_restore, "-y", "-p", "/pw", "--verify-only", "-d", "backupvm", f"{VM_BACKUPS}/{backup.name}"], vm_env)
    assert r.returncode == 0, r.stderr
    assert "Backup verified" in r.stdout

    # A restore from a file in dom0 runs the agent's qubes.Restore from dom0's own install.
    fresh = make_fresh(tmp_path / "fresh", src)
    os.link(backup, fresh.dom0 / "backup.tar")
    r = run([qvm_restore, "-y", "-p", "/pw", "/backup.tar", "fedora-41", "work"], clean_env(QUBES_SIM=str(fresh.dir)))
    assert r.returncode == 0, r.stderr
    assert "Restored" in r.stdout and "work" in r.stdout
    for name in ("private.img", "firewall.xml"):
        a, b = src.qubes_root / "appvms/work" / name, fresh.qubes_root / "appvms/work" / name
        assert same_content(a, b), name
    # The installed copies are what ran (Python cached their bytecode there), not this source tree.
    assert list(at(dom0, f"{LIB}/dom0/qubes_backup_dom0/cli/__pycache__").glob("restore.*.pyc"))


FAKE_BACKUP = """#!/bin/sh
read -r args
printf '%s\\n' "$args" > "$FAKE_OUT.args"
cat > "$FAKE_OUT.data"
echo fake-backup-done
"""
FAKE_RESTORE = """#!/bin/sh
read -r args
read -r paths
echo "restore from [$args] paths [$paths]"
"""


def fake_qubes_rpc(tmp_path: Path) -> Path:
    rpc = tmp_path / "qubes-rpc"
    rpc.mkdir()
    for name, text in (("qubes.Backup", FAKE_BACKUP), ("qubes.Restore", FAKE_RESTORE)):
        (rpc / name).write_text(text)
        (rpc / name).chmod(0o755)
    return rpc


def run_service(service: Path, data: bytes, env: dict[str, str], kind: str) -> tuple[int, bytes, bytes]:
    """Run a service with ``data`` on stdin given as a pipe or (as qrexec-agent does) a socket."""
    if kind == "pipe":
        r = subprocess.run([str(service)], input=data, env=env, capture_output=True, timeout=60)
        return r.returncode, r.stdout, r.stderr
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([str(service)], stdin=theirs, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    theirs.close()

    def feed() -> None:
        ours.sendall(data)
        ours.shutdown(socket.SHUT_WR)

    writer = threading.Thread(target=feed)
    writer.start()
    out, err = proc.communicate(timeout=60)
    writer.join()
    ours.close()
    return proc.returncode, out, err


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_services_hand_qubes_requests_to_qubes_own(tmp_path: Path, installed: tuple[Path, Path], kind: str) -> None:
    _dom0, vm = installed
    rpc = fake_qubes_rpc(tmp_path)
    out = tmp_path / "out"
    env = clean_env(QUBES_AGENT_QUBES_RPC_DIR=str(rpc), FAKE_OUT=str(out))
    payload = os.urandom(3 << 20)
    # What Qubes' backup (qubesd) sends to qubes.Backup: the location line, then the tar stream.
    code, stdout, stderr = run_service(at(vm, f"{SERVICES}/qubes.Backup"), b"/media/usb\n" + payload, env, kind)
    assert code == 0, stderr
    assert stdout == b"fake-backup-done\n"
    assert (tmp_path / "out.args").read_text() == "/media/usb\n"
    assert (tmp_path / "out.data").read_bytes() == payload
    # What Qubes' qvm-backup-restore sends to qubes.Restore: the location line, then the file list.
    request = b"QBackups/qubes-backup-2024 \n backup-header backup-header.hmac\n"  # "QB", then no frame
    code, stdout, stderr = run_service(at(vm, f"{SERVICES}/qubes.Restore"), request, env, kind)
    assert code == 0, stderr
    assert stdout == b"restore from [QBackups/qubes-backup-2024] paths [backup-header backup-header.hmac]\n"
    # The installed agent did this (its bytecode cache is in the installed tree).
    assert list(at(vm, f"{LIB}/vm-agent/qubes_backup_agent/__pycache__").glob("handover.*.pyc"))


def test_hand_over_without_qubes_own_service(tmp_path: Path, installed: tuple[Path, Path]) -> None:
    _dom0, vm = installed
    (tmp_path / "empty").mkdir()
    env = clean_env(QUBES_AGENT_QUBES_RPC_DIR=str(tmp_path / "empty"))
    code, stdout, stderr = run_service(at(vm, f"{SERVICES}/qubes.Backup"), b"/media/usb\ndata", env, "pipe")
    assert code == 1 and stdout == b""
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "Qubes' own" in lines[0] and "not installed" in lines[0], stderr


def qubes_format_backup(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in (("backup-header", QUBES_HEADER), ("backup-header.hmac", b"(stdin)= 00\n"),
                           ("qubes.xml.000.enc", b"\0" * 1000)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_qubes_format_backup_to_qubes_restore_only_when_asked(tmp_path: Path, installed: tuple[Path, Path]) -> None:
    """The installed qvm-backup-restore names a Qubes-format backup with Qubes' command (exit 4) and runs Qubes'
    own tool only with --use-qubes-restore, without our -p/-y (tests/test_qubes_format_cli.py: the rest)."""
    dom0, _vm = installed
    sim = Sim(tmp_path / "sim")
    simgen.generate(sim.dir, "small", seed=0, pool="file")
    (sim.dom0 / "pw").write_text(PASSPHRASE + "\n")
    qubes_format_backup(sim.dom0 / "old.tar")
    tool = tmp_path / "qubes-qvm-backup-restore"
    tool.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/tool.args\nexit 7\n')
    tool.chmod(0o755)
    restore = str(at(dom0, f"{PREFIX}/bin/qvm-backup-restore"))
    argv = [restore, "-y", "-p", "/pw", "--skip-conflicting", "/old.tar", "work"]
    env = clean_env(QUBES_SIM=str(sim.dir), QUBES_BACKUP_QUBES_RESTORE=str(tool))
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 4, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "Qubes OS' own format (version 4" in line and "not restored" in line, line
    assert line.endswith("/usr/bin/qvm-backup-restore --skip-conflicting /old.tar work; or run this command again "
                         "with --use-qubes-restore"), line  # fmt: skip
    assert not (tmp_path / "tool.args").exists()

    r = subprocess.run([*argv, "--use-qubes-restore"], env=env, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 7, r.stderr  # Qubes' tool's own exit code
    (note,) = r.stderr.strip().splitlines()
    assert "Qubes OS' own format (version 4" in note and str(tool) in note
    assert (tmp_path / "tool.args").read_text() == "--skip-conflicting /old.tar work\n"  # never -p, -y
    assert r.stdout.strip().endswith("exit code 7")

    env["QUBES_BACKUP_QUBES_RESTORE"] = str(tmp_path / "not-installed")
    r = subprocess.run([*argv, "--use-qubes-restore"], env=env, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 4
    (line,) = r.stderr.strip().splitlines()
    assert "Qubes OS' own format" in line and "/usr/bin/qvm-backup-restore" in line, line
    assert "not installed" in line and "malformed" not in line


def test_qubes_header_recognised_strictly() -> None:
    assert header.qubes_format_version(QUBES_HEADER) == 4
    assert header.qubes_format_version(b"version=3\nencrypted=True\nhmac-algorithm=SHA512\n") == 3
    with pytest.raises(header.QubesFormatBackup) as exc:
        header.parse(QUBES_HEADER)
    assert exc.value.exit_code == 2
    for bad in (
        QUBES_HEADER.replace(b"version=4", b"version=5"),
        QUBES_HEADER + b"backup-id=again\n",  # duplicate key
        QUBES_HEADER + b"unknown-key=1\n",
        QUBES_HEADER.replace(b"hmac-algorithm=scrypt\n", b""),
        QUBES_HEADER.replace(b"gzip", b"gzip; rm -rf /"),
        QUBES_HEADER[:-1],  # no final newline
        b"encrypted=True\n" + QUBES_HEADER,  # version is not first
        b"version=4\n" * 5000,  # beyond the header bound
    ):
        assert header.qubes_format_version(bad) is None, bad
        with pytest.raises(header.VerificationError, match="malformed"):
            header.parse(bad)


def test_install_refuses_foreign_and_qubes_files(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    r = make("install-dom0", dest, "PREFIX=/usr")
    assert r.returncode != 0 and "/usr/bin/qvm-backup" in r.stderr and "Qubes" in r.stderr
    assert not dest.exists() or not files_under(dest)
    foreign = at(dest, f"{SERVICES}/qubes.Backup")
    foreign.parent.mkdir(parents=True)
    foreign.write_text("someone else's\n")
    r = make("install-vm", dest)
    assert r.returncode != 0 and "not installed by qubes-backup" in r.stderr
    assert foreign.read_text() == "someone else's\n"
    assert files_under(dest) == {f"{SERVICES}/qubes.Backup"}


def test_uninstall_removes_exactly_what_was_installed(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    other = at(dest, f"{PREFIX}/bin/another-tool")  # not ours: stays, and so does its directory
    other.parent.mkdir(parents=True)
    other.write_text("x\n")
    for target in ("install-dom0", "install-vm"):  # both sides on one machine share LIBDIR
        r = make(target, dest)
        assert r.returncode == 0, r.stderr
    r = make("install-vm", dest)  # again: replaces its own files
    assert r.returncode == 0, r.stderr
    dom0_files = manifest(dest, "dom0")
    r = subprocess.run([str(at(dest, f"{PREFIX}/bin/qvm-backup")), "--help"], capture_output=True, env=clean_env())
    assert r.returncode == 0  # ran: left bytecode caches behind in LIBDIR
    r = make("uninstall-vm", dest)
    assert r.returncode == 0, r.stderr
    assert not at(dest, SERVICES).exists()
    assert files_under(dest) == dom0_files | {f"{LIB}/installed-dom0.manifest", f"{PREFIX}/bin/another-tool"}
    r = make("uninstall-dom0", dest)
    assert r.returncode == 0, r.stderr
    left = sorted("/" + str(p.relative_to(dest)) for p in dest.rglob("*"))
    assert left == ["/usr", "/usr/local", "/usr/local/bin", "/usr/local/bin/another-tool"]
    r = make("uninstall-dom0", dest)
    assert r.returncode == 0 and "nothing to uninstall" in r.stdout
