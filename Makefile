# dermlens developer entry points. `make serve` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
CORE_VENV ?= .venv-core
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test test-postgres install lint

$(CORE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/pip install -q --upgrade pip
	$(CORE_VENV)/bin/pip install -q ".[serve]"
	touch $@

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

## serve: install the torch-free runtime and serve the web page + API on the packaged model
serve: $(CORE_VENV)/.installed
	$(CORE_VENV)/bin/dermlens serve --host $(HOST) --port $(PORT)

## test: install everything (train, serve, dev extras, Debian chromium) and run the test suite
test: $(VENV)/.installed $(CORE_VENV)/.installed
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	DERMLENS_CORE_PYTHON=$(abspath $(CORE_VENV))/bin/python $(VENV)/bin/python -m pytest -q

## test-postgres: start a local PostgreSQL server (Debian package) and run the tests with it
test-postgres:
	eval "$$(bash .ci/postgres.sh)" && CI=true $(MAKE) test

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
