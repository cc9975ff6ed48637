# polystream: `make demo` and `make test` set everything up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

# The main job on recorded data: embedded PostgreSQL (unless POLYSTREAM_DATABASE__DSN
# is set), replay server, daemon, result tables, `polystream status`.
demo: setup
	POLYSTREAM_STATE__DIR="$${POLYSTREAM_STATE__DIR:-$(CURDIR)/.state}" \
		$(BIN)/polystream demo --config config.toml

# Tests use POLYSTREAM_TEST_DSN when set (an admin DSN; each test gets a fresh
# database), else an embedded PostgreSQL (one per worker). Two workers by default
# (PYTEST_WORKERS=0 runs them in this process).
PYTEST_WORKERS ?= 2
test: setup
	$(BIN)/pytest -n $(PYTEST_WORKERS)

lint: setup
	$(BIN)/ruff check polystream tests bench
	$(BIN)/mypy

# Benchmarks (about 10 minutes): results in bench/results*.json and bench/results*.md.
# Server: POLYSTREAM_BENCH_DSN, else POLYSTREAM_TEST_DSN, else an embedded PostgreSQL.
bench: setup
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.subscriptions
	$(BIN)/python -m bench.monitor
	$(BIN)/python -m bench.recovery
	$(BIN)/python -m bench.pricing
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.scaleout
	$(BIN)/python -m bench.orders

clean:
	rm -rf $(VENV) .state .pytest_cache .mypy_cache .ruff_cache .hypothesis
