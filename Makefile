# The README's two commands: `make pretrain` and `make test`. Both create the environment first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv test lint pytest pretrain clean

venv: $(STAMP)

# One install step for everything: torch is pinned in requirements.txt to the CPU build on local
# disk, and the project is installed with --no-deps so nothing it declares can upgrade torch.
$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

pytest: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q tests

test: lint pytest

pretrain: $(STAMP)
	$(BIN)/python -m megatron_glm.pretrain --config configs/demo.yaml

clean:
	rm -rf $(VENV) build *.egg-info
