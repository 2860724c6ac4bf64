# qubes-backup: everything runs from here.  `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SIM    ?= demo-sim
FUZZ_SECONDS ?= 600

.PHONY: venv dev test demo lint bench bench-smoke bench-incr bench-incr-smoke profile fuzz packages install-dom0 install-vm uninstall-dom0 uninstall-vm clean

# venv: the four packages and what they import (all `make demo` needs); dev: also the test tools
# (requirements-dev.txt: pytest, pytest-xdist, hypothesis, ruff, mypy, boto3, moto) for `make test`, `make lint`.
venv: $(VENV)/.installed
dev: $(VENV)/.dev-installed

$(VENV)/.installed: protocol/pyproject.toml dom0/pyproject.toml vm-agent/pyproject.toml sim/pyproject.toml
	@echo "First run (or a changed pyproject.toml): creating $(VENV) and installing the project's Python packages from PyPI; later runs skip this."
	@$(PYTHON) -m venv $(VENV) || { echo "error: '$(PYTHON) -m venv' failed: install Python's venv module (Debian/Ubuntu: apt install python3-venv)"; exit 1; }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e protocol -e dom0 -e vm-agent -e sim
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed requirements-dev.txt
	@echo "First 'make test' or 'make lint' (or a changed requirements-dev.txt): installing the test tools into $(VENV); later runs skip this."
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

TYPED := dom0/qubes_backup_dom0 protocol/qubes_backup_protocol vm-agent/qubes_backup_agent sim/qubes_backup_sim

test: dev
	$(BIN)/ruff check .
	$(BIN)/mypy --ignore-missing-imports $(TYPED)
	$(BIN)/pytest -q -n auto tests

lint: dev
	$(BIN)/ruff check .
	$(BIN)/mypy --ignore-missing-imports $(TYPED)

demo: venv
	$(BIN)/python scripts/demo.py --sim $(SIM)

bench: dev
	$(BIN)/python bench/run.py

bench-smoke: dev
	$(BIN)/python bench/run.py --smoke

# issue 20: repository snapshots against today's full backup, restic and borg (64 GiB apparent / 20 GiB
# allocated: needs ~45 GB free disk and ~30 min); the smoke runs the same harness on a tiny system
bench-incr: dev
	$(BIN)/python bench/incr.py

bench-incr-smoke: dev
	$(BIN)/python bench/incr.py --smoke

# where the CPU goes, per process and kind of work (needs perf and root): docs/PERFORMANCE.md
profile: dev
	$(BIN)/python bench/profile.py

fuzz: dev
	$(BIN)/pip install -q atheris || { echo "atheris does not install here"; exit 1; }
	$(BIN)/python tests/fuzz/atheris_frames.py -max_total_time=$(FUZZ_SECONDS)

# The packages of a release, into dist/: qubes-backup-agent_VERSION_all.deb and qubes-backup-agent-VERSION-1.noarch.rpm
# (templates), qubes-backup-dom0-VERSION-1.noarch.rpm (dom0).  Needs rpm, debhelper, dh-python (bash .ci/run installs
# them); docs/INSTALL.md says how they go into dom0 and a template.
packages:
	$(PYTHON) packaging/build.py

# On a real Qubes system (docs/INSTALL.md): `make install-dom0` in dom0, `make install-vm` in the backup VM.
# Nothing is installed over a file of Qubes' own packages (/usr/bin/qvm-backup*, /etc/qubes-rpc/qubes.*), nothing
# goes through pip or the network, DESTDIR and PREFIX apply to every file; scripts/install.py keeps a manifest
# (LIBDIR/installed-SIDE.manifest) of what it wrote, and `make uninstall-*` removes exactly that.
PREFIX     ?= /usr/local
BINDIR     ?= $(PREFIX)/bin
LIBDIR     ?= $(PREFIX)/lib/qubes-backup
# qrexec looks for a service in /run/qubes-rpc (R4.3+, volatile), /usr/local/etc/qubes-rpc (R4.1+), then
# /etc/qubes-rpc, first match wins: QREXEC_SERVICE_PATH in qubes-core-qrexec's libqrexec/qrexec.h, used by
# find_qrexec_service() in libqrexec/exec.c (also lib/qubes-rpc-multiplexer).  Not under PREFIX on purpose.
SERVICEDIR ?= /usr/local/etc/qubes-rpc
POLICYDIR  ?= /etc/qubes/policy.d
# The interpreter the installed commands and services run with (dependencies from the system's packages).
INSTALL_PYTHON ?= /usr/bin/python3
INSTALL = $(PYTHON) scripts/install.py --destdir "$(DESTDIR)" --bindir "$(BINDIR)" --libdir "$(LIBDIR)" \
	--servicedir "$(SERVICEDIR)" --policydir "$(POLICYDIR)" --python "$(INSTALL_PYTHON)"

install-dom0:
	$(INSTALL) install dom0

install-vm:
	$(INSTALL) install vm

uninstall-dom0:
	$(INSTALL) uninstall dom0

uninstall-vm:
	$(INSTALL) uninstall vm

clean:
	rm -rf $(VENV) $(SIM) bench-out bench-out-incr .pytest_cache .ruff_cache build dist
