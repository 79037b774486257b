# One command each: `make test` (lint, types, tests) and `make demo`.
# Both create .venv when missing and install into it; reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-oldest test-sqla20 lint types pytest demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,cli,prometheus]'
	touch $(STAMP)

test: lint types pytest

lint: $(STAMP)
	$(BIN)/ruff check resilient_db tests bench examples migrations scripts
	$(BIN)/ruff format --check resilient_db tests bench examples migrations scripts
	$(BIN)/python scripts/async_to_sync.py --check

types: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy --strict tests/typing
	$(BIN)/mypy --strict bench scripts examples migrations

# Four pytest-xdist workers, each a test session of its own with its own embedded server (and
# Redis, standby), modules kept whole on one worker (their fixtures are set up once). Many
# tests wait on servers (restarts, failovers, timeouts) rather than compute: on a 2-core
# machine two workers left a third of the CPU idle (13.6 min of tests), four use it (10.0 min).
# Against one given server (RESILIENT_DB_TEST_URL) the tests run in one process.
# PYTEST_WORKERS=0 runs them in one process anyway.
PYTEST_WORKERS ?= $(if $(RESILIENT_DB_TEST_URL),0,4)
PYTEST_XDIST = -n $(PYTEST_WORKERS) $(if $(filter-out 0,$(PYTEST_WORKERS)),--dist loadfile)

# Bytecode is written (PYTHONDONTWRITEBYTECODE emptied: an environment that sets it would
# have every Python process the tests start (fleet workers, demos, the CLI) compile the
# package again, and each pytest worker rewrite every test module's assertions again).
pytest: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

# The suite with the lowest versions pyproject.toml allows (scripts/oldest-constraints.txt), in
# a venv of its own; not part of `make test` (it takes as long again).
OLDEST := .venv-oldest
test-oldest:
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST)/bin/python -m pip install --quiet -c scripts/oldest-constraints.txt \
		-e '.[test,cli,prometheus]'
	$(OLDEST)/bin/pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

# The suite with the newest SQLAlchemy 2.0 release (what most users run; `make test` has the
# newest 2.1, `make test-oldest` 2.0.52), the rest as `make test` installs it, in a venv of its
# own; not part of `make test` either. A newer 2.0 release: SQLA20_VERSION=2.0.x.
SQLA20 := .venv-sqla20
SQLA20_VERSION ?= 2.0.59
test-sqla20:
	test -x $(SQLA20)/bin/python || $(PYTHON) -m venv $(SQLA20)
	$(SQLA20)/bin/python -m pip install --quiet --upgrade pip
	$(SQLA20)/bin/python -m pip install --quiet -e '.[test,cli,prometheus]' \
		'sqlalchemy[asyncio]==$(SQLA20_VERSION)'
	$(SQLA20)/bin/pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/resilient-db demo

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) $(OLDEST) $(SQLA20) build *.egg-info
