# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench device-wheels clean

# CPU torch first, so pip never resolves a multi-GB CUDA build: PyTorch's CPU index (its 2.13.0+cpu outranks PyPI's
# 2.13.0), or a local wheel where pip is configured with one. --retries 0: where that index cannot be reached, pip
# moves on at once instead of backing off for a minute and a half.
CPU_TORCH_INDEX := https://download.pytorch.org/whl/cpu
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 --extra-index-url $(CPU_TORCH_INDEX) --retries 0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/stitchkit quickstart

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH)

# For developers with the GPU machine (no internet there; Python 3.12; torch, transformers, peft, accelerate, typer,
# rich, matplotlib, pyarrow, pandas already installed): wheels of what it lacks (pydantic, datasets and their small
# dependencies, ~14 MB) into .wheels/, to carry there and install before `PYTHONPATH=src python3 -m stitchkit ...`:
#   pip install -q --no-index --find-links .wheels pydantic datasets
device-wheels: $(STAMP)
	$(BIN)/pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --dest .wheels \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	  "pydantic>=2.6,<3" "datasets>=3.0,<5"
	rm -f .wheels/pyarrow-* .wheels/numpy-* .wheels/pandas-*  # large, and already there

clean:
	rm -rf $(VENV) runs .pytest_cache
