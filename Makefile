# vgate: `make run` starts a demo gateway, `make test` runs every test, `make bench` measures.
# `make run-vllm` runs it in front of real CPU vLLM workers; `make test-fast` skips those tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_KEY := vg-demo-0123456789abcdef
VLLM_VENV := .venv-vllm
CONSTRAINTS := deploy/constraints.txt

# `make run`'s ports: the gateway's, then its two workers'. `make run PORT=9000
# WORKER_PORTS="19080 19081"` moves them, e.g. when 8000 is taken or for a second demo beside
# the first. Set on the command line only (`:=`, so a PORT in the environment is not taken).
PORT := 8000
WORKER_PORTS := 18080 18081
W1_PORT = $(word 1,$(WORKER_PORTS))
W2_PORT = $(word 2,$(WORKER_PORTS))
# The embedded config (config/gateway.yaml) has these ports written in; its documented
# environment overrides point it at the ports above: the server's, and the URLs of models[0]
# (tiny-llama: w1, w2) and models[1] (tiny-embed: w1-embed, w2-embed), w1 on the first worker.
# The demo admin key (vg-admin-demo-0123456789abcdef) for `make run` only: never in
# config/gateway.yaml, which the gateway image embeds.
RUN_ENV = VGATE_SERVER__PORT=$(PORT) \
  VGATE_ADMIN__KEY_SHA256=08e89586096cf0ee97bfc8c97117ec3f8050a77fead64cc615a9a3601178aac6 \
  VGATE_MODELS__0__BACKENDS__0__URL=http://127.0.0.1:$(W1_PORT) \
  VGATE_MODELS__0__BACKENDS__1__URL=http://127.0.0.1:$(W2_PORT) \
  VGATE_MODELS__1__BACKENDS__0__URL=http://127.0.0.1:$(W1_PORT) \
  VGATE_MODELS__1__BACKENDS__1__URL=http://127.0.0.1:$(W2_PORT)

.PHONY: run run-vllm vllm test test-fast lint redis-server nginx promtool bench drill drill-vllm constraints clean

# Installs the versions CI tested (deploy/constraints.txt), so that a new release of a
# dependency or of a lint tool never breaks a fresh clone; `make constraints` moves them on.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "vgate needs Python 3.11 or newer ($(PYTHON) is older)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]' -c $(CONSTRAINTS)
	touch $(STAMP)

