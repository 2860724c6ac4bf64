"""`make packages`: the agent's .deb and .rpm and dom0's .rpm, built once per session and installed with dpkg and
rpm into scratch roots (tests/pkgroot.py: their maintainer scripts, systemd-tmpfiles and py3compile run for real).

Templates of both releases are stood in for by what the packages depend on: Qubes' own /etc/qubes-rpc/qubes.Backup
and qubes.Restore (scripts that answer as Qubes' do), and qrexec's service lookup as R4.3's qrexec-agent does it
(/run/qubes-rpc first; R4.3 ships /usr/lib/tmpfiles.d/qrexec-volatile-config.conf) or as R4.2's multiplexer, a
login shell, does it (QREXEC_SERVICE_PATH, default /usr/local/etc/qubes-rpc:/etc/qubes-rpc).  A "restart" empties
/run and runs systemd-tmpfiles as systemd-tmpfiles-setup does at boot.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import KDF, PASSPHRASE, VM_BACKUPS, Sim, assert_same_vm, make_fresh, one_error_line, share_backup
from pkgroot import ScratchRoot, missing_tools
from qubes_backup_sim import simgen

REPO = Path(__file__).resolve().parent.parent
LIB = "/usr/lib/qubes-backup"
SERVICES = ("qubes.Backup", "qubes.Restore")  # Qubes has its own of these two
AGENT_SERVICES = (*SERVICES, "qubes.RestoreParanoid")  # what the agent package links into /run/qubes-rpc
QUBES_OWNED = ("/usr/bin/qvm-backup", "/usr/bin/qvm-backup-restore", "/etc/qubes-rpc/qubes.Backup",
               "/etc/qubes-rpc/qubes.Restore")  # fmt: skip
RPM = ["rpm", "--dbpath", "/var/lib/rpm"]  # rpm on Debian keeps its database in ~/.rpmdb otherwise
DATABASES = ("/var/lib/dpkg/", "/var/lib/rpm/")

# Stand-ins for Qubes' own services (qubes-core-agent): the first line they write, then what they got.
QUBES_BACKUP = """#!/bin/sh
echo Starting Backupcopy
read -r args
echo "qubes-own-backup [$args]"
cat > /tmp/qubes-own-backup.data
"""
QUBES_RESTORE = """#!/bin/sh
echo Starting Restorecopy >&2
read -r args
read -r paths
echo "qubes-own-restore [$args] [$paths]"
"""
# R4.3's qrexec-agent finds a service itself (libqrexec find_qrexec_service): in the directories of
# QREXEC_SERVICE_PATH (its environment, else the built-in list), "NAME+" in every directory first, then "NAME"; a
# link to nothing counts as absent.  WHICH=1: print what it would run.
QREXEC_43 = """#!/bin/sh
path=${QREXEC_SERVICE_PATH-/run/qubes-rpc:/usr/local/etc/qubes-rpc:/etc/qubes-rpc}
lookup() {
    ifs=$IFS; IFS=:
    for dir in $path; do
        if [ -e "$dir/$1" ]; then IFS=$ifs; echo "$dir/$1"; return 0; fi
    done
    IFS=$ifs; return 1
}
found=$(lookup "$1+") || found=$(lookup "$1") || { echo "Service not found: $1" >&2; exit 127; }
if [ "${WHICH-}" = 1 ]; then echo "$found"; exit 0; fi
exec "$found"
"""
# R4.2's qrexec-agent runs every service through /usr/lib/qubes/qubes-rpc-multiplexer, a login shell (#!/bin/sh -l:
# /etc/profile, and so /etc/profile.d, is read first) that runs the first non-empty NAME+ or NAME it finds going
# through the directories of QREXEC_SERVICE_PATH (default /usr/local/etc/qubes-rpc:/etc/qubes-rpc).
QREXEC_42 = """#!/bin/sh -l
path=${QREXEC_SERVICE_PATH-/usr/local/etc/qubes-rpc:/etc/qubes-rpc}
ifs=$IFS; IFS=:
for dir in $path; do
    if [ -s "$dir/$1+" ]; then found=$dir/$1+; break; fi
    if [ -s "$dir/$1" ]; then found=$dir/$1; break; fi
