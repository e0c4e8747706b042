# Rebond: two commands on a fresh Debian 12 machine with Python 3.11.
#   make demo   install into .venv and start Rebond on its embedded SQLite store
#   make test   install everything the tests need (PostgreSQL included) and run every test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080
DB ?= sqlite:///var/rebond.db

.PHONY: demo test test-quick system-deps bench lint

$(BIN)/rebond: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Debian packages the tests use; installed only when missing (needs root, as on CI).
system-deps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "installing postgresql-15"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null; \
	fi

demo: $(BIN)/rebond
	@echo "Rebond FHIR API: http://127.0.0.1:$(PORT)/fhir   (health: http://127.0.0.1:$(PORT)/healthz)"
	$(BIN)/rebond serve --db $(DB) --port $(PORT)

test: $(BIN)/rebond system-deps lint
	$(BIN)/python -m pytest -q

# the developer's loop: everything but the long drills
test-quick: $(BIN)/rebond
	$(BIN)/python -m pytest -q -m 'not slow'

lint: $(BIN)/rebond
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src

bench: $(BIN)/rebond
	$(BIN)/python bench/run_all.py
