#!/usr/bin/env bash
# Check the Helm chart deploy/helm/vgate with the real tools (`make lint` runs this):
#
#   helm lint --strict   Helm v4's own lint (warnings fail too), through PyPI's
#                        helm-python-sdk, which embeds Helm's Go library: no helm binary
#                        needed (deploy/helm/helmtool.py), values.schema.json included.
#   helm template        each values set below, rendered by the same library.
#   kubernetes-validate --strict
#                        every rendered manifest of a kind Kubernetes defines, against the
#                        1.30 (the chart's kubeVersion floor) and 1.37 schemas, unknown
#                        fields rejected. The Prometheus Operator's
#                        kinds have no schema there (kubernetes-validate only warns on them):
#                        a ServiceMonitor is checked to select the gateway's Service and name
#                        its port, a PrometheusRule's groups with `promtool check rules`.
#   vgate check-config   the gateway's config as the pod loads it: the ConfigMap and the keys
#                        Secret laid out at their mount paths, under the environment the
#                        Deployment and the image set (deploy/helm/check_rendered.py).
#   vgate slo rules      the chart's rules files are what the generator writes now
#                        (deploy/helm/generate-slo-rules.sh --check).
#
# Values sets: the defaults (CPU demo), values-gpu.yaml, each with ci/monitoring-values.yaml,
# and ci/external-redis-values.yaml (its Secrets, not in the release, given to the check).
# Usage: deploy/helm-lint.sh   (from anywhere; VENV overrides the venv, default .venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${VENV:-$ROOT/.venv}/bin"
CHART=deploy/helm/vgate
# The schemas the manifests must pass: Chart.yaml's kubeVersion floor and the newest
# kubernetes-validate knows.
KUBE_FLOOR=1.30.0
KUBE_NEWEST=1.37.0
cd "$ROOT"

fail() { echo "deploy/helm-lint.sh: $*" >&2; exit 1; }

"$BIN/python" -c 'import helm_python' 2>/dev/null \
    || fail "helm-python-sdk not found in $BIN/python: pip install helm-python-sdk (make .venv/.installed)"
[[ -x "$BIN/kubernetes-validate" ]] \
    || fail "kubernetes-validate not found in $BIN: pip install kubernetes-validate (make .venv/.installed)"
promtool="$(PATH="$PATH:/usr/sbin" command -v promtool || true)"
[[ -n "$promtool" ]] || fail "promtool not found: apt-get install prometheus (make promtool)"
[[ -x "$BIN/vgate" ]] || fail "$BIN/vgate not found: make .venv/.installed"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# The Secrets ci/external-redis-values.yaml names but the release does not create.
printf 'redis://:password@redis.example.internal:6379/0\n' > "$scratch/redis-url"
external_secrets=(--secret vgate-keys/keys.yaml=config/keys.yaml
                  --secret "vgate-redis/redis-url=$scratch/redis-url")

sets=(
    ""
    "values-gpu.yaml"
    "ci/monitoring-values.yaml"
    "values-gpu.yaml ci/monitoring-values.yaml"
    "ci/external-redis-values.yaml"
)
index=0
for set in "${sets[@]}"; do
    index=$((index + 1))
    flags=()
    for file in $set; do flags+=(-f "$CHART/$file"); done
    label="${set:-values.yaml}"
    out="$scratch/$index"
    mkdir -p "$out"

    "$BIN/python" deploy/helm/helmtool.py lint "$CHART" --strict "${flags[@]}" \
        || fail "helm lint --strict failed ($label)"

    echo "helm template $CHART ${flags[*]}"
    "$BIN/python" deploy/helm/helmtool.py template "$CHART" "${flags[@]}" > "$out/rendered.yaml" \
        || fail "helm template failed ($label)"
    "$BIN/python" deploy/helm/check_rendered.py split "$out/rendered.yaml" "$out" \
        || fail "rendered manifests ($label)"

    echo "kubernetes-validate --strict -k $KUBE_FLOOR -k $KUBE_NEWEST ($label)"
    # It exits 0 on a kind it has no schema for (a warning): fail on its warnings too.
    "$BIN/kubernetes-validate" --strict --quiet -k "$KUBE_FLOOR" -k "$KUBE_NEWEST" "$out/core.yaml" \
        > "$out/validate.txt" 2>&1 \
        || { cat "$out/validate.txt" >&2; fail "kubernetes-validate --strict failed ($label)"; }
    if grep -q . "$out/validate.txt"; then
        cat "$out/validate.txt" >&2
        fail "kubernetes-validate --strict warned ($label)"
    fi

    for rules in "$out"/rules-*.yaml; do
        [[ -e "$rules" ]] || continue
        echo "promtool check rules ($label: ${rules##*/})"
        "$promtool" check rules "$rules" || fail "promtool check rules failed ($label)"
    done

    secrets=()
    [[ "$set" == *external-redis* ]] && secrets=("${external_secrets[@]}")
    "$BIN/python" deploy/helm/check_rendered.py check-config "$out/rendered.yaml" "$BIN/vgate" \
        deploy/docker/Dockerfile "${secrets[@]}" \
        || fail "vgate check-config failed on the rendered gateway config ($label)"
done

deploy/helm/generate-slo-rules.sh --check
echo "deploy/helm-lint.sh: ok"
