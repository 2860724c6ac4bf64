"""Unattended runs (issue 19 item 4): whose home is dom0's home without a sudo or login user, and the nightly
systemd unit of docs/SCHEDULED-BACKUP.md run with the command line and environment systemd gives it.

systemd is not PID 1 in a container: the unit is checked with ``systemd-analyze verify`` where that works, and
its ``ExecStart`` is run as systemd runs a system service without ``User=``: as root, a fresh environment
(``PATH`` and the few variables systemd sets; no ``HOME``, ``USER``, ``LOGNAME``, ``SUDO_USER``, ``TERM``), stdin
``/dev/null``, stdout and stderr a pipe (the journal), ``Nice=`` applied.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BIN, PASSPHRASE, Sim
from qubes_backup_dom0.qubes.dom0user import find_user

DOC = Path(__file__).resolve().parent.parent / "docs" / "SCHEDULED-BACKUP.md"
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"  # systemd's default for system services
NSS_WRAPPER = next((p for p in ("/usr/lib/x86_64-linux-gnu/libnss_wrapper.so", "/usr/lib64/libnss_wrapper.so",
                                "/usr/lib/libnss_wrapper.so") if os.path.exists(p)), None)  # fmt: skip


def _block(after: str, lang: str) -> str:
    """The fenced ``lang`` block that follows the line containing ``after`` in the document."""
    text = DOC.read_text()
    start = text.index(after)
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert m is not None, f"no {lang} block after {after!r} in {DOC.name}"
    return m.group(1)


def _unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(_block(f"`/etc/systemd/system/{name}`:", "ini"))
    return unit


def systemd_env(**extra: str) -> dict[str, str]:
    """The environment of a system service without User= (systemd.exec(5), "Environment Variables in Spawned
    Processes"): PATH, LANG from the locale, INVOCATION_ID, JOURNAL_STREAM (stdout to the journal)."""
    return {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", "INVOCATION_ID": "0" * 32, "JOURNAL_STREAM": "8:12345",
            **extra}  # fmt: skip


def _passwd_group(tmp: Path, user: str, home: Path) -> dict[str, str]:
    (tmp / "passwd").write_text(f"root:x:0:0:root:/root:/bin/bash\n{user}:x:1000:1000::{home}:/bin/bash\n")
    (tmp / "group").write_text(f"root:x:0:\nwheel:x:10:{user}\nqubes:x:98:{user},other\n{user}:x:1000:\n")
    return {"LD_PRELOAD": str(NSS_WRAPPER), "NSS_WRAPPER_PASSWD": str(tmp / "passwd"),
            "NSS_WRAPPER_GROUP": str(tmp / "group")}  # fmt: skip


# ------------------------------------------------------------------------------------------------ the rule


def test_user_without_sudo_or_login_is_the_first_member_of_group_qubes() -> None:
    homes = {"alice": "/home/alice", "bob": "/srv/bob", "root": "/root"}
    groups = {"qubes": ["alice", "bob"]}

    def user(env: dict[str, str], fallback: str | None = "root") -> tuple[str, str | None, str]:
        found = find_user(env, homes.get, groups.get, fallback)
        return found.name, found.home, found.how

    assert user({}) == ("alice", "/home/alice", "group qubes")  # a systemd service: nothing set
    assert user({"USER": "root", "LOGNAME": "root"}) == ("alice", "/home/alice", "group qubes")  # su -, cron
    assert user({"SUDO_USER": "bob", "USER": "root"}) == ("bob", "/srv/bob", "SUDO_USER")  # sudo qvm-backup
    assert user({"USER": "bob"}) == ("bob", "/srv/bob", "USER")  # run as the user
    assert user({"SUDO_USER": "ghost"}) == ("alice", "/home/alice", "group qubes")  # not in passwd: not taken
    assert find_user({}, homes.get, {}.get, "root").name == "root"  # no group qubes: the uid's user


@pytest.mark.skipif(NSS_WRAPPER is None, reason="libnss-wrapper is not installed (.ci/run installs it)")
def test_real_system_finds_the_home_through_passwd_and_group(tmp_path: Path) -> None:
    """Real mode (QUBES_SIM unset), the real grp/pwd modules answering from NSS (nss_wrapper's files): the
    environment of a systemd service gives the qubes group's first member and that user's passwd home."""
    home = tmp_path / "homes" / "alice"
    code = ("from qubes_backup_dom0.qubes.system import System; s = System.from_env(); "
            "print(s.user, s.home_dir, sep='|')")  # fmt: skip
    env = systemd_env(**_passwd_group(tmp_path, "alice", home))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"alice|{home}"
    r = subprocess.run([sys.executable, "-c", code], env=env | {"SUDO_USER": "root", "USER": "root"},
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.stdout.strip() == f"alice|{home}"


# -------------------------------------------------------------------------------------------- the unit


def test_documented_units_are_valid_for_systemd(tmp_path: Path) -> None:
    service, timer = _unit("qubes-backup-nightly.service"), _unit("qubes-backup-nightly.timer")
    assert service["Service"]["Type"] == "oneshot" and "User" not in service["Service"]  # runs as root
    assert timer["Timer"]["OnCalendar"] and timer["Install"]["WantedBy"] == "timers.target"
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    units = tmp_path / "units"
    units.mkdir()
    exe = shlex.split(service["Service"]["ExecStart"])[0]
    text = _block("`/etc/systemd/system/qubes-backup-nightly.service`:", "ini")
    # The commands are checked to exist: point them at ours (qvm-backup) and at true (qvm-shutdown).
    text = text.replace(exe, str(BIN / "qvm-backup")).replace("/usr/bin/qvm-shutdown", shutil.which("true") or "")
    (units / "qubes-backup-nightly.service").write_text(text)
    (units / "qubes-backup-nightly.timer").write_text(_block("`/etc/systemd/system/qubes-backup-nightly.timer`:",
                                                             "ini"))  # fmt: skip
    argv = ["systemd-analyze", "verify", "--man=no", *(str(units / f"qubes-backup-nightly.{kind}")
                                                       for kind in ("service", "timer"))]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    # Units it depends on (qubesd.service) do not exist here; nothing else may be reported.
    problems = [line for line in r.stderr.splitlines() if "qubes-backup-nightly" in line and "qubesd" not in line]
    assert not problems, r.stderr


def test_nightly_unit_backs_up_dom0_home_of_the_qubes_user(sim: Sim) -> None:
    """The documented unit's ExecStart, with the documented profile, as systemd runs it.  dom0's user is
    ``alice`` (home /home/alice): before issue 19 the run failed with "home directory /home/root is missing"
    on a real system (the simulation then assumed /home/user)."""
    os.rename(sim.dom0 / "home/user", sim.dom0 / "home/alice")
    (sim.dom0 / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/bash\n")
    (sim.dom0 / "etc/group").write_text("root:x:0:\nqubes:x:98:alice\nalice:x:1000:\n")
    profile = _block("`/etc/qubes/backup/NAME.conf`", "yaml")
    target = re.search(r"^destination_path: (\S+)", profile, re.M)
    assert target is not None
    (sim.vm_root("backupvm") / target.group(1).lstrip("/")).mkdir(parents=True)
    (sim.vm_root("vault") / "home/user").mkdir(parents=True, exist_ok=True)
    (sim.vm_root("vault") / "home/user/.backup-passphrase.nightly").write_text(PASSPHRASE + "\n")
    # The documented profile, only faster to run: one VM and dom0's home instead of everything.
    assert re.search(r"^include: null", profile, re.M) and re.search(r"^exclude: .*untrusted", profile, re.M)
    profile = re.sub(r"^include: null", "include: [work, '@type:AdminVM']", profile, flags=re.M)
    profile = re.sub(r"^exclude: .*", "exclude: ['@tag:no-backup']", profile, flags=re.M)
    prof_dir = sim.dom0 / "etc/qubes/backup"
    prof_dir.mkdir(parents=True)
    (prof_dir / "nightly.conf").write_text(profile)
    (prof_dir / "nightly.conf").chmod(0o600)

    service = _unit("qubes-backup-nightly.service")["Service"]
    argv = shlex.split(service["ExecStart"])
    assert os.path.basename(argv[0]) == "qvm-backup", argv
    nice = int(service.get("Nice", "0"))
    r = subprocess.run([str(BIN / "qvm-backup"), *argv[1:]], env=systemd_env(QUBES_SIM=str(sim.dir)),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
                       preexec_fn=lambda: os.nice(nice))  # fmt: skip
    assert r.returncode == 0, r.stderr
    journal = (r.stderr + r.stdout).splitlines()
    assert r.stdout.splitlines()[-1].startswith("Backup written to: "), r.stdout
    assert not any("\r" in line or "\x1b" in line for line in journal), journal  # plain lines, no bar
    assert any(line.startswith("dom0 home (alice)") for line in journal), r.stderr
    list_r = sim.run("qvm-backup-restore", "--list", "-p", "/pw", "-d", "backupvm",
                     f"{target.group(1)}/{Path(r.stdout.split()[3]).name}")  # fmt: skip
    assert list_r.returncode == 0, list_r.stderr
    assert "dom0 home (alice)" in list_r.stdout
