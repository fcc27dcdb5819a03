"""What deploy/helm-lint.sh checks in the chart's rendered manifests, beside Helm's lint.

    python deploy/helm/check_rendered.py split RENDERED.yaml OUTDIR
        The manifests Kubernetes' own schemas cover go to OUTDIR/core.yaml (for
        `kubernetes-validate --strict`); the Prometheus Operator's kinds (no schema in
        kubernetes-validate, whose unknown kinds only warn) are checked here instead: a
        ServiceMonitor must select a rendered Service by its labels and name one of its
        ports; a PrometheusRule's groups go to OUTDIR/rules-<name>.yaml for `promtool check
        rules`. Any other kind the chart does not know fails.
    python deploy/helm/check_rendered.py check-config RENDERED.yaml VGATE [DOCKERFILE]
            [--secret NAME/KEY=FILE]...
        The gateway Deployment's config as the pod loads it: its ConfigMap and Secret volumes
        written into a scratch root at their mount paths, `vgate check-config` run on the
        `--config` its args name, with the VGATE_ environment the container gets (the
        image's ENV from the Dockerfile, then the Deployment's env; a secretKeyRef read from
        a rendered Secret or from --secret, for Secrets the release does not create).

    python deploy/helm/check_rendered.py slo-rules RENDERED.yaml VGATE [--source TEXT]
        `vgate slo rules` on the gateway's config as mounted (its slos:): the rules the
        chart's PrometheusRule carries (deploy/helm/generate-slo-rules.sh).

Exits 1 naming the object and the reason when a check fails.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

# The kinds kubernetes-validate has schemas for that the chart renders.
CORE_KINDS = {
    "ConfigMap",
    "Deployment",
    "HorizontalPodAutoscaler",
    "PersistentVolumeClaim",
    "PodDisruptionBudget",
    "Secret",
    "Service",
}
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}  # monitoring.coreos.com/v1 CRDs
ENV_PREFIX = "VGATE_"


class CheckError(Exception):
    """A rendered manifest that would not work; the message names it and why."""


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def named(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    for doc in docs:
        if doc.get("kind") == kind and doc["metadata"]["name"] == name:
            return doc
    return None


def check_service_monitor(monitor: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [
        doc
        for doc in docs
        if doc.get("kind") == "Service"
        and selector.items() <= (doc["metadata"].get("labels") or {}).items()
    ]
    if not services:
        raise CheckError(f"{named(monitor)}: selects no rendered Service ({selector})")
    for endpoint in monitor["spec"]["endpoints"]:
        for service in services:
            ports = {port.get("name") for port in service["spec"]["ports"]}
            if endpoint.get("port") not in ports:
                raise CheckError(
                    f"{named(monitor)}: endpoint port {endpoint.get('port')!r} is not a port "
                    f"of {named(service)} ({sorted(p for p in ports if p)})"
                )


def split(docs: list[dict[str, Any]], outdir: Path) -> list[str]:
    """Write the core manifests and the rules; check the ServiceMonitors. The notes say what
    was kept from kubernetes-validate and why."""
    outdir.mkdir(parents=True, exist_ok=True)
    core = [doc for doc in docs if doc.get("kind") in CORE_KINDS]
    notes = []
    for doc in docs:
        kind = doc.get("kind")
        if kind in CORE_KINDS:
            continue
        if kind not in OPERATOR_KINDS:
            raise CheckError(f"{named(doc)}: a kind deploy/helm/check_rendered.py does not know")
        if kind == "ServiceMonitor":
            check_service_monitor(doc, docs)
            notes.append(f"{named(doc)}: a CRD (no schema offline): selector and port checked")
        else:
            rules = outdir / f"rules-{doc['metadata']['name']}.yaml"
            rules.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}, sort_keys=False))
            notes.append(f"{named(doc)}: a CRD (no schema offline): its groups to {rules.name}")
    (outdir / "core.yaml").write_text(yaml.safe_dump_all(core, sort_keys=False))
    return notes


def image_env(dockerfile: Path) -> dict[str, str]:
    """The VGATE_ variables the Dockerfile's ENV instructions set."""
    found = re.findall(r"\b(VGATE_\w+)=(\S+)", dockerfile.read_text())
    return {name: value.rstrip("\\").strip() for name, value in found}


def secret_value(
    docs: list[dict[str, Any]], name: str, key: str, given: dict[tuple[str, str], str]
) -> str:
    secret = find(docs, "Secret", name)
    if secret is not None:
        if key in (secret.get("stringData") or {}):
            return str(secret["stringData"][key])
        if key in (secret.get("data") or {}):
            return base64.b64decode(secret["data"][key]).decode()
        raise CheckError(f"Secret/{name} has no key {key!r}")
    if (name, key) in given:
        return Path(given[(name, key)]).read_text()
    raise CheckError(
        f"Secret/{name} (key {key!r}) is not rendered: give --secret {name}/{key}=FILE"
    )


