# The two commands that matter: `make quickstart` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: data setup setup-tpu setup-cuda check-accel-reqs tcmalloc test test-fast quickstart lint \
  format bench summary clean

setup: $(STAMP) tcmalloc

# Fashion-MNIST idx files from Debian (the machines have no internet, only package mirrors).
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
data:
	@test -d $(FASHION_MNIST_DIR) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	  else sudo apt-get update -q && sudo apt-get install -y -q dataset-fashion-mnist; fi; }

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m efficientnet.cpu_kernels || echo 'warning: CPU kernels not built; the unrolled XLA form will be used'
	touch $(STAMP)

# Accelerator installs (docs/launch.md): the runtime set of requirements.txt plus jax's TPU runtime
# or its CUDA 12/13 plugin at the same jax version; no tests, oracles or CPU kernels.
CUDA ?= 12
setup-tpu setup-cuda:
	@if [ $@ = setup-cuda ] && [ "$(CUDA)" != 12 ] && [ "$(CUDA)" != 13 ]; then echo "make \
	setup-cuda: CUDA=$(CUDA) is neither 12 nor 13; pass the CUDA major version your driver supports \
	(nvidia-smi's header), e.g. make setup-cuda CUDA=13" >&2; exit 2; fi
	@py=$(BIN)/python; test -x $$py || py=$(PY); $$py -c 'import sys; sys.exit(sys.version_info < \
	(3, 11))' || { echo "make $@: $$py is $$($$py -V 2>&1), jax 0.10.2 needs Python 3.11 or newer; \
	rerun with PY=python3.11 (or newer), after rm -r $(VENV) if it holds the old one" >&2; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-$(if $(filter setup-tpu,$@),tpu,cuda$(CUDA)).txt

# CI: the accelerator sets resolve (all pins exist and agree) without downloading the CUDA wheels.
check-accel-reqs: setup
	.ci/check-accel-requirements $(BIN)/python

# tcmalloc makes CPU training steps faster (training/allocator.py, docs/benchmarks.md); optional.
tcmalloc:
	@$(PY) -c "import ctypes.util, sys; sys.exit(ctypes.util.find_library('tcmalloc_minimal') is None)" || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q libtcmalloc-minimal4 || { apt-get update -q && apt-get install -y -q libtcmalloc-minimal4; }; \
	  else sudo apt-get install -y -q libtcmalloc-minimal4; fi; } || echo 'warning: libtcmalloc-minimal4 not installed; CPU steps use the slower system allocator'

# The tests run under tcmalloc too when it is installed (EFFICIENTNET_TCMALLOC=0: not).
TCMALLOC = $(shell $(BIN)/python -c 'from training import allocator as a; print(a.find_tcmalloc() if a.enabled() else "")')

# Two pytest workers (pytest-xdist), each taking whole files (files that share a session-wide
# run go together, the longest first: tests/conftest.py); PYTEST_WORKERS=0 runs serially.
PYTEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# Every test, the slow ones included (CI runs this); the 40 slowest are listed at the end.
test: setup
	LD_PRELOAD=$(TCMALLOC) $(BIN)/python -m pytest $(XDIST) --durations=40 $(PYTEST_ARGS)

test-fast: setup
	LD_PRELOAD=$(TCMALLOC) $(BIN)/python -m pytest $(XDIST) -m 'not slow' $(PYTEST_ARGS)

# Trains configs/quickstart.py on Fashion-MNIST (offline, CPU); the last line is the test top-1.
QUICKSTART_WORKDIR ?= workdirs/quickstart
quickstart: data setup
	$(BIN)/python train.py --config=configs/quickstart.py --workdir=$(QUICKSTART_WORKDIR)

summary: setup
	$(BIN)/python -m efficientnet.summary

# One formatter and linter for the whole tree (ruff, configured in pyproject.toml); CI runs lint.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python scripts/benchmark_model.py --model efficientnet-b0 --batch 16 --resolution 224 --torch

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
