# Everything a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pin torch first, so that no other requirement pulls another torch build; which build pip takes depends on where it looks (README).
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/mintvcs demo

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider tests

lint: setup
	$(VENV)/bin/ruff check mintvcs serve kernels tests bench .ci/typecheck
	$(VENV)/bin/ruff format --check mintvcs serve kernels tests bench .ci/typecheck
	$(PY) .ci/typecheck

bench: setup
	$(PY) bench/store.py
	$(PY) bench/refs.py
	$(PY) bench/walks.py
	$(PY) bench/kernels.py
	$(PY) bench/engine.py
	$(PY) bench/serve.py

clean:
	rm -rf $(VENV) build *.egg-info
