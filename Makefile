# iotgw: `make demo` to see it work, `make test` to run the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUM    := $(shell cksum pyproject.toml | cut -d' ' -f1)
STAMP  := $(VENV)/.installed-$(SUM)
DEV    := $(VENV)/.installed-dev-$(SUM)

.PHONY: setup setup-dev demo run test lint docs bench clean

# What running iotgw needs (the demo, `make run`): the runtime dependencies only.
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup-system.sh
	./scripts/setup-system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	rm -f $(VENV)/.installed-[0-9]*
	touch $@

# The tests, linters and benchmarks add the dev tools.
setup-dev: $(DEV)

$(DEV): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-dev-*
	touch $@

demo: setup
	$(BIN)/iotgw demo

run: setup
	$(BIN)/iotgw run

# The whole suite twice: on SQLite (the embedded default), then on PostgreSQL.
test: setup-dev
	./scripts/setup-system.sh --test
	$(BIN)/pytest
	IOTGW_TEST_DATABASE=postgresql $(BIN)/pytest

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The docs site, into site/ (open site/index.html); the tests build it with --strict too.
docs: setup-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: setup-dev
	./scripts/setup-system.sh --test
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/growth.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/cluster.py
	$(BIN)/python bench/autosave.py
	$(BIN)/python bench/api_load.py

clean:
	rm -rf $(VENV) .iotgw-demo .pytest_cache .mypy_cache .ruff_cache bench/results site build *.egg-info
