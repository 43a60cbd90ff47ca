# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: run test install install-test chromium screenshots check lint bench clean vocab

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The build's own tools (pyproject's [build-system]: setuptools, and mypy for mypyc) live in the virtualenv, so
# a rebuild reuses them and mypy's cache instead of a fresh isolated environment (about 70 s instead of 105 s).
$(VENV)/.build-tools: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'], sep='\n')" > $(VENV)/build-requires.txt
	$(BIN)/python -m pip install --quiet -r $(VENV)/build-requires.txt
	touch $@

# Installing also compiles the screening modules with mypyc (setup.py), so a change to cds/ reinstalls.
$(VENV)/.installed: $(VENV)/.build-tools setup.py $(wildcard cds/*.py cds/*/*.py)
	$(BIN)/python -m pip install --quiet --no-build-isolation -e '.[test]'
	$(BIN)/python -c "import cds; print('cds:', cds.BUILD)"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed chromium
	cd tests/fhir_server && (npm ci --no-audit --no-fund --loglevel=error || npm install --no-audit --no-fund --loglevel=error)

# The browser tests drive Debian's chromium through the PyPI playwright package (its own browser download is not
# used). Installing it needs root (or sudo) and apt; elsewhere install Chromium yourself or set CDS_CHROMIUM.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "$$CDS_CHROMIUM" ] || \
		{ SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

# Refresh the README's screenshots of the demo EHR page and the review dashboard (docs/*.png).
screenshots: install-test
	CDS_SCREENSHOTS=docs $(BIN)/python -m pytest tests/integration/test_browser.py -q -k pregnant

run: install
	CDS_ENV=$${CDS_ENV:-dev} CDS_LOG_FORMAT=$${CDS_LOG_FORMAT:-text} HOST=$(HOST) PORT=$(PORT) $(BIN)/python -m cds

test: install-test
	$(BIN)/python -m pytest

# The layering contracts (pyproject's [tool.importlinter]), lint and type check: CI runs this before `make test`.
check: $(VENV)/.installed
	$(BIN)/lint-imports
	$(BIN)/ruff check cds tests bench setup.py
	$(BIN)/mypy

lint: check

bench: install-test  # BENCH_ARGS="--duration 2 --warmup 0.5" for a quick run
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Regenerate the coverage audit's vocabularies (fixtures/vocabularies/README.md): the seeded synthetic population
# (about an hour of Synthea on two cores), the ICD-10 tabular lists and the VSAC expansions in a checkout of
# cqframework/ecqm-content-qicore-2024 (Q24=path), then write the reviewed decisions into cards/.
VOCAB_VENV ?= /tmp/vocab-venv
VOCAB_OUT ?= /tmp/vocab-out
Q24 ?= ../ecqm-content-qicore-2024
vocab: install
	test -x $(VOCAB_VENV)/bin/python || $(PYTHON) -m venv $(VOCAB_VENV)
	$(VOCAB_VENV)/bin/python -m pip install --quiet -r fixtures/vocabularies/requirements.txt
	PATH=$(VOCAB_VENV)/bin:$$PATH $(VOCAB_VENV)/bin/python fixtures/vocabularies/build.py --generate \
		--generated $(VOCAB_OUT) --q24 $(Q24)
	$(BIN)/python fixtures/vocabularies/apply.py

clean:
	rm -rf $(VENV) tests/fhir_server/node_modules .pytest_cache build cds/*.so cds/*/*.so cds_native__mypyc*.so
