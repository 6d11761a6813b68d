# Two commands on a fresh machine (see README):
#   make demo   set up, fetch the real model, run the main job
#   make test   set up, fetch the real models, run the test suite
# Models are fetched into $(SPARSEMAP_CACHE) (default ~/.cache/sparsemap), never into the repo.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup models demo test lint bench clean

# llms-from-scratch (the GPTModel of tests/models/test_llms_from_scratch.py and benchmarks/llms_from_scratch.py)
# is installed without its dependencies: it asks for tensorflow, jupyterlab and numpy<2.1 (which conflicts with
# the pinned numpy), and the modules used need torch only. So it cannot be in the `test` extra.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps llms-from-scratch
	touch $(STAMP)

setup: $(STAMP)

models: $(STAMP)
	$(PY) -m sparsemap.models.assets all-MiniLM-L6-v2 SmolLM2-135M-Instruct gemma-3-270m-Q4_K_M

demo: models
	$(VENV)/bin/sparsemap demo

test: models lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks fuzz

bench: $(STAMP)
	$(VENV)/bin/sparsemap bench llama-1b --memory-limit none,50% --repeat 3 \
		--json benchmarks/results/bench_llama-1b.json --plot benchmarks/bench_llama-1b.png

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
