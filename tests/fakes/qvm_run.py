"""A fake ``qvm-run`` (installed on PATH as ``qvm-run`` by the tests): accepts exactly
``qvm-run --pass-io --no-gui --service -- VM SERVICE`` and runs the agent's real service file
(rpc-policy/SERVICE) with ``QUBES_AGENT_ROOT=$FAKE_QREXEC_VMS/VM``, as qrexec would start it in the VM.
Each invocation is appended to ``$FAKE_QREXEC_VMS/qvm-run.log``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    args = sys.argv[1:]
    vms = Path(os.environ["FAKE_QREXEC_VMS"])
    with open(vms / "qvm-run.log", "a") as f:
        f.write(json.dumps(args) + "\n")
    if len(args) != 6 or args[:4] != ["--pass-io", "--no-gui", "--service", "--"]:
        print(f"qvm-run: unexpected arguments {args}", file=sys.stderr)
        sys.exit(2)
    vm, service = args[4], args[5]
    root = vms / vm
    script = REPO / "rpc-policy" / service
    if not root.is_dir() or not script.is_file():
        print(f"qvm-run: no such VM or service: {vm} {service}", file=sys.stderr)
        sys.exit(126)
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL")}
    env.update(QUBES_AGENT_ROOT=str(root), HOME=str(root), PYTHONDONTWRITEBYTECODE="1")
    os.chdir(root)
    os.execve(sys.executable, [sys.executable, str(script)], env)


if __name__ == "__main__":
    main()