done
IFS=$ifs
[ -n "${found-}" ] || { echo "Service not found: $1" >&2; exit 127; }
if [ "${WHICH-}" = 1 ]; then echo "$found"; exit 0; fi
exec "$found"
"""
QREXEC = {"4.3": "/usr/lib/qubes/qrexec-test-agent", "4.2": "/usr/lib/qubes/qubes-rpc-multiplexer"}
# What R4.3's qubes-core-qrexec adds with /run/qubes-rpc (a stand-in with the same name).
QREXEC_43_TMPFILES = "/usr/lib/tmpfiles.d/qrexec-volatile-config.conf"


def fail_without_tools() -> None:
    missing = missing_tools() + [t for t in ("dpkg-buildpackage", "dh", "rpmbuild") if not _which(t)]
    if missing:
        pytest.fail(f"the package tests need {', '.join(missing)}: apt-get install bubblewrap rpm debhelper "
                    "dh-python dpkg-dev (bash .ci/run installs them)", pytrace=False)  # fmt: skip


def _which(tool: str) -> bool:
    from shutil import which

    return which(tool) is not None


def load_build() -> object:
    spec = importlib.util.spec_from_file_location("qubes_backup_build", REPO / "packaging" / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = load_build()
VERSION: str = BUILD.version()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three packages, built once for the session exactly as `make packages` builds them."""
    fail_without_tools()
    out, build = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("build")
    argv = [sys.executable, str(REPO / "packaging" / "build.py"), "--dist", str(out), "--build", str(build)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return out


def package(dist: Path, kind: str) -> Path:
    return dist / BUILD.names(VERSION)[kind]  # type: ignore[attr-defined]


# -- what the packages hold --------------------------------------------------------------------------------------
def deb_files(deb: Path) -> dict[str, str]:
    """Installed path -> "MODE OWNER" of every file (not directory) in a .deb."""
    out = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True).stdout
    files = {}
    for line in out.splitlines():
        mode, owner, _size, _date, _time, name = line.split(None, 5)
        if not mode.startswith("d"):
            files[name.split(" -> ")[0].lstrip(".")] = f"{mode} {owner}"
    return files


def rpm_query(rpm: Path, *args: str) -> str:
    return subprocess.run([*RPM, "-qp", *args, str(rpm)], capture_output=True, text=True, check=True).stdout


def rpm_files(rpm: Path) -> dict[str, str]:
    out = rpm_query(rpm, "--queryformat", "[%{FILENAMES} %{FILEMODES:perms} %{FILEUSERNAME}/%{FILEGROUPNAME}\n]")
    return {n: f"{m} {o}" for n, m, o in (line.split() for line in out.splitlines()) if not m.startswith("d")}


def test_versions_agree() -> None:
    """One version everywhere: the packages' __version__ and pyproject.toml (what the file names carry)."""
    found = {}
    for rel in BUILD.VERSION_FILES:  # type: ignore[attr-defined]
        m = re.search(r'^__version__ = "(.+)"', (REPO / rel).read_text(), re.M)
        assert m, f"{rel} has no __version__"
        found[rel] = m.group(1)
    for pyproject in ("protocol", "vm-agent", "dom0"):
        m = re.search(r'^version = "(.+)"', (REPO / pyproject / "pyproject.toml").read_text(), re.M)
        assert m
        found[f"{pyproject}/pyproject.toml"] = m.group(1)
    assert set(found.values()) == {VERSION}, found
    packages = {str(p.relative_to(REPO)) for p in REPO.glob("*/qubes_backup_*/__init__.py")}
    assert packages - {"sim/qubes_backup_sim/__init__.py"} <= set(found), packages  # every shipped package


