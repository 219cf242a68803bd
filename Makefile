# The two commands a new user needs: `make demo` opens tunedeck on the demo workspace, `make test` runs the tests.
# Both create .venv and install everything on first use (scripts/setup.sh; llama.cpp compiles once, ~5 min on 2 cores).
VENV ?= .venv
WORKSPACE ?= workspace

.PHONY: demo test setup lint bench

demo: setup
	$(VENV)/bin/tunedeck demo $(WORKSPACE)

test: setup
	$(VENV)/bin/python -m pytest

setup:
	@bash scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
