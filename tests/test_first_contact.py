"""First contact (issue 19 item 11): `make demo` installs only what the demo needs and says so once; the demo
says whether the agent ran confined; the README names every prerequisite."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _dry_run(target: str, venv: Path) -> str:
    """What `make TARGET` would run on a first run (a venv that does not exist yet)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run(["make", "-n", "-C", str(REPO), target, f"VENV={venv}"], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_demo_installs_the_packages_but_no_test_tools(tmp_path: Path) -> None:
    demo = _dry_run("demo", tmp_path / "venv")
    assert "pip install -q -e protocol -e dom0 -e vm-agent -e sim" in demo
    assert "requirements-dev.txt" not in demo and "bin/pytest" not in demo
    assert len(re.findall(r"First run.*installing", demo)) == 1  # said once, before the install
    test = _dry_run("test", tmp_path / "venv")
    assert "pip install -q -r requirements-dev.txt" in test and "pytest -q -n auto tests" in test
    # the demo's own imports are all in the packages' dependencies, none from requirements-dev.txt
    dev = {re.split(r"[<>=\[ ]", line)[0].strip().lower() for line in (REPO / "requirements-dev.txt").read_text()
           .splitlines() if line.strip() and not line.startswith("#")}  # fmt: skip
    imported = set(re.findall(r"^\s*(?:from|import) (\w+)", (REPO / "scripts/demo.py").read_text(), re.M))
    assert not {m.lower() for m in imported} & (dev | {"moto", "boto3", "hypothesis", "pytest"})


def test_demo_says_whether_the_agent_ran_confined() -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="demo-", dir="/tmp") as tmp:  # short: qubesd's socket path is bounded
        r = subprocess.run([sys.executable, str(REPO / "scripts/demo.py"), "--sim", f"{tmp}/d", "--scale", "small",
                            "--apparent-gib", "0.5"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    expected = "ran confined by bubblewrap" if shutil.which("bwrap") else "ran UNCONFINED"
    assert f"The backup VM's agents (qubes.Backup, qubes.Restore) {expected}" in r.stdout, r.stdout
    # section 6: the repository's first snapshot of work, restored beside the current one, holds the old bytes
    assert "private volume is byte-identical to work's before the writes" in r.stdout, r.stdout


def test_readme_names_every_prerequisite() -> None:
    text = (REPO / "README.md").read_text()
    first = text[: text.index("## Using it")]
    for needed in ("python3-venv", "Python 3.11", "make", "tar", "zstd", "OpenSSL 3", "bubblewrap",
                   "openssh-server", "thin-provisioning-tools", "libnss-wrapper"):  # fmt: skip
        assert needed in first, needed
