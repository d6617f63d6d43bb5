# Two entry points for a fresh machine (only python3 >= 3.10 and make needed):
#   make demo   create .venv, install pinned deps, run the end-to-end demo on an embedded local Ray
#   make test   create .venv, install pinned deps, run the default test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.userfm-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/userfm demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache .hypothesis
