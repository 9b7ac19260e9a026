# Two commands for a new user: `make demo` (demo data -> 2-process training -> zero-shot eval) and `make test`.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
NPROC ?= 2
DEMO_DATA ?= data/demo/fashion-mnist
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
BIN := $(VENV)/bin

.PHONY: setup fashion-mnist demo demo-data test test-fast clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package; without it the demo data builder falls back
# to scikit-learn's digits and says so.
fashion-mnist:
	@if [ ! -f $(FASHION_MNIST_DIR)/t10k-labels-idx1-ubyte.gz ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || \
		echo "NOTE: could not install dataset-fashion-mnist; demo and tests use scikit-learn's digits"; \
	fi

demo-data: setup fashion-mnist
	$(BIN)/contrastive-data demo --out $(DEMO_DATA)

demo: demo-data
	$(BIN)/torchrun --nproc_per_node=$(NPROC) -m contrastive.cli.train experiment=demo resume=latest
	$(BIN)/contrastive-eval zeroshot --checkpoint runs/demo --dataset-root $(DEMO_DATA) \
		--output runs/demo/zeroshot.json

test: setup fashion-mnist
	$(BIN)/python -m pytest

test-fast: setup fashion-mnist
	$(BIN)/python -m pytest -m "not slow and not distributed"

clean-demo:
	rm -rf runs/demo $(DEMO_DATA)
