# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use,
# with exactly the versions in uv.lock (the runtime and every extra), whatever was released since.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# uv installs the lock; its own version is the one uv.lock holds (uv is in the dev extra).
UV_VERSION := $(shell sed -n '/^name = "uv"$$/{n;s/^version = "\(.*\)"$$/\1/p;}' uv.lock)
UV := $(BIN)/uv
export UV_PROJECT_ENVIRONMENT := $(VENV)
# Test workers (each runs its own PostgreSQL and S3 server, ports and directories): two more
# than the cores, since the tests spend much of their time waiting for Dagster's daemons (on 2
# cores the suite took 706 s with 2 workers, 680 s with 3, 641 and 684 s with 4).
JOBS ?= $(shell $(PYTHON) -c 'import os; print((os.cpu_count() or 1) + 2)')
# Where `make test-latest` resolves the newest releases the ranges in pyproject.toml allow.
LATEST := .venv-latest

.PHONY: install lock demo dev test test-latest test-redshift lint typecheck unit bench audit clean

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check 'uv==$(UV_VERSION)'

$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --quiet --frozen --all-extras
	$(UV) pip check --quiet
	touch $(STAMP)

install: $(STAMP)  ## create .venv with the locked versions of the project and all its extras

lock: | $(UV)  ## re-resolve uv.lock to the newest versions the ranges in pyproject.toml allow
	$(UV) lock --upgrade
	$(MAKE) install

demo: install  ## the main job on embedded defaults (embedded PostgreSQL, local S3 server)
	$(BIN)/clickstream demo

dev: install  ## the embedded stack with the Dagster UI and daemon
	$(BIN)/clickstream dev

lint: install  ## ruff (lint and format) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: install  ## the test suite alone, in parallel
	$(BIN)/pytest -n $(JOBS) --maxschedchunk 1 --durations=15

# The lint runs beside the suite (it would otherwise wait a core's worth of time for nothing);
# the suite's progress shows as it goes, the lint's output once both are done.
test: install  ## what CI runs: the lint and the suite
	@$(MAKE) --no-print-directory lint > $(VENV)/lint.log 2>&1 & lint=$$!; \
	$(MAKE) --no-print-directory unit; unit=$$?; \
	wait $$lint; linted=$$?; cat $(VENV)/lint.log; \
	[ $$unit -eq 0 ] && [ $$linted -eq 0 ]

# Not part of CI's gate: finds what the next releases of our dependencies break, before a
# newcomer does. The scratch environment ignores uv.lock; the lock is left as it is.
test-latest: install  ## the suite (and mypy) on the newest releases the ranges allow
	rm -rf $(LATEST)
	$(UV) venv --quiet --python $(BIN)/python $(LATEST)
	$(UV) pip install --quiet --python $(LATEST)/bin/python --resolution highest -e '.[dev,bench]'
	$(UV) pip check --python $(LATEST)/bin/python
	$(UV) pip list --python $(LATEST)/bin/python --format freeze > $(LATEST)/versions.txt
	@$(BIN)/python -m clickstream_pipeline_tests.lockfile diff uv.lock $(LATEST)/versions.txt
	$(LATEST)/bin/mypy
	CLICKSTREAM_TEST_UNLOCKED=1 $(LATEST)/bin/pytest -n $(JOBS) --maxschedchunk 1 -p no:cacheprovider

# Not part of CI's gate: the Redshift cases against a real cluster or Serverless workgroup
# (docs/redshift.md, "The live test", says what it needs and costs).
test-redshift: install  ## the live Redshift tests (CLICKSTREAM_TEST_REDSHIFT_URL and _BUCKET)
	@[ -n "$$CLICKSTREAM_TEST_REDSHIFT_URL" ] && [ -n "$$CLICKSTREAM_TEST_REDSHIFT_BUCKET" ] || { \
	  echo "test-redshift: set CLICKSTREAM_TEST_REDSHIFT_URL and CLICKSTREAM_TEST_REDSHIFT_BUCKET (docs/redshift.md)" >&2; exit 2; }
	$(BIN)/pytest clickstream_pipeline_tests/test_redshift.py -k live -v

bench: install  ## clickstream bench: data plane, orchestration, skew, scale; writes docs/benchmarks.md
	$(BIN)/clickstream bench
	$(BIN)/python benchmarks/bench_generate.py

# Not part of `test`: pip-audit needs a vulnerability service (PyPI's per-version JSON API or
# OSV), which CI here cannot reach (docs/reliability.md). --strict fails rather than passing when
# a dependency could not be checked. It audits the lock's pins, not whatever is installed.
audit: install  ## pip-audit of the locked dependencies against PyPI's vulnerability data
	$(UV) export --quiet --frozen --all-extras --no-emit-project --no-hashes -o $(VENV)/audit.txt
	$(UV) tool run --from 'pip-audit>=2.10,<3' pip-audit --strict --progress-spinner off \
	    --disable-pip --no-deps -r $(VENV)/audit.txt

clean:
	rm -rf $(VENV) $(LATEST) .clickstream .pytest_cache .mypy_cache .ruff_cache
