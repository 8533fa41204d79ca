SHELL := /bin/bash
# Two commands for a fresh machine:  make test   and   make bench  (or make demo).
# Each creates .venv, installs torch and the test/bench deps, builds the extension, runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.fusedtrain-installed
DEPS   := $(VENV)/.fusedtrain-deps
# fusedtrain/_build_spec.py: the extension's sources and flags (setup.py reads them from it)
SOURCES := $(shell find csrc fusedtrain -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h') setup.py pyproject.toml fusedtrain/_build_spec.py

.PHONY: venv install test test-native test-triton test-integration test-install bench demo check gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

# torch first (a CUDA build where pip resolves one), then the extension against that torch.
# (order-only: a venv made before this stamp existed is not rebuilt for it)
$(DEPS): | $(PY)
	$(PIP) install torch numpy ninja pytest hypothesis tqdm matplotlib torchvision
	touch $(DEPS)

$(STAMP): $(SOURCES) | $(DEPS)
	@echo "building fusedtrain._C (log: build.log)"
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --no-build-isolation -v -e . > build.log 2>&1 || { tail -n 60 build.log; exit 1; }
	@grep -h "fusedtrain setup" build.log | sort -u
	touch $(STAMP)

venv install: $(STAMP)

# Native, reference (and CUDA, where a GPU is present) tests, and the Triton kernels executed
# by the Triton interpreter on CPU tensors (TRITON_INTERPRET must be set before triton is
# imported, hence separate pytest processes). The interpreter's tests (one Python thread of numpy
# calls each) run as two interleaved halves (--shard, tests/conftest.py) beside the first run, at
# the lowest priority: they take the cycles the first run leaves idle, and never a core from under
# its OpenMP threads (at equal priority their barriers waited on descheduled threads and both
# runs slowed to a crawl); when the first run ends, the two halves have a core each. Their torch
# ops run on one thread (OMP_NUM_THREADS=1): two threads each, four on two cores, spun at barriers
# waiting for a descheduled sibling (two halves of the BCE and unscale cases side by side: 95 s
# with two threads each, 77 s with one). Without the cache plugin: the last process to end would
# overwrite the normal run's record of its failures (pytest --lf).
# Their output follows the first run's; any failing fails `make test`.
INTERP_LOG := .interp-tests
INTERP = TRITON_INTERPRET=1 OMP_NUM_THREADS=1 nice -n 19 $(PY) -m pytest -q -p no:cacheprovider tests -m triton_interp
test: $(STAMP)
	@$(INTERP) --shard 0/2 --basetemp=.pytest-interp-tmp0 > $(INTERP_LOG)0.log 2>&1 & i0=$$!; \
	$(INTERP) --shard 1/2 --basetemp=.pytest-interp-tmp1 > $(INTERP_LOG)1.log 2>&1 & i1=$$!; \
	$(PY) -m pytest -q tests; native=$$?; \
	wait $$i0; t0=$$?; wait $$i1; t1=$$?; \
	for k in 0 1; do echo "---- TRITON_INTERPRET=1 pytest -q tests -m triton_interp --shard $$k/2 ----"; \
		cat $(INTERP_LOG)$$k.log; done; \
	exit $$(( native || t0 || t1 ))

# Optional: fusedtrain inside transformers.Trainer, Accelerate and Lightning against the same runs
# with torch's pieces (tests/integration, CPU, ~30 s). The frameworks go into the venv once;
# `make test` never collects these tests.
INTEGRATIONS := $(VENV)/.fusedtrain-integrations
$(INTEGRATIONS): | $(DEPS)
	$(PIP) install transformers accelerate lightning
	touch $(INTEGRATIONS)

test-integration: $(STAMP) $(INTEGRATIONS)
	$(PY) -m pytest -q tests/integration

# The slow install tests (5-9 minutes on 2 cores; not part of `make test`): `fusedtrain build`
# compiling the extension for the running torch into a fresh cache, and `python -m build` making an
# sdist and a wheel that each install into a fresh venv and run on the native backend (CPU-only
# builds; the fresh venvs borrow this venv's torch). Marked `install` (tests/install_util.py).
test-install: $(STAMP)
	$(PIP) show build >/dev/null 2>&1 || $(PIP) install build  # (import build would find ./build/)
	FUSEDTRAIN_TEST_INSTALL=1 $(PY) -m pytest -q -m install --durations=10 tests

bench: $(STAMP)
	$(VENV)/bin/fusedtrain bench $(BENCH_ARGS)

demo: $(STAMP)
	$(VENV)/bin/fusedtrain demo $(DEMO_ARGS)

check: $(STAMP)
	$(VENV)/bin/fusedtrain check

# On a machine with a GPU: build, GPU tests, check, bench, compute-sanitizer, each a reported
# step under its own time limit (the build too: a failed build is in the report), under 8
# minutes in all; one report (gpu-check-report.md), non-zero exit on any failure.
gpu-check: $(DEPS)
	$(PY) scripts/gpu_check.py --stamp $(STAMP) $(GPU_CHECK_ARGS)

clean:
	rm -rf build $(VENV) fusedtrain/*.so *.egg-info $(INTERP_LOG)*.log .pytest-interp-tmp*
