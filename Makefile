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

.PHONY: demo test test-cuda-torch bench bench-quick nvcc-check triton-aot sdist-check asan clean

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

# The CUDA-torch stage of CI, no GPU needed: a second venv with a CUDA build of torch (and the
# triton it brings), entskip built from source by a plain `pip install --no-build-isolation .`
# (its CUDA kernels for sm_80/sm_90 against the system toolkit), then the CUDA-build checks
# (library loads, every entskip op has a CUDA kernel), the timm/torchvision tests and the
# Triton interpreter tests. There a skipped CUDA-build or timm/torchvision test fails (conftest).
VENV_CUDA := .venv-cuda
PY_CUDA := $(VENV_CUDA)/bin/python
TORCH_CUDA ?= torch==2.14.1 torchvision==0.29.1

$(VENV_CUDA)/.deps:
	$(PYTHON) -m venv $(VENV_CUDA)
	$(PY_CUDA) -m pip install -q --upgrade pip setuptools wheel
	$(PY_CUDA) -m pip install -q $(TORCH_CUDA)
	$(PY_CUDA) -m pip install -q timm numpy ninja pytest pytest-xdist hypothesis
	touch $@

# Not editable: the library goes to the venv, the CPU venv's in-place one stays.
$(VENV_CUDA)/.built: $(VENV_CUDA)/.deps $(NATIVE) $(wildcard python/entskip/*.py python/entskip/*/*.py triton_kernels/*.py)
	$(PY_CUDA) -m pip install --no-build-isolation .
	touch $@

test-cuda-torch: $(VENV_CUDA)/.built
	ENTSKIP_REQUIRE_CUDA_BUILD=1 ENTSKIP_REQUIRE_TIMM=1 $(PY_CUDA) -m pytest -q -n 2 \
	  tests/test_cuda_build.py tests/test_timm_torchvision.py tests/test_triton_kernels.py tests/test_triton_features_first.py

# The sdist builds a wheel that installs a working entskip into a fresh venv holding only torch,
# ninja, setuptools and wheel (.ci/sdist_check.sh; one native build, from the sdist alone).
sdist-check: $(VENV)/.deps
	PYTHON=$(PY) FRESH_PYTHON=$(PYTHON) TORCH="$(TORCH)" bash .ci/sdist_check.sh

# The extension built with AddressSanitizer and UndefinedBehaviorSanitizer (into build/asan;
# the normal build is not touched), and the op (BSR, dense, identity, permutation),
# robustness, hostile-layout, hardening and fuzz tests run under it. .ci/asan.sh explains
# the preloads and options.
asan: $(VENV)/.deps
	PY=$(PY) bash .ci/asan.sh

clean:
	rm -rf $(VENV) $(VENV_CUDA) build dist python/*.egg-info python/entskip/_C*.so
