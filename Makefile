# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: run test test-compiled install install-test build lock chromium screenshots check lint bench clean vocab

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The build's own tools (pyproject's [build-system]: setuptools, and mypy for mypyc) live in the virtualenv, so
# a rebuild reuses them and mypy's cache instead of a fresh isolated environment (about 70 s instead of 105 s).
$(VENV)/.build-tools: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'], sep='\n')" > $(VENV)/build-requires.txt
	$(BIN)/python -m pip install --quiet -r $(VENV)/build-requires.txt
	touch $@

# The development install: editable and interpreted (setup.py compiles nothing without CDS_COMPILE=1), from the
# lockfile. It does not depend on the sources, so after an edit `make test` starts testing at once.
$(VENV)/.installed: $(VENV)/.build-tools setup.py pyproject.toml requirements-dev.lock
	find cds -name '*.so' -delete; rm -f cds_native__mypyc*.so cds/compiled.json  # builds before this one's layout
	$(BIN)/python -m pip install --quiet -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The compiled build (what `make run`, `make bench` and the image run): the wheel setup.py makes with CDS_COMPILE=1
# (mypyc; a type error fails it), installed into build/compiled and put first on the path. Rebuilt when a source
# changes; PYTHONSAFEPATH keeps the working directory's sources from shadowing it.
COMPILED_DIR := build/compiled
COMPILED_ENV := PYTHONSAFEPATH=1 PYTHONPATH=$(CURDIR)/$(COMPILED_DIR)
$(COMPILED_DIR)/.built: $(VENV)/.installed setup.py pyproject.toml $(shell find cds -type f -not -name '*.pyc')
	rm -rf $(COMPILED_DIR) build/wheel build/lib.* build/bdist.*  # setuptools packs whatever build/lib holds
	CDS_COMPILE=1 $(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation -w build/wheel .
	$(BIN)/python -m pip install --quiet --no-deps --target $(COMPILED_DIR) build/wheel/*.whl
	$(COMPILED_ENV) $(BIN)/python -c "import cds, sys; print('cds:', cds.BUILD); sys.exit(not cds.COMPILED)"
	touch $@

build: $(COMPILED_DIR)/.built

# Regenerate the lockfiles after a change to pyproject's dependencies (uv, from PyPI).
lock: $(BIN)/python
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --python-version 3.11 -q -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra test --python-version 3.11 -q -o requirements-dev.lock

install: $(VENV)/.installed

# The Node FHIR server the tests start, installed again only when its lockfile changes.
tests/fhir_server/node_modules/.installed: tests/fhir_server/package.json tests/fhir_server/package-lock.json
	cd tests/fhir_server && (npm ci --no-audit --no-fund --loglevel=error || npm install --no-audit --no-fund --loglevel=error)
	touch $@

install-test: $(VENV)/.installed tests/fhir_server/node_modules/.installed chromium

# The browser tests drive Debian's chromium through the PyPI playwright package (its own browser download is not
# used). Installing it needs root (or sudo) and apt; elsewhere install Chromium yourself or set CDS_CHROMIUM.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "$$CDS_CHROMIUM" ] || \
		{ SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

# Refresh the README's screenshots of the demo EHR page and the review dashboard (docs/*.png).
screenshots: install-test
	CDS_SCREENSHOTS=docs $(BIN)/python -m pytest tests/integration/test_browser.py -q -k pregnant

run: build
	$(COMPILED_ENV) CDS_ENV=$${CDS_ENV:-dev} CDS_LOG_FORMAT=$${CDS_LOG_FORMAT:-text} HOST=$(HOST) PORT=$(PORT) \
		$(BIN)/python -m cds

# The whole suite on the interpreted install (it starts at once after an edit), then the clinical suite (tests
# marked `clinical`, tests/conftest.py) again on the compiled build.
test: install-test
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-compiled

test-compiled: build install-test
	$(COMPILED_ENV) CDS_EXPECT_COMPILED=1 $(BIN)/python -m pytest -m clinical -p no:cacheprovider -q

# The layering contracts (pyproject's [tool.importlinter]), lint and type check: CI runs this before `make test`.
check: $(VENV)/.installed
	$(BIN)/lint-imports
	$(BIN)/ruff check  # the whole repository: the fixture generators too
	$(BIN)/mypy

lint: check

bench: build install-test  # BENCH_ARGS="--duration 2 --warmup 0.5" for a quick run
	$(COMPILED_ENV) $(BIN)/python bench/run.py $(BENCH_ARGS)

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
	rm -rf $(VENV) tests/fhir_server/node_modules .pytest_cache build cds_native__mypyc*.so
	find cds -name '*.so' -delete
