# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo dev test lint typecheck unit bench audit clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project with its dev extra

demo: install  ## the main job on embedded defaults (embedded PostgreSQL, local S3 server)
	$(BIN)/clickstream demo

dev: install  ## the embedded stack with the Dagster UI and daemon
	$(BIN)/clickstream dev

lint: install  ## ruff (lint and format) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: install  ## the test suite alone
	$(BIN)/pytest

test: lint unit  ## what CI runs

bench: install  ## clickstream bench: data plane, orchestration, skew, scale; writes docs/benchmarks.md
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	$(BIN)/pip check
	$(BIN)/clickstream bench
	$(BIN)/python benchmarks/bench_generate.py

# Not part of `test`: pip-audit needs a vulnerability service (PyPI's per-version JSON API or
# OSV), which CI here cannot reach (docs/reliability.md). --strict fails rather than passing when
# a dependency could not be checked.
audit: install  ## pip-audit of the installed dependencies against PyPI's vulnerability data
	$(BIN)/pip install --quiet --disable-pip-version-check 'pip-audit>=2.10,<3'
	$(BIN)/pip-audit --strict --skip-editable --progress-spinner off

clean:
	rm -rf $(VENV) .clickstream .pytest_cache .mypy_cache .ruff_cache
