#!/usr/bin/env bash
# Write the chart's SLO rules (the PrometheusRule's groups) from the `slos:` of the gateway
# config each values file deploys, with `vgate slo rules`:
#
#   deploy/helm/vgate/values.yaml      ->  deploy/helm/vgate/files/vgate-slos.yaml
#   deploy/helm/vgate/values-gpu.yaml  ->  deploy/helm/vgate/files/vgate-slos-gpu.yaml
#
# Run it after changing gateway.config.slos (or the routes they name) in either values file;
# deploy/helm-lint.sh fails while the files are stale. Usage: deploy/helm/generate-slo-rules.sh
# [--check] (from anywhere; VENV overrides the venv, default .venv). --check writes nothing
# and exits 1 when a file differs from what would be written.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${VENV:-$ROOT/.venv}/bin"
CHART=deploy/helm/vgate
cd "$ROOT"

check=false
[[ "${1:-}" == "--check" ]] && check=true

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

status=0
for pair in "values.yaml:files/vgate-slos.yaml" "values-gpu.yaml:files/vgate-slos-gpu.yaml"; do
    values="${pair%%:*}" rules="${pair#*:}"
    overlay=()
    [[ "$values" != values.yaml ]] && overlay=(-f "$CHART/$values")
    "$BIN/python" deploy/helm/helmtool.py template "$CHART" "${overlay[@]}" > "$scratch/rendered.yaml"
    "$BIN/python" deploy/helm/check_rendered.py slo-rules "$scratch/rendered.yaml" "$BIN/vgate" \
        --source "$CHART/$values's gateway.config (deploy/helm/generate-slo-rules.sh)" \
        > "$scratch/rules.yaml"
    if $check; then
        echo "vgate slo rules ($CHART/$values) == $CHART/$rules"
        diff -u "$CHART/$rules" "$scratch/rules.yaml" >&2 || {
            echo "$CHART/$rules is stale: deploy/helm/generate-slo-rules.sh" >&2
            status=1
        }
    else
        cp "$scratch/rules.yaml" "$CHART/$rules"
        echo "wrote $CHART/$rules"
    fi
done
exit "$status"
