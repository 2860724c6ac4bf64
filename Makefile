# qubes-backup: everything runs from here.  `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SIM    ?= demo-sim
PREFIX ?= /usr
FUZZ_SECONDS ?= 600

.PHONY: venv test demo lint bench bench-smoke fuzz install-dom0 install-vm clean

venv: $(VENV)/.installed

$(VENV)/.installed: protocol/pyproject.toml dom0/pyproject.toml vm-agent/pyproject.toml sim/pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e protocol -e dom0 -e vm-agent -e sim -r requirements-dev.txt
	touch $@

TYPED := dom0/qubes_backup_dom0 protocol/qubes_backup_protocol vm-agent/qubes_backup_agent sim/qubes_backup_sim

test: venv
	$(BIN)/ruff check .
	$(BIN)/mypy --ignore-missing-imports $(TYPED)
	$(BIN)/pytest -q tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy --ignore-missing-imports $(TYPED)

demo: venv
	$(BIN)/python scripts/demo.py --sim $(SIM)

bench: venv
	$(BIN)/python bench/run.py

bench-smoke: venv
	$(BIN)/python bench/run.py --smoke

fuzz: venv
	$(BIN)/pip install -q atheris || { echo "atheris does not install here"; exit 1; }
	$(BIN)/python tests/fuzz/atheris_frames.py -max_total_time=$(FUZZ_SECONDS)

# On a real Qubes system: `make install-vm` in the template, `make install-dom0` in dom0.
install-vm:
	$(PYTHON) -m pip install ./protocol ./vm-agent
	install -d $(DESTDIR)/etc/qubes-rpc
	install -m 0755 rpc-policy/qubes.Backup rpc-policy/qubes.Restore $(DESTDIR)/etc/qubes-rpc/

install-dom0:
	$(PYTHON) -m pip install ./protocol ./dom0
	install -d $(DESTDIR)/etc/qubes/policy.d
	install -m 0644 rpc-policy/50-qubes-backup.policy $(DESTDIR)/etc/qubes/policy.d/

clean:
	rm -rf $(VENV) $(SIM) bench-out .pytest_cache .ruff_cache
