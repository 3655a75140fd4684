# The two commands of the README: `make run` (the main job) and `make test` (the test suite).
# Each creates the virtual environment it needs; torch is pinned to the CPU wheel on purpose
# (an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: run test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH) numpy
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/spdy run $(ARGS)

# pytest exits non-zero (5) when it collects no test, so an empty run fails here too.
test: $(VENV)/.installed
	$(PY) -m pytest -q -ra $(ARGS)

clean:
	rm -rf $(VENV) spdy-work .pytest_cache
