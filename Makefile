# entskip developer entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv, install torch and the tools, and build the extension first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned: an unpinned `pip install torch` pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# triton runs the Triton kernels' CPU tests (interpreter) and their AOT compile check;
# the AOT check also runs with the GPU machines' release (TRITON_GPU, beside the venv's).
TRITON ?= triton==3.9.0
TRITON_GPU ?= triton==3.6.0
NATIVE := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*)

.PHONY: demo test bench bench-quick nvcc-check triton-aot asan clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)" "$(TRITON)" numpy ninja pybind11 pytest pytest-benchmark hypothesis matplotlib tqdm scikit-learn
	touch $@

$(VENV)/.built: $(VENV)/.deps $(NATIVE)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(VENV)/.built
	$(PY) -m entskip

test: $(VENV)/.built
	$(PY) -m pytest tests -q

# Kernel microbenchmarks against the peers (bench/README.md); --quick takes about a minute on 2 cores.
bench: $(VENV)/.built
	$(PY) -m entskip.bench

bench-quick: $(VENV)/.built
	$(PY) -m entskip.bench --quick

# Compile-only check of the CUDA sources for sm_80 and sm_90 (no GPU needed).
nvcc-check:
	bash .ci/nvcc_check.sh

# Ahead-of-time compile of every shipped Triton config for sm_80 and sm_90 (no GPU needed),
# with both triton releases: registers, spills, shared memory, wgmma; fails on a compile
# error or a spill.
$(VENV)/triton-gpu/.installed: $(VENV)/.deps
	$(PY) -m pip install -q --no-deps --target $(VENV)/triton-gpu "$(TRITON_GPU)"
	touch $@

# Each release compiles into its own cache under .venv: a fresh clone compiles every config.
triton-aot: $(VENV)/.built $(VENV)/triton-gpu/.installed
	TRITON_CACHE_DIR=$(CURDIR)/$(VENV)/triton-cache $(PY) -m entskip.triton_kernels.aot --check
	TRITON_CACHE_DIR=$(CURDIR)/$(VENV)/triton-gpu-cache PYTHONPATH=$(VENV)/triton-gpu $(PY) -m entskip.triton_kernels.aot --check

# The extension built with AddressSanitizer and UndefinedBehaviorSanitizer (into build/asan;
# the normal build is not touched), and the op, robustness, hostile-layout, hardening and
# fuzz tests run under it. .ci/asan.sh explains the preloads and options.
asan: $(VENV)/.deps
	PY=$(PY) bash .ci/asan.sh

clean:
	rm -rf $(VENV) build python/*.egg-info python/entskip/_C*.so
