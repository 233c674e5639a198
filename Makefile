# gptfast: `make demo` (the main job) and `make test` (the whole suite) each set themselves up:
# they create .venv when missing and install the package with its dev extras.
# `make gpu-check` is for the offline GPU machines: system python3, no venv, no downloads.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Time budget (seconds) for the Triton kernel tests, which run under the slow interpreter here.
KERNEL_TEST_BUDGET ?= 900
PYTEST_ARGS ?=

.PHONY: install test test-fast test-kernels demo gpu-check bench clean

$(STAMP): setup.py pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q "torch>=2.6"
	$(VPY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Everything but the interpreted kernel tests, then the kernel tests under their own budget.
test: install
	$(VPY) -m pytest -q -m "not kernel" $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-kernels

test-fast: install
	$(VPY) -m pytest -q -m "not kernel and not slow" $(PYTEST_ARGS)

test-kernels: install
	TRITON_INTERPRET=1 timeout $(KERNEL_TEST_BUDGET) $(VPY) -m pytest -q -m "kernel" $(PYTEST_ARGS)

demo: install
	$(VPY) -m gptfast.demo

bench: install
	$(VPY) -m gptfast.cli bench attention --quick

# One call on a GPU machine (PyTorch, Triton, nvcc preinstalled, no network): installs in place
# without dependencies, builds csrc/, runs the GPU tests, a short training run, quick benchmarks.
gpu-check:
	$(PYTHON) scripts/gpu_check.py

clean:
	rm -rf build *.egg-info gpu-check-out
