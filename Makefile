# Two commands for a new user: `make demo` (demo data -> 2-process training -> zero-shot eval) and `make test`.
# On a CUDA machine, `make gpu-check` (benchmarks/gpu_check.py; GPU_CHECK_ARGS="--device cpu" for the CPU smoke run).
VENV ?= .venv
PYTHON ?= python3
GPU_CHECK_ARGS ?=
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
NPROC ?= 2
DEMO_DATA ?= data/demo/fashion-mnist
BIN := $(VENV)/bin

.PHONY: setup demo demo-data browser test test-fast lint clean-demo gpu-check

# PYTHON names the interpreter that creates the venv. Given on the command line to `make gpu-check`, it is instead
# the environment to check as it is (e.g. a node's own CUDA-matched torch): no venv, nothing installed, the package
# imported from this checkout.
ifeq ($(origin PYTHON),command line)
GPU_CHECK_PYTHON := $(PYTHON)
GPU_CHECK_SETUP :=
else
GPU_CHECK_PYTHON := $(BIN)/python
GPU_CHECK_SETUP := setup
endif

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Fashion-MNIST: Debian's dataset-fashion-mnist package when installed, else the same files committed in
# demo_data/fashion-mnist (no network or apt needed).
demo-data: setup
	$(BIN)/contrastive-data demo --out $(DEMO_DATA)

demo: demo-data
	$(BIN)/torchrun --nproc_per_node=$(NPROC) -m contrastive.cli.train experiment=demo resume=latest
	$(BIN)/contrastive-eval zeroshot --checkpoint runs/demo --dataset-root $(DEMO_DATA) \
		--output runs/demo/zeroshot.json
	$(BIN)/contrastive-eval report --checkpoint runs/demo --dataset-root $(DEMO_DATA) --out runs/demo/report.html

# Headless Chromium for the report's render test (tests/test_report.py): Debian's package, installed when missing.
# Without root or apt this fails here with apt's own message, and the test then fails naming this target.
# Debian's headless Chromium for the report's render test. When it cannot be installed, the suite still runs and
# that one test fails with a line saying what to install.
browser:
	command -v chromium >/dev/null || command -v chromium-headless-shell >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
		echo "could not install Debian's chromium: tests/test_report.py's render test will fail until it is installed"

test: setup lint browser
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not distributed"

clean-demo:
	rm -rf runs/demo $(DEMO_DATA)

# Demo under torchrun with nccl and bf16 on every visible GPU, train-step and loss-memory benchmarks against
# open_clip: runs/gpu_check/gpu_check.json and .txt, within 8 minutes on one GPU.
gpu-check: $(GPU_CHECK_SETUP)
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_CHECK_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
