# The two set-up commands: `make run` (start the stack) and `make test` (all checks).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The locks (`make lock` writes them from pyproject.toml): every package at an exact version,
# every file checked against its hash, for CPython 3.11 on Linux x86_64. requirements-dev.lock
# (the dependencies and the dev extra) is what make installs; requirements.lock (the
# dependencies alone, the same versions) and requirements-build.lock (the build backend) are
# the image's (deploy/Dockerfile).

.PHONY: run test lint typecheck unit integration bench bench-replay-3m clean lock lock-check

# Wheels only: an sdist would be built with build tools from outside the lock. Likvärd itself
# is installed without build isolation (the locked setuptools builds it) and without
# dependencies (they all come from the lock).
$(STAMP): pyproject.toml requirements-dev.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --only-binary :all: -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/likvard up

test: $(STAMP) lock-check lint typecheck
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
	$(BIN)/python -m bench.bench_replay --runs 1
	$(BIN)/python -m bench.bench_ingest
	$(BIN)/python -m bench.bench_access_log
	$(BIN)/python -m bench.bench_service
	@command -v wrk >/dev/null || { echo "bench_http needs wrk: apt-get install wrk"; exit 1; }
	$(BIN)/python -m bench.bench_http

# The replay of 3,000,000 chained events (how cost grows; several minutes on its own).
bench-replay-3m: $(STAMP)
	$(BIN)/python -m bench.bench_replay --events 3000000 --runs 1

# Do the locks still match pyproject.toml? (Offline: every dependency pinned, to a version its
# specifier allows, with hashes; nothing stale.) `make test` runs it first.
lock-check: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider tests/test_lock.py

# Re-resolve the locks after a change to pyproject.toml's dependencies. Existing pins are kept
# where they still fit; `make lock LOCK_FLAGS=--upgrade` moves everything to the newest
# versions, `make lock LOCK_FLAGS="--upgrade-package fastapi"` one package. Resolved against
# the package index alone: a machine's own pip configuration (mirrors, find-links,
# constraints) stays out of the locks. Then `make test`, and commit the three files.
PIP_COMPILE = env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT \
	PIP_CONFIG_FILE=/dev/null $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe \
	--no-strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_FLAGS)
lock: $(STAMP)
	$(PIP_COMPILE) --extra dev --output-file requirements-dev.lock pyproject.toml
	$(PIP_COMPILE) --constraint requirements-dev.lock --output-file requirements.lock pyproject.toml
	$(PIP_COMPILE) --build-deps-for wheel --only-build-deps --constraint requirements-dev.lock \
		--output-file requirements-build.lock pyproject.toml

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
