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
SUITES := unit attention_kernel ce_kernel static_check hf distributed
BUDGET_unit             ?= 600
BUDGET_attention_kernel ?= 1200
BUDGET_ce_kernel        ?= 600
BUDGET_static_check     ?= 300
BUDGET_hf               ?= 300
BUDGET_distributed      ?= 300
OTHER_MARKERS := $(filter-out unit,$(SUITES))
empty :=
space := $(empty) $(empty)
MARK_unit := not ($(subst $(space), or ,$(OTHER_MARKERS)))

.PHONY: install test test-fast demo gpu-check bench bench-host static-table clean $(addprefix test-,$(SUITES))

$(STAMP): setup.py pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q "torch>=2.6"
	$(VPY) -m pip install -q --no-build-isolation -e ".[dev,hf]"
	touch $(STAMP)

install: $(STAMP)

test: install
	@for s in $(SUITES); do $(MAKE) --no-print-directory test-$$s || exit 1; done

# One suite: `make test-attention_kernel PYTEST_ARGS="-k gqa"`. Exit status 5 (no test
# selected, e.g. a -k that matches nothing in this suite) is not a failure.
$(addprefix test-,$(SUITES)): test-%: install
	@echo "== suite $* (budget $(BUDGET_$*) s)"
	@start=$$(date +%s); \
	timeout $(BUDGET_$*) $(VPY) -m pytest -q -m "$(or $(MARK_$*),$*)" $(PYTEST_ARGS); rc=$$?; \
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
	rm -rf build *.egg-info gpu-check-out
