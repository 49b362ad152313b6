# `make test` and `make quickstart` each create .venv (Python >= 3.12) when it is missing.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.11.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint quickstart venv build clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py csrc/helpers.cpp
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else "Python >= 3.12 is needed (megatron-core); set PYTHON=python3.12")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel pybind11
	# torch first, pinned to the tested release; an existing torch in the venv is left alone.
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

lint: $(STAMP)
	$(PY) -m ruff check engine tools tests

test: $(STAMP) build lint
	$(PY) -m pytest -q --durations=15 tests

quickstart: $(STAMP) build
	bash examples/quickstart.sh

clean:
	rm -rf build engine/_helpers*.so out