def test_make_packages_builds_the_three(dist: Path) -> None:
    assert sorted(p.name for p in dist.iterdir()) == sorted(BUILD.names(VERSION).values())  # type: ignore[attr-defined]
    assert sorted(BUILD.names(VERSION).values()) == sorted([  # type: ignore[attr-defined]
        f"qubes-backup-agent_{VERSION}_all.deb", f"qubes-backup-agent-{VERSION}-1.noarch.rpm",
        f"qubes-backup-dom0-{VERSION}-1.noarch.rpm"])  # fmt: skip
    r = subprocess.run(["make", "-n", "-C", str(REPO), "packages"], capture_output=True, text=True)
    assert r.returncode == 0 and "packaging/build.py" in r.stdout, r.stderr


def third_party_imports(files: dict[str, bytes]) -> set[str]:
    """Top-level modules the Python files import that are neither the standard library nor the project's."""
    found: set[str] = set()
    for text in files.values():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and not m.startswith("qubes_backup_")}


def packaged_python(root_files: dict[str, str], extract: Path) -> dict[str, bytes]:
    return {p: (extract / p.lstrip("/")).read_bytes() for p in root_files if p.endswith(".py") or "/bin/" in p
            or "/rpc-policy/" in p}  # fmt: skip


def extract_deb(deb: Path, into: Path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    return into


def extract_rpm(rpm: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    cpio = subprocess.run(["rpm2cpio", str(rpm)], capture_output=True, check=True).stdout
    subprocess.run(["cpio", "-idm", "--quiet"], input=cpio, cwd=into, check=True)
    return into


RPM_NAMES = {"yaml": "python3-pyyaml"}  # a module -> its Fedora package, where the names differ


@pytest.mark.parametrize("kind", ["deb", "agent-rpm"])
def test_agent_package_contents(dist: Path, tmp_path: Path, kind: str) -> None:
    pkg = package(dist, kind)
    if kind == "deb":
        files, root = deb_files(pkg), extract_deb(pkg, tmp_path / "x")
        fields = subprocess.run(["dpkg-deb", "-f", str(pkg)], capture_output=True, text=True, check=True).stdout
        assert re.search(r"^Package: qubes-backup-agent$", fields, re.M)
        assert re.search(rf"^Version: {re.escape(VERSION)}$", fields, re.M)
        assert re.search(r"^Architecture: all$", fields, re.M)

        def field(name: str) -> set[str]:
            m = re.search(rf"^{name}: (.*)$", fields, re.M)
            return {d.split()[0] for d in m.group(1).split(", ")} if m else set()

        required, recommended, suggested = field("Depends"), field("Recommends"), field("Suggests")
    else:
        files, root = rpm_files(pkg), extract_rpm(pkg, tmp_path / "x")

        def field(name: str) -> set[str]:
            return {line.split()[0] for line in rpm_query(pkg, f"--{name}").splitlines()}

        required, recommended, suggested = field("requires"), field("recommends"), field("suggests")
    ours = {p for p in files if p.startswith(f"{LIB}/")}
    # The agent, its protocol, the dom0 package's code (for qubes.RestoreParanoid) and the service entry points;
    # nothing of the sim or the tests.
    sources = ("protocol/qubes_backup_protocol", "vm-agent/qubes_backup_agent", "dom0/qubes_backup_dom0")
    expected = {f"{LIB}/{p.relative_to(REPO)}" for d in sources for p in (REPO / d).rglob("*.py")
                if "__pycache__" not in p.parts}  # fmt: skip
    expected |= {f"{LIB}/rpc-policy/{s}" for s in AGENT_SERVICES}
    assert ours == expected
    assert not [p for p in files if "qubes_backup_sim" in p or "/tests/" in p]
    assert set(files) - ours - {
        "/usr/lib/tmpfiles.d/qubes-backup-agent.conf",
        "/etc/profile.d/qubes-backup-agent.sh",
        "/usr/bin/qubes-backup-agent",
    } <= {p for p in files if p.startswith(("/usr/share/doc/", "/usr/share/python3/runtime.d/"))}
    assert files["/usr/bin/qubes-backup-agent"].startswith("-rwxr-xr-x root")
    assert not set(files) & set(QUBES_OWNED)
    for service in AGENT_SERVICES:
        assert files[f"{LIB}/rpc-policy/{service}"].startswith("-rwxr-xr-x root")
        installed = root / f"{LIB}/rpc-policy/{service}".lstrip("/")
        assert installed.read_bytes() == (REPO / "rpc-policy" / service).read_bytes()
    # Every module a VM runs comes from a dependency: the agent's (construct) required; what only
    # qubes.RestoreParanoid needs recommended; boto3 (only s3://) suggested.  (dom0's command lines, cli/, never
    # run in a VM.)
    in_vm = {p: s for p, s in packaged_python(files, root).items() if f"{LIB}/dom0/qubes_backup_dom0/cli/" not in p}
    agent = {p: s for p, s in in_vm.items() if p.startswith((f"{LIB}/vm-agent/", f"{LIB}/protocol/"))}
    assert third_party_imports(agent) - {"boto3"} == {"construct"}
    assert third_party_imports(in_vm) == {"construct", "boto3", "cryptography", "lxml", "zstandard"}
    assert {"python3", "python3-construct"} <= required
    assert {"python3-cryptography", "python3-lxml", "python3-zstandard"} <= recommended
    assert "python3-boto3" in suggested


def test_dom0_package_contents(dist: Path, tmp_path: Path) -> None:
    pkg = package(dist, "dom0-rpm")
    files, root = rpm_files(pkg), extract_rpm(pkg, tmp_path / "x")
    fields = rpm_query(pkg, "--queryformat", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}")
    assert fields == f"qubes-backup-dom0 {VERSION} 1 noarch"
    assert not set(files) & set(QUBES_OWNED)
    assert not [p for p in files if "sim" in Path(p).parts or "qubes_backup_sim" in p or "/tests/" in p]
    for name in ("qvm-backup", "qvm-backup-restore"):
        assert files[f"{LIB}/bin/{name}"].startswith("-rwxr-xr-x root")
        assert (root / f"usr/lib/qubes-backup/bin/{name}").read_text().startswith("#!/usr/bin/python3 -s\n")
    assert files["/etc/sudoers.d/qubes-backup"] == "-r--r----- root/root"
    assert (root / "etc/qubes/policy.d/50-qubes-backup.policy").read_bytes() == (
        REPO / "rpc-policy" / "50-qubes-backup.policy"
    ).read_bytes()
    # Requires: every third-party module a file of the package imports, under its Fedora name.
    required = {line.split()[0] for line in rpm_query(pkg, "--requires").splitlines()}
    imports = third_party_imports(packaged_python(files, root)) - {"boto3"}  # boto3: the agent's, s3:// only
    assert {"construct", "cryptography", "lxml", "zstandard", "yaml"} <= imports
    assert {RPM_NAMES.get(m, f"python3-{m}") for m in imports} <= required, imports
    assert "qubes-backup-agent" in rpm_query(pkg, "--conflicts")


# -- templates ---------------------------------------------------------------------------------------------------
def template(root_dir: Path, release: str) -> ScratchRoot:
    """A scratch root standing in for a Qubes template of ``release`` (what the agent package meets there)."""
    root = ScratchRoot(root_dir)
    root.write("/etc/qubes-rpc/qubes.Backup", QUBES_BACKUP, 0o755)
    root.write("/etc/qubes-rpc/qubes.Restore", QUBES_RESTORE, 0o755)
    root.write(QREXEC[release], QREXEC_43 if release == "4.3" else QREXEC_42, 0o755)
    if release == "4.3":
        root.write(QREXEC_43_TMPFILES, "# stands for qubes-core-qrexec R4.3's file\nd /run/qubes-rpc 0755 root root\n")
    r = root.run([*RPM, "--initdb"])
    assert r.returncode == 0, r.stderr
    return root


def install(root: ScratchRoot, pkg: Path) -> None:
    if pkg.suffix == ".deb":
        argv = ["dpkg", "--install", "--force-depends", root.host_path(pkg)]
    else:
        argv = [*RPM, "--install", "--nodeps", root.host_path(pkg)]
    r = root.run(argv)
    assert r.returncode == 0, r.stderr.decode()


def remove(root: ScratchRoot, pkg: Path, name: str) -> None:
    argv = ["dpkg", "--purge", name] if pkg.suffix == ".deb" else [*RPM, "--erase", name]
    r = root.run(argv)
    assert r.returncode == 0, r.stderr.decode()


def restart(root: ScratchRoot) -> None:
    """What a qube based on the template sees at boot: an empty /run, then systemd-tmpfiles-setup."""
    r = root.sh("rm -rf /run/* && systemd-tmpfiles --create --boot")
    assert r.returncode == 0, r.stderr.decode()


def which_service(root: ScratchRoot, release: str, service: str) -> str:
    """The file qrexec of ``release`` runs for ``service``."""
    r = root.run([QREXEC[release], service], env=root.env(WHICH="1"))
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode().strip()


def call(root: ScratchRoot, release: str, service: str, request: bytes) -> subprocess.CompletedProcess[bytes]:
    """Call ``service`` as qrexec of ``release`` does, with ``request`` on its stdin."""
    return root.run([QREXEC[release], service], input=request)


def resolved(root: ScratchRoot, path: str) -> str:
    r = root.run(["readlink", "-f", path])
    return r.stdout.decode().strip()


def files_outside_databases(root: ScratchRoot) -> dict[str, str]:
    return {k: v for k, v in root.files().items() if not k.startswith(DATABASES)}


@pytest.mark.parametrize("release", ["4.3", "4.2"])
@pytest.mark.parametrize("kind", ["deb", "agent-rpm"])
def test_agent_package_in_a_template(dist: Path, tmp_path: Path, kind: str, release: str) -> None:
    pkg = package(dist, kind)
    root = template(tmp_path / "template", release)
    qubes_own = {p: root.path(p).read_bytes() for p in ("/etc/qubes-rpc/qubes.Backup", "/etc/qubes-rpc/qubes.Restore")}
    before = files_outside_databases(root)
    for service in SERVICES:
        assert which_service(root, release, service) == f"/etc/qubes-rpc/{service}"

    install(root, pkg)
    installed = files_outside_databases(root)
    assert {p: root.path(p).read_bytes() for p in qubes_own} == qubes_own  # Qubes' own files untouched
    assert {k: v for k, v in installed.items() if k in before} == before
    # Bytecode compiled at install (the agent runs as the qube's user, who cannot write there).
    assert list(root.path(f"{LIB}/vm-agent/qubes_backup_agent/__pycache__").glob("handover.*.pyc"))
    # The VM's own command (cron: /usr/bin), with the system's python3: a prune of no repository, one line.
    r = root.run(["qubes-backup-agent", "prune", "--repo", "/nowhere", "--keep-last", "1"],
                 env=root.env(PATH="/usr/bin:/bin"))  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert r.stderr == b"qubes-backup-agent: error: location does not exist: /nowhere\n", r.stderr

    for boot in ("installed in the running template", "a qube based on it, after its start"):
        if boot.startswith("a qube"):
            restart(root)
        for service in AGENT_SERVICES:
            found = which_service(root, release, service)
            assert resolved(root, found) == f"{LIB}/rpc-policy/{service}", (boot, found)
        # qubes.RestoreParanoid starts with the system's python3 and its packages (a request cut short: one line).
        r = call(root, release, "qubes.RestoreParanoid", b"\n")
        assert r.returncode != 0 and b"Traceback" not in r.stderr and b"bad request" in r.stderr, r.stderr
        # A request in Qubes' own protocol still reaches Qubes' own service, unchanged, through ours.
        r = call(root, release, "qubes.Backup", b"/media/usb\n" + b"x" * 100_000)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == b"Starting Backupcopy\nqubes-own-backup [/media/usb]\n", r.stderr
        assert root.path("/tmp/qubes-own-backup.data").read_bytes() == b"x" * 100_000
        r = call(root, release, "qubes.Restore", b"/media/usb/qubes-backup-2024 \n backup-header backup-header.hmac\n")
        assert r.stdout == b"qubes-own-restore [/media/usb/qubes-backup-2024] [backup-header backup-header.hmac]\n"
        assert r.stderr.startswith(b"Starting Restorecopy\n"), r.stderr
        root.path("/tmp/qubes-own-backup.data").unlink()
        # And a request in ours gets our agent: it answers a listing request with frames ("QB" ...).
        r = call(root, release, "qubes.Backup", b"QB\x01\x01")
        assert b"Starting Backupcopy" not in r.stdout + r.stderr

    remove(root, pkg, "qubes-backup-agent")
    for boot in ("removed in the running template", "after the next start"):
        if boot.startswith("after"):
            restart(root)
        for service in SERVICES:
            assert which_service(root, release, service) == f"/etc/qubes-rpc/{service}", boot
        r = root.run([QREXEC[release], "qubes.RestoreParanoid"], env=root.env(WHICH="1"))
        assert r.returncode == 127 and b"Service not found" in r.stderr, boot
    after = files_outside_databases(root)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    assert not root.path(LIB).exists()


# -- a backup and a restore through the installed agent ---------------------------------------------------------------
SHIM = '''"""{service} of a simulated backup VM: the template's qrexec ({release}) runs it in the scratch root."""
import os
import sys

vm_root = os.environ["QUBES_AGENT_ROOT"]
env = {{k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TZ", "QREXEC_SERVICE_ARGUMENT")}}
env.update(PATH={path!r}, HOME="/home/user")
home = os.path.join(vm_root, "home", "user")
argv = {argv!r} + ["--bind", home, "/home/user", "--", {qrexec!r}, {service!r}]
os.execvpe(argv[0], argv, env)
'''


def shims(root: ScratchRoot, release: str, into: Path) -> Path:
    """QUBES_BACKUP_RPC_DIR for the simulation: each service runs the way the template's qrexec runs it, in the
    scratch root, the simulated VM's /home/user bound at /home/user; no variable of the simulation reaches it."""
    into.mkdir()
    argv = root.argv(chdir="/home/user")[:-1]  # without "--"
    for service in SERVICES:
        text = SHIM.format(service=service, release=release, path=root.env()["PATH"], argv=argv, qrexec=QREXEC[release])
        (into / service).write_text(text)
    return into


@dataclass
class Installed:
    """A backup VM's template with the agent package (its services as the simulation's QUBES_BACKUP_RPC_DIR) and
    a dom0 with the dom0 package (its commands, run with this machine's /usr/bin/python3 and its packages)."""

    template: ScratchRoot
    agent: Path  # the agent package installed in it
    rpc: Path
    dom0: ScratchRoot

    def command(self, name: str) -> list[str]:
        return [SYSTEM_PYTHON, "-s", str(self.dom0.path(f"{LIB}/bin/{name}"))]


SYSTEM_PYTHON = "/usr/bin/python3"


def system_python_has(*modules: str) -> None:
    r = subprocess.run([SYSTEM_PYTHON, "-c", f"import {', '.join(modules)}"], capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"the installed packages run with {SYSTEM_PYTHON}, which cannot import them ({r.stderr.strip()}): "
                    "apt-get install python3-construct python3-cryptography python3-lxml python3-yaml "
                    "python3-zstandard (bash .ci/run installs them)", pytrace=False)  # fmt: skip


@pytest.fixture(params=[("deb", "4.3"), ("agent-rpm", "4.2")], ids=["deb-4.3", "rpm-4.2"])
def installed(request: pytest.FixtureRequest, dist: Path, tmp_path: Path) -> Installed:
    system_python_has("construct", "cryptography", "lxml", "yaml", "zstandard")
    kind, release = request.param
    template_root = template(tmp_path / "template", release)
    template_root.path("/home/user").mkdir()
    install(template_root, package(dist, kind))
    restart(template_root)
    dom0 = dom0_root(tmp_path / "dom0")
    install(dom0, package(dist, "dom0-rpm"))
    return Installed(template_root, package(dist, kind), shims(template_root, release, tmp_path / "rpc"), dom0)


def test_backup_and_restore_through_the_installed_packages(tmp_path: Path, installed: Installed) -> None:
    """qvm-backup and qvm-backup-restore of the dom0 package against a backup VM whose template has the agent
    package: a backup, its verification and a restore into a fresh system; a restore from a dom0 file (the dom0
    package's own copy of the agent); then, once the agent package is removed from the template and the VM
    restarted, one line that says what to install, at once."""
    src = Sim(tmp_path / "src")
    simgen.generate(src.dir, "small", seed=0, pool="file")
    (src.dom0 / "pw").write_text(PASSPHRASE + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUBES_", "PYTHON"))}
    env.update(QUBES_BACKUP_RPC_DIR=str(installed.rpc), QUBES_SIM_SANDBOX="0", QUBES_BACKUP_TIMEOUT="600")

    def run(tool: str, *args: str, sim: Sim, **extra: str) -> subprocess.CompletedProcess[str]:
        """The installed command; ``extra`` changes the environment ("": unset)."""
        run_env = {k: v for k, v in {**env, "QUBES_SIM": str(sim.dir), **extra}.items() if v}
        argv = [*installed.command(tool), "-y", "-p", "/pw", *args]
        return subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)

    r = run("qvm-backup", *KDF, "-d", "backupvm", VM_BACKUPS, sim=src)
    assert r.returncode == 0, r.stderr
    (backup,) = src.vm_backups.glob("qubes-backup-*")
    fresh = make_fresh(tmp_path / "fresh", src)
    share_backup(backup, fresh)
    r = run("qvm-backup-restore", "--verify-only", "-d", "backupvm", f"{VM_BACKUPS}/{backup.name}", sim=fresh)
    assert r.returncode == 0 and "Backup verified" in r.stdout, r.stderr
    r = run(
        "qvm-backup-restore",
        "-d",
        "backupvm",
        f"{VM_BACKUPS}/{backup.name}",
        "fedora-41",
        "work",
        "--restore-devices",
        sim=fresh,
    )
    assert r.returncode == 0, r.stderr
    assert_same_vm(src, "work", fresh)
    # From a file in dom0: the dom0 package's own agent reads it (confined by bubblewrap).
    other = make_fresh(tmp_path / "other", src)
    os.link(backup, other.dom0 / "backup.tar")
    r = run(
        "qvm-backup-restore",
        "/backup.tar",
        "fedora-41",
        "work",
        "--restore-devices",
        sim=other,
        QUBES_SIM_SANDBOX="1",
        QUBES_BACKUP_RPC_DIR="",
    )
    assert r.returncode == 0, r.stderr
    assert_same_vm(src, "work", other)
    # What ran was the installed dom0 code (Python compiled it at install; no source tree on its path).
    r = subprocess.run([*installed.command("qvm-backup"), "--version"], capture_output=True, text=True, env=env)
    assert r.stdout == f"qvm-backup (qubes-backup) {VERSION} from {installed.dom0.path(LIB).resolve()}/dom0\n", r.stdout

    # The agent package removed, the backup VM restarted: Qubes' own services answer; one line, at once.
    remove(installed.template, installed.agent, "qubes-backup-agent")
    restart(installed.template)
    before = sorted(src.vm_backups.iterdir())
    r = run("qvm-backup", *KDF, "-d", "backupvm", VM_BACKUPS, sim=src)
    assert r.returncode == 1
    assert one_error_line(r.stderr) == (
        "qvm-backup: error: backupvm answered with Qubes' own qubes.Restore service, not qubes-backup's agent: "
        "install the qubes-backup-agent package in the template of backupvm, then restart backupvm (docs/INSTALL.md)"
    )
    assert sorted(src.vm_backups.iterdir()) == before


# -- dom0 --------------------------------------------------------------------------------------------------------------
QUBES_TOOL = """#!/bin/sh
echo "Qubes' own $(basename "$0")"
"""


def dom0_root(root_dir: Path) -> ScratchRoot:
    """A scratch root standing in for dom0: Qubes' own qvm-backup and qvm-backup-restore in /usr/bin."""
    root = ScratchRoot(root_dir)
    for name in ("qvm-backup", "qvm-backup-restore"):
        root.write(f"/usr/bin/{name}", QUBES_TOOL, 0o755)
    r = root.run([*RPM, "--initdb"])
    assert r.returncode == 0, r.stderr
    return root


def typed(root: ScratchRoot, command: str) -> dict[str, str]:
    """Which ``command`` runs: typed in a login shell (its PATH from /etc/profile and /etc/profile.d), and with
    sudo (sudo finds it in its secure_path); and what it says to --help."""
    out = {}
    for how, argv in (("shell", ["/bin/sh", "-l", "-c", f"command -v {command}"]),
                      ("sudo", ["sudo", "-n", "/bin/sh", "-c", f"command -v {command}"]),
                      ("sudo runs", ["sudo", "-n", command, "--version"])):  # fmt: skip
        r = root.run(argv, env=root.env(PATH="/usr/bin:/bin"))
        out[how] = r.stdout.decode().strip().splitlines()[0] if r.stdout.strip() else r.stderr.decode()
    return out


def test_dom0_package_commands_typed_and_with_sudo(dist: Path, tmp_path: Path) -> None:
    for tool in ("sudo", "visudo"):
        if not _which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            pytest.fail(f"{tool} is needed: apt-get install sudo (bash .ci/run installs it)", pytrace=False)
    pkg = package(dist, "dom0-rpm")
    root = dom0_root(tmp_path / "dom0")
    before = files_outside_databases(root)
    for name in ("qvm-backup", "qvm-backup-restore"):
        assert typed(root, name) == {"shell": f"/usr/bin/{name}", "sudo": f"/usr/bin/{name}",
                                     "sudo runs": f"Qubes' own {name}"}  # fmt: skip

    install(root, pkg)
    r = root.run(["visudo", "-c"])  # sudo's whole configuration, with ours, still parses
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("qvm-backup", "qvm-backup-restore"):
        got = typed(root, name)
        assert got["shell"] == got["sudo"] == f"{LIB}/bin/{name}", got
        assert got["sudo runs"] == f"{name} (qubes-backup) {VERSION} from {LIB}/dom0", got  # ours, by sudo
        assert root.path(f"/usr/bin/{name}").read_text() == QUBES_TOOL  # Qubes' own: untouched, still reachable
    r = root.run(["/usr/bin/qvm-backup"])
    assert r.stdout == b"Qubes' own qvm-backup\n"

    remove(root, pkg, "qubes-backup-dom0")
    for name in ("qvm-backup", "qvm-backup-restore"):
        assert typed(root, name) == {"shell": f"/usr/bin/{name}", "sudo": f"/usr/bin/{name}",
                                     "sudo runs": f"Qubes' own {name}"}  # fmt: skip
    after = files_outside_databases(root)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    assert not root.path(LIB).exists()
