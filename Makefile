# EvoP developer commands. `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch wheel to install first. The default is the CPU build on machines without a GPU
# (this project's CI); on a CUDA machine use e.g. `make install TORCH="torch==2.13.0"
# TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
STAMP  := $(VENV)/.evop-installed
DEMO_CONFIG ?= configs/demo.yaml
DEMO_OUT    ?= runs/demo

.PHONY: install assets test test-fast demo lint clean help

help:
	@echo "make demo   - prepare assets, then the whole pipeline (Prefect flow) on the demo model"
	@echo "make test   - the whole test suite (unit + real-model tier)"
	@echo "make test-fast - unit tests only (tiny random models, no assets)"
	@echo "make assets - prepare the offline demo model, embedder and text"
	@echo "make lint   - ruff"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[pipeline,ray,dev]"
	touch $(STAMP)

install: $(STAMP)

assets: install
	$(BIN)/evop assets

test: assets
	$(BIN)/evop assets gemma3   # the second model family of the real tier (once: cached)
	$(BIN)/python -m pytest -q --durations=15   # the slowest tests: the suite must stay under ~10 min on 2 cores

test-fast: install
	$(BIN)/python -m pytest -q -m "not real"

demo: assets
	$(BIN)/evop run --config $(DEMO_CONFIG) output_dir=$(DEMO_OUT)

lint: install
	$(BIN)/ruff check evop tests flows tasks benchmarks

clean:
	rm -rf runs .pytest_cache
