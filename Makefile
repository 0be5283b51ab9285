# fedtune: `make demo` runs a whole federation; `make test` runs the test suite.
# Both build .venv from nothing: torch==2.13.0 first (the local CPU wheel; any other
# torch pulls GBs of CUDA wheels), then the project with its dev extra.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedtune-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test bench flwr-run clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[train,edge,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedtune simulate

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/accuracy.py
	$(BIN)/python bench/privacy.py

# `flwr run .` against Flower's managed local SuperLink, then stop that SuperLink.
flwr-run: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/flwr_run_local.sh

clean:
	rm -rf $(VENV) runs .flwr
