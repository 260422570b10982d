# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first (a no-op when done).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SHARED ?= ../shared

.PHONY: setup lock demo test test-fast test-random test-threads lint check-budget check-deploy check-gpu gpu-wheels gpu-data clean

# On x86_64 with Python 3.11 (this project's CI) setup installs the exact lock; elsewhere (a Jetson's L4T
# torch, another Python) it resolves pyproject's ranges. `make lock` refreshes the lock after a dependency change.
LOCK      := requirements-dev.lock
LOCKABLE  := $(shell test "$$(uname -m)" = x86_64 && $(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null && echo yes)
RANDOM_SEEDS ?= 1 2 3
# Test processes (pytest-xdist): the suite is single-threaded per test, so CI's 2 cores run 2 at a time.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist worksteal

$(STAMP): pyproject.toml constraints.txt $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
ifeq ($(LOCKABLE),yes)
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
else
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
endif
	touch $(STAMP)

lock: $(STAMP)
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --extra fleet -c constraints.txt \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header -o $(LOCK)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m edgecl.demo --shared $(SHARED)

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST)

# The suite must not depend on test order or thread count (issue #17): three shuffled orders, two threads.
test-random: $(STAMP)
	for seed in $(RANDOM_SEEDS); do $(PY) -m pytest -q -p no:cacheprovider -p random_order --random-order-bucket=global --random-order-seed=$$seed $(XDIST) || exit 1; done

test-threads: $(STAMP)
	EDGECL_TEST_THREADS=2 $(PY) -m pytest -q -p no:cacheprovider $(XDIST)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(XDIST)

lint: $(STAMP)
	$(VENV)/bin/ruff check edgecl tests benchmarks
	$(VENV)/bin/ruff format --check edgecl tests benchmarks

check-budget: $(STAMP)
	$(PY) -m pytest -q -m budget_integration tests/test_budget.py

check-deploy: $(STAMP)
	$(PY) -m pytest -q tests/test_deploy.py tests/test_doctor.py

# The GPU check (issue 20): `make gpu-wheels gpu-data` here (pip can download, ../shared is there), then on the
# GPU machine, without network or venv: `make check-gpu OUT=DIR` (or benchmarks/gpu_check.sh DIR), with .gpu/.
gpu-wheels: $(STAMP)
	$(PY) benchmarks/gpu_prepare.py wheels

gpu-data: $(STAMP)
	$(PY) benchmarks/gpu_prepare.py data --shared $(SHARED)

OUT ?= gpu-check-results
check-gpu:
	benchmarks/gpu_check.sh $(OUT)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
