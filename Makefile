# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first (a no-op when done).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SHARED ?= ../shared

.PHONY: setup demo test test-fast lint check-budget check-deploy clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m edgecl.demo --shared $(SHARED)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check edgecl tests benchmarks
	$(VENV)/bin/ruff format --check edgecl tests benchmarks

check-budget: $(STAMP)
	$(PY) -m pytest -q -m budget_integration tests/test_budget.py

check-deploy: $(STAMP)
	$(PY) -m pytest -q tests/test_deploy.py tests/test_doctor.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
