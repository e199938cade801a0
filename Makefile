# Every target installs what it needs into .venv first, so each works as the only command run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-faults test-unit lint typecheck bench bench-smoke bench-relay schemas services clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## make demo: the whole flow in one process, on SQLite and dramatiq's in-memory broker.
demo: $(STAMP)
	$(BIN)/accessflow demo

## make test: lint, types, then every test against real PostgreSQL, RabbitMQ and SMTP.
test: $(STAMP) services lint typecheck
	$(BIN)/python -m pytest -m "not faults"

## make test-faults: the fault suite, on private PostgreSQL and RabbitMQ instances it may kill.
test-faults: $(STAMP) services
	$(BIN)/python -m pytest -m faults -p no:logging -s tests/faults

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

services:
	bash scripts/ensure-services.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/check_imports.py

typecheck: $(STAMP)
	$(BIN)/mypy

## make bench: accessflow against the floor (no-op dramatiq actors on the same broker), in one run:
## burst, latency, CPU, transactions, statements, scaling, memory (bench/README.md). About 10-15 min.
## Options: make bench BENCH_ARGS="--requests 5000 --soak 100000"; results in bench/results/.
BENCH_ARGS ?=
bench: $(STAMP) services
	$(BIN)/python -m bench $(BENCH_ARGS)

## make bench-smoke: the same with 200 requests (about 2 min); keeps the harness working in CI.
bench-smoke: $(STAMP) services
	$(BIN)/python -m bench --smoke $(BENCH_ARGS)

## make bench-relay: the outbox relay's batched confirms against one confirm per message, same run.
bench-relay: $(STAMP) services
	$(BIN)/python -m bench.relay

## make fuzz: 10,000 hostile bodies through the real broker into real worker pools (make test sends 2,000).
.PHONY: fuzz
fuzz: $(STAMP) services
	ACCESSFLOW_FUZZ_BODIES=10000 $(BIN)/python -m pytest -s --timeout 1800 tests/e2e/test_fuzz_broker.py

schemas: $(STAMP)
	$(BIN)/python -m messages.export

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
