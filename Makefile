# The two commands that matter: `make demo` and `make test`. Each installs what it
# needs (Debian packages when missing, a .venv with every extra) and then runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgefleet-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast test-arm lint typecheck bench fuzz deps venv clean

$(STAMP): pyproject.toml
	bash scripts/install-system-deps.sh python
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[all]'
	touch $(STAMP)

venv: $(STAMP)

deps:
	bash scripts/install-system-deps.sh all

demo: venv deps
	$(BIN)/python scripts/demo.py

lint: venv
	$(BIN)/ruff check .
	bash scripts/typecheck
	bash scripts/lint-imports

typecheck: venv
	bash scripts/typecheck

test: venv deps lint
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -n 2 -m "not slow and not arm" $(PYTEST_ARGS)

# Only the emulated arm64 devices (cross/; root). The first run builds the rootfs cache.
test-arm: venv deps
	$(BIN)/python -m pytest -n 2 --dist loadfile -m arm $(PYTEST_ARGS)

# Coverage-guided fuzzing (atheris) of every parser of outside input, FUZZ_SECONDS per
# target; crashes land in tests/fuzz/corpus/<target>/ and are replayed by `make test`.
FUZZ_SECONDS ?= 300
fuzz: venv
	$(BIN)/python scripts/fuzz --seconds $(FUZZ_SECONDS)

bench: venv deps
	$(BIN)/python scripts/bench_all.py

clean:
	rm -rf .typecheck .pytest_cache .mypy_cache .ruff_cache build *.egg-info
