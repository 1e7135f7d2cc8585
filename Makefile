# One entry point for set-up and tests; CI calls `make test` (see README.md).
PY ?= python3
# transformers 5.24+ (steering's KV-cached decoding passes `cache=`) requires Python 3.11; README says so
PYTHON_MIN := 3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: setup dev test bench demo clean

# What the app, the precompute jobs and the benchmarks need (the Docker image installs only this).
setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c 'import sys; sys.exit(None if sys.version_info >= tuple(map(int, "$(PYTHON_MIN)".split("."))) else f"error: $(VENV) has Python {sys.version.split()[0]} and the project needs Python $(PYTHON_MIN) or newer (transformers 5.24, which steering needs, requires it); run make clean, then make setup PY=python$(PYTHON_MIN) (or a newer python).")'
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements.txt
	touch $(STAMP)

# The test suite's tools on top (pytest, Playwright's Python package).
dev: $(DEV_STAMP)

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(BIN)/pip install -r requirements-dev.txt
	touch $(DEV_STAMP)

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

# The explorer: set-up, then `python -m app` (builds runs/demo_bundle on the first start, prints the URL).
# Pass flags with ARGS, e.g. make demo ARGS="--port 8080".
demo: $(STAMP)
	$(BIN)/python -m app $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks sae_train

clean:
	rm -rf $(VENV)
