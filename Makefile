# The README's commands. Each sets itself up on a fresh machine: a venv with pinned torch, then
# the extension built against it (rebuilt when csrc/ or setup.py change).
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-$(TORCH_VERSION)
BUILT := $(VENV)/.built
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml

.PHONY: demo test fuzz soak bench lint cuda-check clean

demo: $(BUILT)
	$(PY) -m gmm_allreduce.demo

test: $(BUILT)
	$(PY) -m pytest -q tests

# The long runs behind TESTING.md (CI runs shorter ones): property-based calls from a random seed,
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

# Compiles csrc/cuda/ (no link) for sm_80 and sm_90a with nvcc and the CPU wheel's headers: the
# check a GPU-less host can make of the CUDA build.
cuda-check: $(DEPS)
	$(PY) tools/cuda_compile_check.py

lint: $(DEPS)
	$(PY) -m pip install -q ruff clang-format
	$(VENV)/bin/ruff check gmm_allreduce tests tools
	$(VENV)/bin/clang-format --dry-run --Werror $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Exact pin: an open range would pull several GB of CUDA wheels.
$(DEPS): $(VENV)/bin/python
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) numpy pytest hypothesis==6.170.15 ninja "setuptools>=64" wheel matplotlib
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info gmm_allreduce/*.so
