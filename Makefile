# gptfast: `make demo` (the main job) and `make test` (the whole suite) each set themselves up:
# they create .venv when missing and install the package with its dev extras.
# `make gpu-check` is for the offline GPU machines: system python3, no venv, no downloads.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

# `make test` runs the suites below one after the other. Each suite is a pytest marker (declared
# in pyproject.toml) with its own time budget in seconds (wall clock, 2 cores, cold caches); a
# suite that outgrows its budget fails instead of slowing CI down unnoticed. The "unit" suite is
# every test that carries none of the other markers (and is not a GPU test).
SUITES := unit attention_kernel ce_kernel static_check hf distributed cuda_sim cuda_sanitize
BUDGET_unit             ?= 600
BUDGET_attention_kernel ?= 1200
BUDGET_ce_kernel        ?= 600
BUDGET_static_check     ?= 300
BUDGET_hf               ?= 300
BUDGET_distributed      ?= 300
# The CUDA C++ kernels on the CPU execution layer (gptfast/cuda_sim.py); cold, the budgets include
# compiling the layer (g++ JIT; plus nvcc for the resource table) and its ASan + UBSan build.
# Measured cold on the 2-core machine: 95 s and 169 s (load ~2.5); 59 s (built earlier) and
# 532 s (load ~5).
BUDGET_cuda_sim         ?= 600
BUDGET_cuda_sanitize    ?= 900
# The sanitizer suite runs in its own process with the ASan runtime preloaded (an ASan-built
# library cannot load into a plain Python); libstdc++ too, so ASan's C++ exception hooks resolve.
ENV_cuda_sanitize = LD_PRELOAD="$(shell g++ -print-file-name=libasan.so) $(shell g++ -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0 GPTFAST_CUDA_SIM_SANITIZE=1
OTHER_MARKERS := $(filter-out unit,$(SUITES))
empty :=
space := $(empty) $(empty)
MARK_unit := not ($(subst $(space), or ,$(OTHER_MARKERS)))

.PHONY: install test test-fast demo gpu-check bench bench-host static-table clean build-cuda $(addprefix test-,$(SUITES))

# Installing never waits on nvcc (GPTFAST_SKIP_CUDA_BUILD=1): `make build-cuda` builds csrc/.
$(STAMP): setup.py pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q "torch>=2.6"
	GPTFAST_SKIP_CUDA_BUILD=1 $(VPY) -m pip install -q --no-build-isolation -e ".[dev,hf]"
	touch $(STAMP)

install: $(STAMP)

# gptfast._C from csrc/ (nvcc, sm_80 + sm_90a unless GPTFAST_CUDA_ARCHS says otherwise), rebuilt
# when csrc/ or setup.py change; without nvcc setup.py skips it with one line. BUILD_PY is the
# interpreter whose torch it builds against (gpu-check passes the system python3).
BUILD_PY   ?= $(VPY)
CUDA_STAMP := build/.cuda-built-$(notdir $(BUILD_PY))
MAX_JOBS   ?= 2
$(CUDA_STAMP): setup.py $(shell find csrc -type f 2>/dev/null)
	@mkdir -p build
	@start=$$(date +%s); \
	MAX_JOBS=$(MAX_JOBS) $(BUILD_PY) setup.py -q build_ext --inplace || exit 1; \
	echo "== build-cuda took $$(( $$(date +%s) - start )) s (MAX_JOBS=$(MAX_JOBS))"
	@touch $@

build-cuda: $(if $(filter $(VPY),$(BUILD_PY)),install) $(CUDA_STAMP)

test: install build-cuda
	@for s in $(SUITES); do $(MAKE) --no-print-directory test-$$s || exit 1; done

# One suite: `make test-attention_kernel PYTEST_ARGS="-k gqa"`. Exit status 5 (no test
# selected, e.g. a -k that matches nothing in this suite) is not a failure.
$(addprefix test-,$(SUITES)): test-%: install
	@echo "== suite $* (budget $(BUDGET_$*) s)"
	@start=$$(date +%s); \
	$(ENV_$*) timeout $(BUDGET_$*) $(VPY) -m pytest -q -m "$(or $(MARK_$*),$*)" $(PYTEST_ARGS); rc=$$?; \
	echo "== suite $* took $$(( $$(date +%s) - start )) s (budget $(BUDGET_$*) s)"; \
	if [ $$rc -eq 124 ]; then echo "== suite $* exceeded its budget"; fi; \
	[ $$rc -eq 0 ] || [ $$rc -eq 5 ]

test-fast: install
	$(VPY) -m pytest -q -m "$(MARK_unit) and not slow" $(PYTEST_ARGS)

demo: install
	$(VPY) -m gptfast.demo

bench: install
	$(VPY) -m gptfast.cli bench attention --quick

# Host cost per call against PyTorch's own ops (pytest-benchmark); writes benchmarks/results/host/.
bench-host: install
	$(VPY) -m pytest -q -s -p no:cacheprovider benchmarks/bench_host.py

# The static kernel table (benchmarks/results/static/triton-<version>.{json,md}): every Triton
# kernel compiled as the GPU runtime compiles it, for sm_90a and sm_80, without a GPU; once with
# the venv's Triton and once with the GPU machines' Triton ($(SIDE_TRITON), pip-installed into
# .cache/ and put first on PYTHONPATH; torch stays the venv's).
SIDE_TRITON ?= 3.6.0
SIDE_DIR    := .cache/triton-$(SIDE_TRITON)
static-table: install
	$(VPY) scripts/static_table.py
	test -d $(SIDE_DIR)/triton || $(VPY) -m pip install -q --no-deps --target $(SIDE_DIR) triton==$(SIDE_TRITON)
	PYTHONPATH=$(SIDE_DIR) $(VPY) scripts/static_table.py

# One call on a GPU machine (PyTorch, Triton, nvcc preinstalled, no network): installs in place
# without dependencies, builds csrc/, runs the GPU tests, a short training run, quick benchmarks.
gpu-check:
	$(PYTHON) scripts/gpu_check.py

clean:
	rm -rf build *.egg-info gpu-check-out gptfast/_C*.so
