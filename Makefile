# Set-up and everyday commands. `make demo` runs the main job on the bundled
# data; `make test` runs the whole test suite. Both create .venv on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := requirements/constraints.txt

.PHONY: demo test lock clean

demo: $(VENV)/.installed
	$(BIN)/carebridge demo

# Two processes (pytest-xdist), each taking a whole module at a time; the
# slowest modules start first (tests/conftest.py). TEST_WORKERS=0 runs the
# suite in this process.
TEST_WORKERS ?= 2

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "carebridge needs Python 3.11, found " + sys.version.split()[0]'
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing Debian's python3-venv (needed to create .venv)"; \
	    apt-get update -qq && apt-get install -y -qq python3-venv; \
	  else \
	    echo "error: Python's venv module is missing; run: sudo apt-get install python3-venv" >&2; exit 1; \
	  fi; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=23.2"

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	touch $@

# Re-pin every dependency after changing pyproject.toml.
lock: $(VENV)/bin/python
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^carebridge' > $(CONSTRAINTS)

clean:
	rm -rf $(VENV) carebridge-demo .pytest_cache
