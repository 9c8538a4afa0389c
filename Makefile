# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := requirements/dev-constraints.txt
STAMP := $(VENV)/.installed
DISTS := -e . -e plugins/dreamerv3 -e plugins/tdmpc2 -e exporters/onnx -e serving/ray

.PHONY: demo test lint typecheck docs install clean bench

$(STAMP): pyproject.toml plugins/*/pyproject.toml exporters/*/pyproject.toml serving/*/pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade -c $(CONSTRAINTS) setuptools wheel
	$(PIP) install -q -c $(CONSTRAINTS) torch
	$(PIP) install -q -c $(CONSTRAINTS) $(DISTS) \
		onnx onnxruntime onnxscript 'ray[serve]' 'tritonclient[grpc]' \
		matplotlib pytest pytest-xdist hypothesis ruff mypy \
		mkdocs mkdocs-material mkdocstrings mkdocstrings-python
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site
	$(VENV)/bin/pytest -n 2 -q --durations=15

bench: $(STAMP)
	$(PY) benchmarks/state_io.py
	$(PY) benchmarks/registry_startup.py
	$(PY) benchmarks/rollout_speed.py --device cpu

clean:
	rm -rf $(VENV) site build