def gateway_deployment(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    for doc in docs:
        if doc.get("kind") != "Deployment":
            continue
        labels = doc["spec"]["template"]["metadata"].get("labels") or {}
        if labels.get("app.kubernetes.io/component") == "gateway":
            containers = doc["spec"]["template"]["spec"]["containers"]
            return doc, next(c for c in containers if c["name"] == "gateway")
    raise CheckError("no gateway Deployment (app.kubernetes.io/component: gateway) rendered")


def lay_out_volumes(
    docs: list[dict[str, Any]],
    deployment: dict[str, Any],
    container: dict[str, Any],
    root: Path,
    given: dict[tuple[str, str], str],
) -> None:
    """Write the container's ConfigMap and Secret volumes under `root` at their mount paths."""
    volumes = {
        volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]
    }
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"])
        if volume is None:
            raise CheckError(f"{named(deployment)}: volumeMount {mount['name']!r} has no volume")
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            config_map = find(docs, "ConfigMap", volume["configMap"]["name"])
            if config_map is None:
                raise CheckError(
                    f"{named(deployment)}: ConfigMap/{volume['configMap']['name']} not rendered"
                )
            files = dict(config_map.get("data") or {})
        elif "secret" in volume:
            name = volume["secret"]["secretName"]
            keys = [item["key"] for item in volume["secret"].get("items") or []]
            if not keys:
                secret = find(docs, "Secret", name) or {}
                keys = sorted({**(secret.get("data") or {}), **(secret.get("stringData") or {})})
            files = {key: secret_value(docs, name, key, given) for key in keys}
            paths = {item["key"]: item["path"] for item in volume["secret"].get("items") or []}
            files = {paths.get(key, key): value for key, value in files.items()}
        else:
            continue  # emptyDir: an empty folder
        for path, content in files.items():
            (target / path).write_text(content)


def container_env(
    docs: list[dict[str, Any]], container: dict[str, Any], given: dict[tuple[str, str], str]
) -> dict[str, str]:
    env = {}
    for entry in container.get("env") or []:
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        elif "secretKeyRef" in (entry.get("valueFrom") or {}):
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secret_value(docs, ref["name"], ref["key"], given).strip()
        else:
            raise CheckError(f"env {entry['name']}: only value and secretKeyRef are checked")
    return env


def config_argument(args: list[str]) -> str:
    for index, argument in enumerate(args):
        if argument == "--config" and index + 1 < len(args):
            return args[index + 1]
        if argument.startswith("--config="):
            return argument.split("=", 1)[1]
    raise CheckError("the gateway container's args name no --config")


def check_config(
    docs: list[dict[str, Any]], vgate: str, dockerfile: Path, given: dict[tuple[str, str], str]
) -> int:
    deployment, container = gateway_deployment(docs)
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    env.update(image_env(dockerfile))
    env.update(container_env(docs, container, given))
    config = config_argument(container.get("args") or [])
    with tempfile.TemporaryDirectory(prefix="vgate-helm-") as scratch:
        root = Path(scratch)
        lay_out_volumes(docs, deployment, container, root, given)
        secret = {e["name"] for e in container.get("env") or [] if "valueFrom" in e}
        shown = " ".join(
            f"{k}={'(secret)' if k in secret else v}"
            for k, v in sorted(env.items())
            if k.startswith(ENV_PREFIX)
        )
        print(f"{named(deployment)}: vgate check-config {config}  [{shown}]", flush=True)
        done = subprocess.run(
            [vgate, "check-config", str(root / config.lstrip("/"))], env=env, check=False
        )
    return done.returncode


def slo_rules(
    docs: list[dict[str, Any]], vgate: str, given: dict[tuple[str, str], str], source: str
) -> str:
    """`vgate slo rules` on the gateway's config as mounted: the PrometheusRule's groups."""
    deployment, container = gateway_deployment(docs)
    config = config_argument(container.get("args") or [])
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    with tempfile.TemporaryDirectory(prefix="vgate-helm-") as scratch:
        root = Path(scratch)
        lay_out_volumes(docs, deployment, container, root, given)
        done = subprocess.run(
            [vgate, "slo", "rules", "--config", str(root / config.lstrip("/"))],
            env=env,
            check=False,
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        raise CheckError(f"{named(deployment)}: vgate slo rules failed: {done.stderr.strip()}")
    # The generator's header names its source, here a scratch path: name the values instead.
    return re.sub(r"from \S+: ", lambda _: f"from {source}: ", done.stdout, count=1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="check_rendered", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    split_verb = verbs.add_parser("split")
    split_verb.add_argument("rendered", type=Path)
    split_verb.add_argument("outdir", type=Path)
    check = verbs.add_parser("check-config")
    check.add_argument("rendered", type=Path)
    check.add_argument("vgate")
    check.add_argument("dockerfile", type=Path, nargs="?", default=Path("deploy/docker/Dockerfile"))
    check.add_argument("--secret", action="append", default=[], help="NAME/KEY=FILE")
    rules = verbs.add_parser("slo-rules")
    rules.add_argument("rendered", type=Path)
    rules.add_argument("vgate")
    rules.add_argument("--secret", action="append", default=[], help="NAME/KEY=FILE")
    rules.add_argument("--source", default="the chart's gateway.config", help="for the header")
    args = parser.parse_args(argv)
    try:
        docs = load(args.rendered)
        if args.verb == "split":
            for note in split(docs, args.outdir):
                print(f"  {note}")
            return 0
        given = {}
        for spec in args.secret:
            ref, _, file = spec.partition("=")
            name, _, key = ref.partition("/")
            if not (name and key and file):
                raise CheckError(f"--secret {spec!r}: expected NAME/KEY=FILE")
            given[(name, key)] = file
        if args.verb == "slo-rules":
            sys.stdout.write(slo_rules(docs, args.vgate, given, args.source))
            return 0
        return 0 if check_config(docs, args.vgate, args.dockerfile, given) == 0 else 1
    except CheckError as exc:
        print(f"{args.rendered}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
