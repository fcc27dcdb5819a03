"""`helm template` and `helm lint` for deploy/helm/vgate without a helm binary.

    python deploy/helm/helmtool.py template CHART [-f VALUES]... [--name N] [--namespace NS]
    python deploy/helm/helmtool.py lint CHART [-f VALUES]... [--strict]

Helm itself does the work: PyPI's helm-python-sdk embeds Helm v4's Go library (its
libhelm_c.so), so the chart is loaded, its values.schema.json checked, its templates
rendered and linted by the same code as the `helm` command, offline. Values files are merged
in order, the later winning, as `helm -f a -f b` does (maps merged key by key, anything else
replaced). `template` writes the manifests as `helm template` does (each after a
`# Source:` line) to standard output; both exit 1 with Helm's message on failure.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

KUBE_VERSION = "v1.37.0"  # what kubernetes-validate checks against, and the lint's


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of -f files: nested maps key by key, the override's other values win."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_values(files: list[str]) -> dict[str, Any] | None:
    from helm_python import values_from_yaml

    if not files:
        return None
    values: dict[str, Any] = {}
    for name in files:
        values = merge(values, values_from_yaml(Path(name).read_text()) or {})
    return values


def template(chart_dir: str, files: list[str], name: str, namespace: str) -> str:
    from helm_python import Chart

    values = load_values(files)
    with Chart.load(chart_dir) as chart:
        chart.validate_schema(chart.merge_values(values))
        rendered = chart.render(values, name=name, namespace=namespace, is_install=True)
    documents = []
    for source, manifest in sorted(rendered.items()):
        # NOTES.txt and the helpers render as text, not manifests, as in `helm template`.
        if source.endswith("NOTES.txt"):
            continue
        # One template may render several documents: each gets its Source line.
        for document in re.split(r"(?m)^---[ \t]*$", manifest):
            if document.strip():
                documents.append(f"---\n# Source: {source}\n{document.strip()}\n")
    return "".join(documents)


def lint(chart_dir: str, files: list[str], strict: bool) -> tuple[bool, list[str]]:
    from helm_python import lint as helm_lint

    report = helm_lint(chart_dir, load_values(files), strict=strict, kube_version=KUBE_VERSION)
    severities = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}
    lines = [
        f"[{severities.get(m['severity'], m['severity'])}] {m['path']}: {m['error']}"
        for m in report.get("messages") or []
    ]
    lines.extend(f"[ERROR] {error}" for error in report.get("errors") or [])
    worst = max((m["severity"] for m in report.get("messages") or []), default=0)
    failed = bool(report.get("errors")) or worst >= (2 if strict else 3)
    return not failed, lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="helmtool", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb in ("template", "lint"):
        sub = verbs.add_parser(verb)
        sub.add_argument("chart")
        sub.add_argument("-f", "--values", action="append", default=[], help="values file")
        if verb == "template":
            sub.add_argument("--name", default="vgate", help="release name")
            sub.add_argument("--namespace", default="default")
        else:
            sub.add_argument("--strict", action="store_true", help="warnings fail too")
    args = parser.parse_args(argv)

    try:
        from helm_python import HelmError, helm_sdk_version
    except ImportError:
        print(
            "helmtool: helm-python-sdk is not installed (pip install helm-python-sdk)",
            file=sys.stderr,
        )
        return 2
    try:
        if args.verb == "template":
            sys.stdout.write(template(args.chart, args.values, args.name, args.namespace))
            return 0
        ok, lines = lint(args.chart, args.values, args.strict)
        shown = " ".join(f"-f {name}" for name in args.values)
        print(f"helm lint (Helm {helm_sdk_version()}) {args.chart} {shown}".rstrip())
        for line in lines:
            print(f"  {line}")
        print("  ok" if ok else "  FAILED")
        return 0 if ok else 1
    except HelmError as exc:
        print(f"helm {args.verb}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"helm {args.verb}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
