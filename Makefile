# The two set-up commands: `make run` (start the stack) and `make test` (all checks).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit integration bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/likvard up

test: $(STAMP) lint typecheck
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m "not integration"

integration: $(STAMP)
	$(BIN)/pytest -m integration

bench: $(STAMP)
	$(BIN)/python -m bench.bench_append
	$(BIN)/python -m bench.bench_relay
	$(BIN)/python -m bench.bench_projection
	$(BIN)/python -m bench.bench_replay
	$(BIN)/python -m bench.bench_ingest
	$(BIN)/python -m bench.bench_access_log

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