# The newest releases that pyproject.toml allows, resolved in a clean venv; then `make test`.
constraints:
	rm -rf .venv-constraints && $(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install -q -e '.[test]'
	{ sed -n '1,2p' $(CONSTRAINTS); \
	  .venv-constraints/bin/python -m pip freeze --exclude-editable | grep -v '^vgate'; \
	} > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-constraints

# Two simulated vLLM workers and the gateway on the embedded default config. The gateway
# starts once the workers listen (at most 20 s), so its first health check finds them up.
# Ctrl-C (or the gateway exiting) stops everything this started.
run: $(STAMP)
	@trap 'kill $$(jobs -p) 2>/dev/null; wait' EXIT INT TERM; \
	$(BIN)/vgate sim --port $(W1_PORT) --model tiny-llama --model tiny-embed & \
	$(BIN)/vgate sim --port $(W2_PORT) --model tiny-llama --model tiny-embed & \
	for _ in $$(seq 200); do \
	  (exec 3<>/dev/tcp/127.0.0.1/$(W1_PORT) && exec 4<>/dev/tcp/127.0.0.1/$(W2_PORT)) 2>/dev/null && break; \
	  sleep 0.1; \
	done; \
	echo "vgate on http://127.0.0.1:$(PORT)  (demo key: $(DEMO_KEY))"; \
	echo "try: curl -s localhost:$(PORT)/v1/chat/completions -H 'Authorization: Bearer $(DEMO_KEY)' \\"; \
	echo "       -H 'Content-Type: application/json' -d '{\"model\": \"default\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'"; \
	$(RUN_ENV) $(BIN)/vgate serve

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

lint: $(STAMP) nginx promtool
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	deploy/lint.sh
	bash deploy/helm-lint.sh

# Every test, the real-vLLM ones (tests/vllm, a few minutes) included: they fail, rather than
# skip, without their venv, which `vllm` installs first.
test: lint vllm redis-server
	VGATE_VLLM_TESTS=require $(BIN)/python -m pytest -q

# Everything but tests/vllm.
test-fast: lint redis-server
	VGATE_VLLM_TESTS=off $(BIN)/python -m pytest -q

# The tests start redis-server processes of their own (limits, breakers and the admin API
# shared across gateway processes). A machine without it gets Debian's package when it can.
redis-server:
	@command -v redis-server >/dev/null || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing redis-server (Debian package) for the tests"; \
	    apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; \
	  else \
	    echo "the tests need redis-server on PATH: apt-get install redis-server," \
	      "dnf install redis or brew install redis"; \
	    exit 1; \
	  fi; }

# `make drill`: the drill catalogue (config/drills/*.yaml; DRILLS=... picks others) against
# `make run`'s stack on ports of its own (the gateway on 8100, its workers on 18180 and
# 18181, Redis on 16390), served from a copy of config/drills/stack/ in .run/drill/, which
# drills may swap. Reports (JSON, Markdown, a chart) in .run/drill/reports/; the verdict
# table at the end; the exit status is 0 only if every drill passed.
DRILLS ?= config/drills/*.yaml
DRILL_DIR := .run/drill
DRILL_PORT := 8100
DRILL_WORKER_PORTS := 18180 18181
DRILL_REDIS_PORT := 16390
DRILL_ENV = VGATE_DRILL_KEY=vg-drill-load-0123456789abcdef \
  VGATE_DRILL_ADMIN_KEY=vg-drill-admin-0123456789abcdef \
  VGATE_DRILL_BUDGET_KEY=vg-drill-budget-0123456789abcd \
  VGATE_DRILL_REDIS_PORT=$(DRILL_REDIS_PORT)
DRILL_GATEWAY_ENV = VGATE_SERVER__PORT=$(DRILL_PORT) \
  VGATE_REDIS__URL=redis://127.0.0.1:$(DRILL_REDIS_PORT) \
  VGATE_MODELS__0__BACKENDS__0__URL=http://127.0.0.1:$(word 1,$(DRILL_WORKER_PORTS)) \
  VGATE_MODELS__0__BACKENDS__1__URL=http://127.0.0.1:$(word 2,$(DRILL_WORKER_PORTS)) \
  VGATE_MODELS__1__BACKENDS__0__URL=http://127.0.0.1:$(word 1,$(DRILL_WORKER_PORTS)) \
  VGATE_MODELS__1__BACKENDS__1__URL=http://127.0.0.1:$(word 2,$(DRILL_WORKER_PORTS))

drill: $(STAMP) redis-server
	@rm -rf $(DRILL_DIR) && mkdir -p $(DRILL_DIR)/logs && cp config/drills/stack/*.yaml $(DRILL_DIR)/
	@trap 'kill $$(jobs -p) 2>/dev/null; redis-cli -p $(DRILL_REDIS_PORT) shutdown nosave >/dev/null 2>&1; wait' EXIT INT TERM; \
	for port in $(DRILL_WORKER_PORTS); do \
	  $(BIN)/vgate sim --port $$port --model tiny-llama --model tiny-embed --ttft-ms 20 \
	    --tokens-per-s 400 > $(DRILL_DIR)/logs/sim-$$port.log 2>&1 & \
	done; \
	redis-server --port $(DRILL_REDIS_PORT) --bind 127.0.0.1 --save '' --appendonly no \
	  > $(DRILL_DIR)/logs/redis.log 2>&1 & \
	$(DRILL_GATEWAY_ENV) $(BIN)/vgate serve --config $(DRILL_DIR)/gateway.yaml \
	  > $(DRILL_DIR)/logs/gateway.log 2>&1 & \
	$(DRILL_ENV) $(BIN)/vgate drill --url http://127.0.0.1:$(DRILL_PORT) \
	  --config $(DRILL_DIR)/gateway.yaml --wait-ready 30 --out $(DRILL_DIR)/reports $(DRILLS)

# The provider-outage drill in front of real CPU vLLM workers (config/drills/stack/vllm.yaml:
# two chat workers, one embeddings worker, started by `vgate up`; the gateway on 8200), with
# 2 load clients: what two shared cores serve. Reports in .run/drill-vllm/reports/.
drill-vllm: $(STAMP) vllm
	@mkdir -p .run/drill-vllm/logs
	@trap 'kill $$(jobs -p) 2>/dev/null; wait' EXIT INT TERM; \
	$(BIN)/vgate up --config config/drills/stack/vllm.yaml > .run/drill-vllm/logs/gateway.log 2>&1 & \
	$(DRILL_ENV) VGATE_DRILL_OUTAGE_BACKENDS=w1 $(BIN)/vgate drill --url http://127.0.0.1:8200 \
	  --config config/drills/stack/vllm.yaml --clients 2 --wait-ready 300 \
	  --out .run/drill-vllm/reports config/drills/provider-outage.yaml

# nginx for deploy/lint.sh (nginx -t) and tests/e2e/test_nginx_front.py, as for redis-server.
nginx:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing nginx (Debian package) for the lint and the tests"; \
	    apt-get update -q >/dev/null && apt-get install -y -q nginx >/dev/null; \
	  else \
	    echo "deploy/lint.sh and the NGINX tests need nginx: apt-get install nginx"; \
	    exit 1; \
	  fi; }

# promtool (Debian's prometheus package) for deploy/compose-lint.sh and the SLO and dashboard
# tests, as for redis-server.
promtool:
	@command -v promtool >/dev/null || [ -x /usr/bin/promtool ] || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing prometheus (Debian package: promtool) for the lint and the tests"; \
	    apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null; \
	  else \
	    echo "the lint and the tests need promtool: apt-get install prometheus"; \
	    exit 1; \
	  fi; }

bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/limits.py --json bench/results/limits-latest.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
