# Rebond: two commands on a fresh Debian 12 machine with Python 3.11.
#   make demo   install into .venv, generate the demo hospital group once, start Rebond on SQLite
#   make test   install everything the tests need (PostgreSQL included) and run every test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080
MLLP_PORT ?= 2575

.PHONY: demo test test-quick system-deps bench lint messages

# the C part (src/rebond/store/_walvfs.c, SQLite commits written in one call) needs gcc and SQLite's headers
# the modules compiled with mypyc (setup.py COMPILED) are rebuilt when they change: a stale build would run old code
COMPILED := $(shell grep -o '"src/rebond/[a-z0-9_/]*\.py"' setup.py | tr -d '"')
$(BIN)/rebond: pyproject.toml setup.py src/rebond/store/_walvfs.c $(COMPILED)
	@missing=""; \
	command -v gcc >/dev/null || missing="$$missing gcc"; \
	test -e /usr/include/sqlite3.h || missing="$$missing libsqlite3-dev"; \
	$(PYTHON) -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
		|| missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
			|| echo "could not install$$missing (not root?): Rebond will run without its C part, slower"; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Debian packages the tests use; installed only when missing (needs root, as on CI):
# PostgreSQL for the second engine, Patroni, etcd and HAProxy for the failover drills (tests/ha_harness.py), Orthanc as the PACS
# with its DICOMweb plugin,
# Chromium for the browser tests (Playwright drives it; no browser download),
# poppler-utils to read the downtime PDFs back (pdftotext, pdftoppm), DejaVu fonts for those PDFs
system-deps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql-15"; \
	command -v patroni >/dev/null || missing="$$missing patroni"; \
	command -v etcd >/dev/null || missing="$$missing etcd-server"; \
	test -x /usr/sbin/haproxy || missing="$$missing haproxy"; \
	test -x /usr/sbin/Orthanc || missing="$$missing orthanc"; \
	test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	command -v pdftotext >/dev/null || missing="$$missing poppler-utils"; \
	test -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf || missing="$$missing fonts-dejavu-core"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# the first time, the demo hospital group is generated into the default store
demo: $(BIN)/rebond
	@test -e var/rebond.db || $(BIN)/rebond seed --demo --db sqlite:///var/rebond.db
	@$(BIN)/rebond seed --formulary --db sqlite:///var/rebond.db
	@echo "Rebond web app: http://127.0.0.1:$(PORT)/   FHIR API: http://127.0.0.1:$(PORT)/fhir   (health: /healthz)"
	@echo "demo accounts, password rebond-demo: nurse (nurse), doctor (physician), admin (IT), lab (the first hospital's lab), pharma (its pharmacy), crisis (crisis cell)"
	@echo "downtime packs (PDF per ward, remade every 10 min): http://127.0.0.1:$(PORT)/downtime"
	@echo "HL7 v2 over MLLP on 127.0.0.1:$(MLLP_PORT); try: $(BIN)/rebond hl7 simulate --target 127.0.0.1:$(MLLP_PORT)"
	$(BIN)/rebond serve --port $(PORT) --mllp-port $(MLLP_PORT)

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

# after changing a message in the web app: extract, merge into the French catalogue, then translate the new entries
messages: $(BIN)/rebond
	$(BIN)/pybabel extract -F babel.cfg -k _ -k gettext -k N_ -k ngettext:1,2 --no-location --sort-output -o var/rebond.pot .
	$(BIN)/pybabel update -i var/rebond.pot -d src/rebond/web/locales -D rebond -l fr --no-fuzzy-matching -w 120
