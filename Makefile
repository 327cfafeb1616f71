# The two set-up commands: `make demo` and `make test`. Each creates .venv from python3 and installs every
# package from the committed lock (requirements.lock, exact versions with hashes), then the project itself
# without resolving again. Done once, and again whenever the lock or pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: demo test test-fast bench lock lock-check

# The lock goes in through uv (the lock's own uv, installed first with its hashes checked): it downloads and
# unpacks in parallel, where pip unpacks one file at a time in Python. On a 2-core machine: pip 4.0 min
# (3.1 min of it CPU), uv 45 s on a fresh clone, compiling the bytecode included. uv hard-links from a cache
# inside .venv that is deleted afterwards: before compiling, the disk peaked 5.3 GB above the start, against
# pip's 7.3 GB, for a 5.2 GB .venv (5.5 GB compiled). Should uv fail, pip installs the same lock.
# --compile-bytecode: uv, unlike pip, leaves the .pyc files to the first import, and where the environment sets
# PYTHONDONTWRITEBYTECODE every process compiles torch and mlflow again: 4.4 s to import torch, against 2.2 s
# compiled. The test suite starts dozens of workbench processes: `make test` 10.8 min before, 7.7 min after.
UV_REQUIREMENT := $(VENV)/uv-requirement.txt
UV_CACHE := $(VENV)/.uv-cache

$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	awk '/^uv==/ {found = 1} found {print} found && !/\\$$/ {exit}' $(LOCK) > $(UV_REQUIREMENT)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r $(UV_REQUIREMENT)
	UV_CACHE_DIR=$(UV_CACHE) $(BIN)/uv pip install --quiet --python $(BIN)/python --require-hashes --no-deps --compile-bytecode -r $(LOCK) \
	    || $(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r $(LOCK)
	rm -rf $(UV_CACHE)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/workbench demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# For the edit-test loop: everything but the end-to-end runs (marked slow), with the property tests' quick
# profile (10 examples each, tests/conftest.py), one pytest worker per core (pytest-xdist). `make test` runs it
# all, serially, with the full profile.
test-fast: $(STAMP)
	HYPOTHESIS_PROFILE=dev $(BIN)/python -m pytest -q -m "not slow" -n auto $(PYTEST_ARGS)

# Every benchmark that runs on its own; these three score or train in a workspace named with --folder (their docstrings say how).
NEEDS_A_WORKSPACE := benchmarks/evaluation_power.py benchmarks/general_model.py benchmarks/pretrain_offline.py

bench: $(STAMP)
	for script in $(filter-out $(NEEDS_A_WORKSPACE),$(sort $(wildcard benchmarks/*.py))); do $(BIN)/python $$script || exit 1; done

# Regenerate the lock from pyproject.toml (needs uv: the lock's own copy once .venv exists, else on PATH).
# One lock for every platform and Python >= 3.11, with the hashes of every file pip may pick.
lock:
	$$(test -x $(BIN)/uv && echo $(BIN)/uv || echo uv) pip compile pyproject.toml --extra dev \
	    --universal --python-version 3.11 --generate-hashes --quiet -o $(LOCK)

# Fails with one line when pyproject.toml asks for something the lock does not hold. Needs no .venv.
lock-check:
	$(PYTHON) .ci/lock_check.py pyproject.toml $(LOCK)
