# Two commands for a fresh clone with nothing but Python 3.11:
#   make demo   a small study end to end on the synthetic set and an embedded database
#   make test   the test suite, against a real PostgreSQL and a real browser
# Each sets up what it needs: the virtual environment, the right torch build, the project.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin

# The torch build: CUDA's where a GPU is visible, else the CPU build. The project asks for a
# range, so pip installs nothing more once this is in place (an unpinned resolve on a bare
# machine would pull a multi-GB CUDA build). Override with TORCH=... and TORCH_INDEX=URL.
TORCH ?= $(shell if nvidia-smi -L >/dev/null 2>&1; then echo 'torch>=2.4'; else echo 'torch==2.13.0'; fi)
TORCH_INDEX ?=

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

$(VENV)/.project: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.project
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.project
	$(BIN)/cvae-search demo

test: $(VENV)/.dev
	bash scripts/test-services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check model search tests benchmarks

bench: $(VENV)/.dev
	$(BIN)/python -m benchmarks.run_cpu

clean:
	rm -rf $(VENV) cvae-search-demo .pytest_cache
