# `make test` and `make demo` create .venv/ here and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo bench bench-store bench-ingest bench-20k bench-store-fuzz clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned for development and CI; this version is a CPU wheel on the build machines.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

LINT := $(BIN)/ruff check src tests benchmarks examples

# The whole suite, as CI runs it.
test: $(STAMP)
	$(LINT)
	$(BIN)/python -m pytest -q

# The daily loop: the lint and every test not marked slow (under 90 s on 2 cores).
test-fast: $(STAMP)
	$(LINT)
	$(BIN)/python -m pytest -q -x -m "not slow"

demo: $(STAMP)
	$(BIN)/ensemble-kernel demo

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-store: $(STAMP)
	$(BIN)/python benchmarks/store_bench.py

# FILES=2000 for a quick look; the default is 20,000 one-run files.
bench-ingest: $(STAMP)
	$(BIN)/python benchmarks/ingest_bench.py --files $(or $(FILES),20000)

# 40 files x 500 runs at CIFAR shape (about 24 GB of files, as much again for the store);
# ARGS="--files 2 --keep" for a smaller run. See benchmarks/bench_20k.py --help.
bench-20k: $(STAMP)
	$(BIN)/python benchmarks/bench_20k.py $(ARGS)

# Every file of a small store damaged every way, every reading command after each.
bench-store-fuzz: $(STAMP)
	$(BIN)/python benchmarks/store_fuzz.py

clean:
	rm -rf $(VENV) demo-output benchmarks/_data
