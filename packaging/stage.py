#!/usr/bin/env python3
"""Stage the files of one package under DESTDIR exactly as they are installed (`make packages` builds with it).

    python3 packaging/stage.py agent|dom0 DESTDIR

The Debian build (packaging/debian/rules) and both rpm specs run this, so the .deb and the .rpm of the agent hold
the same files.  Layout (LIB = /usr/lib/qubes-backup, laid out like this repository, plain Python source; the
package scripts byte-compile it after install and remove the bytecode before removal):

agent (qubes-backup-agent, in a template):
  LIB/protocol/qubes_backup_protocol/, LIB/vm-agent/qubes_backup_agent/, LIB/dom0/qubes_backup_dom0/ (the parsing
  modules qubes.RestoreParanoid runs in a paranoid restore's DisposableVM)
  LIB/rpc-policy/qubes.Backup, qubes.Restore, qubes.RestoreParanoid   the services (they find LIB relative to
                                                     themselves)
  /usr/lib/tmpfiles.d/qubes-backup-agent.conf        links them into /run/qubes-rpc at every boot (R4.3 qrexec
                                                     looks there first; not a file of any Qubes package)
  /etc/profile.d/qubes-backup-agent.sh               R4.2 only: makes qrexec's multiplexer look there too
  /usr/bin/qubes-backup-agent                        the VM's own command (``prune`` for cron; not a Qubes name)
dom0 (qubes-backup-dom0):
  LIB/protocol/, LIB/dom0/qubes_backup_dom0/, LIB/vm-agent/, LIB/rpc-policy/qubes.Restore (a restore from a dom0
  file runs the agent's qubes.Restore, confined); LIB/bin/qvm-backup, qvm-backup-restore (the commands)
  /etc/profile.d/qubes-backup.sh                     LIB/bin first in PATH (Qubes' own stay in /usr/bin)
  /etc/sudoers.d/qubes-backup                        and first in sudo's secure_path
  /etc/qubes/policy.d/50-qubes-backup.policy         the qrexec policy

No simulator, no test code: neither package holds anything of sim/ or tests/.  Nothing is staged at a path a
Qubes package owns (QUBES_OWNED), which the build checks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIB = "/usr/lib/qubes-backup"
PACKAGING = REPO / "packaging"
# Files Qubes' own packages install (qubes-core-admin-client in dom0; qubes-core-agent in templates, R4.2 and R4.3).
QUBES_OWNED = frozenset(
    (
        "/usr/bin/qvm-backup",
        "/usr/bin/qvm-backup-restore",
        "/etc/qubes-rpc/qubes.Backup",
        "/etc/qubes-rpc/qubes.Restore",
    )
)
# The agent package carries the dom0 package's code too: qubes.RestoreParanoid (a paranoid restore's DisposableVM,
# based on a template with this package) runs its parsing modules there, with no privilege.
SOURCES = {
    "agent": ("protocol/qubes_backup_protocol", "vm-agent/qubes_backup_agent", "dom0/qubes_backup_dom0"),
    "dom0": ("protocol/qubes_backup_protocol", "vm-agent/qubes_backup_agent", "dom0/qubes_backup_dom0"),
}
SERVICES = {"agent": ("qubes.Backup", "qubes.Restore", "qubes.RestoreParanoid"), "dom0": ("qubes.Restore",)}
# The dom0 commands: name -> the module whose main() they run.
COMMANDS = {"qvm-backup": "qubes_backup_dom0.cli.backup", "qvm-backup-restore": "qubes_backup_dom0.cli.restore"}

# The agent package's command in the VM (cron runs it: /usr/bin, where cron's PATH looks).
AGENT_COMMANDS = {"qubes-backup-agent": "qubes_backup_agent.cli"}
AGENT_COMMAND = f'''#!/usr/bin/python3 -s
"""{{name}} of qubes-backup (package qubes-backup-agent): commands run inside the backup qube (docs/REPOSITORY.md)."""

import sys

sys.path[:0] = ["{LIB}/protocol", "{LIB}/vm-agent"]

from {{module}} import main  # noqa: E402

sys.exit(main())
'''

COMMAND = '''#!/usr/bin/python3 -s
"""{name} of qubes-backup (package qubes-backup-dom0, docs/INSTALL.md).  Qubes' own is /usr/bin/{name}."""

import os
import sys

LIB = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path[:0] = [os.path.join(LIB, "protocol"), os.path.join(LIB, "dom0")]

from {module} import main  # noqa: E402

sys.exit(main())
'''


def plan(package: str) -> dict[str, tuple[bytes, int]]:
    """Installed path -> (content, mode) of every file of ``package``."""
    if package not in SOURCES:
        raise ValueError(f"unknown package {package!r} (agent or dom0)")
    files: dict[str, tuple[bytes, int]] = {}
    for source in SOURCES[package]:
        for path in sorted((REPO / source).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[f"{LIB}/{path.relative_to(REPO)}"] = (path.read_bytes(), 0o644)
    for service in SERVICES[package]:
        files[f"{LIB}/rpc-policy/{service}"] = ((REPO / "rpc-policy" / service).read_bytes(), 0o755)
    if package == "agent":
        files["/usr/lib/tmpfiles.d/qubes-backup-agent.conf"] = (
            (PACKAGING / "agent" / "qubes-backup-agent.tmpfiles").read_bytes(),
            0o644,
        )
        files["/etc/profile.d/qubes-backup-agent.sh"] = ((PACKAGING / "agent" / "profile.sh").read_bytes(), 0o644)
        for name, module in AGENT_COMMANDS.items():
            files[f"/usr/bin/{name}"] = (AGENT_COMMAND.format(name=name, module=module).encode(), 0o755)
    else:
        for name, module in COMMANDS.items():
            files[f"{LIB}/bin/{name}"] = (COMMAND.format(name=name, module=module).encode(), 0o755)
        files["/etc/profile.d/qubes-backup.sh"] = ((PACKAGING / "dom0" / "profile.sh").read_bytes(), 0o644)
        files["/etc/sudoers.d/qubes-backup"] = ((PACKAGING / "dom0" / "sudoers").read_bytes(), 0o440)
        policy = "50-qubes-backup.policy"
        files[f"/etc/qubes/policy.d/{policy}"] = ((REPO / "rpc-policy" / policy).read_bytes(), 0o644)
    clash = QUBES_OWNED & set(files)
    if clash:
        raise ValueError(f"would install over Qubes' own {', '.join(sorted(clash))}")
    return files


def stage(package: str, destdir: Path) -> list[str]:
    """Write the files of ``package`` under ``destdir``; returns their installed paths."""
    files = plan(package)
    for path, (data, mode) in sorted(files.items()):
        target = destdir / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        os.chmod(target, mode)
    return sorted(files)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in SOURCES:
        print(f"usage: stage.py {'|'.join(SOURCES)} DESTDIR", file=sys.stderr)
        return 2
    try:
        written = stage(argv[0], Path(argv[1]))
    except (OSError, ValueError) as exc:
        print(f"stage.py: error: {exc}", file=sys.stderr)
        return 1
    print(f"staged {len(written)} files of qubes-backup-{argv[0]} under {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
