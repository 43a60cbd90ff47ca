# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: run test install install-test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test
	cd tests/fhir_server && (npm ci --no-audit --no-fund --loglevel=error || npm install --no-audit --no-fund --loglevel=error)

run: install
	CDS_ENV=$${CDS_ENV:-dev} CDS_LOG_FORMAT=$${CDS_LOG_FORMAT:-text} HOST=$(HOST) PORT=$(PORT) $(BIN)/python -m cds

test: install-test
	$(BIN)/python -m pytest

lint: install-test
	$(BIN)/ruff check cds tests

bench: install-test  # BENCH_ARGS="--duration 2 --warmup 0.5" for a quick run
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) tests/fhir_server/node_modules .pytest_cache
