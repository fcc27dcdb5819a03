# vgate: `make run` starts a demo gateway, `make test` runs every test, `make bench` measures.
# `make run-vllm` runs it in front of real CPU vLLM workers; `make test-fast` skips those tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_KEY := vg-demo-0123456789abcdef
VLLM_VENV := .venv-vllm

.PHONY: run run-vllm vllm test test-fast lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "vgate needs Python 3.11 or newer ($(PYTHON) is older)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# Two simulated vLLM workers and the gateway on the embedded default config. The gateway
# starts once the workers listen (at most 20 s), so its first health check finds them up.
# Ctrl-C (or the gateway exiting) stops everything this started.
run: $(STAMP)
	@trap 'kill $$(jobs -p) 2>/dev/null; wait' EXIT INT TERM; \
	$(BIN)/vgate sim --port 18080 --model tiny-llama --model tiny-embed & \
	$(BIN)/vgate sim --port 18081 --model tiny-llama --model tiny-embed & \
	for _ in $$(seq 200); do \
	  (exec 3<>/dev/tcp/127.0.0.1/18080 && exec 4<>/dev/tcp/127.0.0.1/18081) 2>/dev/null && break; \
	  sleep 0.1; \
	done; \
	echo "vgate on http://127.0.0.1:8000  (demo key: $(DEMO_KEY))"; \
	echo "try: curl -s localhost:8000/v1/chat/completions -H 'Authorization: Bearer $(DEMO_KEY)' \\"; \
	echo "       -H 'Content-Type: application/json' -d '{\"model\": \"default\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'"; \
	$(BIN)/vgate serve

# Real vLLM on the CPU: deploy/vllm/install.sh makes .venv-vllm (about 1.5 min the first time,
# instant when current), build_tiny_model.py the tiny random Llama (seconds; instant when current).
vllm:
	deploy/vllm/install.sh $(VLLM_VENV)
	$(VLLM_VENV)/bin/python deploy/vllm/build_tiny_model.py .run/tiny-llama

# Two real CPU vLLM workers of the tiny chat model and one embeddings worker, started and
# watched by `vgate up` (deploy/vllm/gateway.yaml; worker logs in .run/logs/). The gateway
# listens once all three are ready (about a minute). Ctrl-C drains it and stops the workers.
run-vllm: $(STAMP) vllm
	@echo "vgate on http://127.0.0.1:8000 once its 3 vLLM workers are ready (about a minute;" \
	  "logs in .run/logs/)  (demo key: $(DEMO_KEY))"
	@echo "try: curl -s localhost:8000/v1/chat/completions -H 'Authorization: Bearer $(DEMO_KEY)' \\"
	@echo "       -H 'Content-Type: application/json' -d '{\"model\": \"default\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'"
	@exec $(BIN)/vgate up --config deploy/vllm/gateway.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Every test, the real-vLLM ones (tests/vllm, a few minutes) included: they fail, rather than
# skip, without their venv, which `vllm` installs first.
test: lint vllm
	VGATE_VLLM_TESTS=require $(BIN)/python -m pytest -q

# Everything but tests/vllm.
test-fast: lint
	VGATE_VLLM_TESTS=off $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/limits.py --json bench/results/limits-latest.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
