"""`vgate slo rules`: Prometheus recording rules and burn-rate alerts from the `slos:` section.

Each objective gets its error ratio (the share of its requests that missed it) recorded over
every window the alerts read, and four multiwindow, multi-burn-rate alerts (the Google SRE
workbook's, chapter "Alerting on SLOs"): an alert fires while the error ratio over both its
long and its short window exceeds its burn rate times the error budget. The long window
makes it significant; the short one makes it stop soon after the burning does.

The rules read only what gateway/edge/metrics.py exports: `vgate_requests_total`,
`vgate_request_latency_seconds` and `vgate_ttft_seconds` (the names issue 13 asked for; before
it `vgate_request_duration_seconds` and `vgate_time_to_first_token_seconds`), whose `model`
label is the route's name.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

import yaml

from gateway.config import GatewayConfig, SloObjective

WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")  # the ones the alerts below read


@dataclass(frozen=True, slots=True)
class BurnAlert:
    """Fires while both windows' error ratios exceed `burn_rate` times the error budget."""

    long_window: str
    short_window: str
    burn_rate: float
    severity: str
    for_: str  # how long the condition must hold before it fires

    @property
    def alertname(self) -> str:
        return f"VgateSloBurnRate{self.long_window}"

    def budget_spent(self, window_days: int) -> float:
        """The share of a `window_days` budget this burn rate spends over the long window."""
        return self.burn_rate * _hours(self.long_window) / (window_days * 24)


BURN_ALERTS = (
    BurnAlert("1h", "5m", 14.4, "page", "2m"),
    BurnAlert("6h", "30m", 6.0, "page", "15m"),
    BurnAlert("1d", "2h", 3.0, "ticket", "1h"),
    BurnAlert("3d", "6h", 1.0, "ticket", "3h"),
)


def _hours(window: str) -> float:
    number, unit = int(window[:-1]), window[-1]
    return number * {"m": 1 / 60, "h": 1.0, "d": 24.0}[unit]


def recorded_ratio(window: str) -> str:
    """The name of the recorded error ratio over `window` (labelled `slo`)."""
    return f"vgate:slo_errors:ratio_rate{window}"


def _quote(text: str) -> str:
    return json.dumps(text)  # a PromQL string: double quotes, backslash escapes


_REGEX_SYNTAX = re.compile(r"[\\.^$*+?()\[\]{}|]")  # what RE2 (PromQL's =~) reads as syntax


def _literally(name: str) -> str:
    return _REGEX_SYNTAX.sub(lambda match: "\\" + match.group(), name)


def _route_matcher(slo: SloObjective) -> str:
    if not slo.routes:
        return ""
    if len(slo.routes) == 1:
        return f"model={_quote(slo.routes[0])}"
    return f"model=~{_quote('|'.join(_literally(route) for route in slo.routes))}"


def _selector(*matchers: str) -> str:
    present = [matcher for matcher in matchers if matcher]
    return "{" + ", ".join(present) + "}" if present else ""


def bucket_bound(seconds: float) -> str:
    """A bucket's `le` as the exposition writes it (prometheus_client: "1.0", "2.5")."""
    return repr(float(seconds))


# A latency objective's histogram, by what it measures, and that in words.
_HISTOGRAMS = {
    "request": "vgate_request_latency_seconds",
    "ttft": "vgate_ttft_seconds",
    "tpot": "vgate_tpot_seconds",
}
_MEASURED = {
    "request": "request duration",
    "ttft": "time to first token",
    "tpot": "time per output token",
}


def error_ratio(slo: SloObjective, window: str) -> str:
    """PromQL for the share of `slo`'s requests over `window` that missed it."""
    routes = _route_matcher(slo)
    latency = slo.latency
    if latency is None:
        # 4xx are the client's (a key's own 429 included): neither failures nor counted.
        failed = _selector('status=~"5.."', routes)
        counted = _selector('status!~"4.."', routes)
        return (
            f"(sum(rate(vgate_requests_total{failed}[{window}])) or vector(0))\n"
            f"/\nsum(rate(vgate_requests_total{counted}[{window}]))"
        )
    metric = _HISTOGRAMS[latency.of]
    within = _selector(f"le={_quote(bucket_bound(latency.threshold_s))}", routes)
    every = _selector(routes)
    return (
        f"(sum(rate({metric}_count{every}[{window}]))"
        f" - sum(rate({metric}_bucket{within}[{window}])))\n"
        f"/\nsum(rate({metric}_count{every}[{window}]))"
    )


def _percent(share: float) -> str:
    return f"{round(share * 100, 6):g}%"


def describe(slo: SloObjective) -> str:
    latency = slo.latency
    if latency is None:
        what = f"availability {_percent(slo.target)}"
    else:
        measured = _MEASURED[latency.of]
        what = f"{_percent(latency.target)} within {latency.threshold_s:g} s ({measured})"
    return f"{what} over {slo.window_days} days"


def rule_groups(slos: Iterable[SloObjective]) -> dict[str, Any]:
    """The rule file's content: one group per objective, its recordings before its alerts
    (a group evaluates in order, so the alerts read this evaluation's ratios)."""
    groups = []
    for slo in slos:
        label = {"slo": slo.name}
        budget = {"expr": f"vector({slo.error_budget:g})", "labels": label}
        rules: list[dict[str, Any]] = [{"record": "vgate:slo_error_budget:ratio", **budget}]
        rules += [
            {"record": recorded_ratio(window), "expr": error_ratio(slo, window), "labels": label}
            for window in WINDOWS
        ]
        routes = ", ".join(slo.routes) if slo.routes else "all routes"
        for alert in BURN_ALERTS:
            threshold = f"{alert.burn_rate:g} * {slo.error_budget:g}"
            selector = _selector(f"slo={_quote(slo.name)}")
            spent = alert.budget_spent(slo.window_days)
            rules.append(
                {
                    "alert": alert.alertname,
                    "expr": (
                        f"{recorded_ratio(alert.long_window)}{selector} > ({threshold})\n"
                        f"and\n{recorded_ratio(alert.short_window)}{selector} > ({threshold})"
                    ),
                    "for": alert.for_,
                    "labels": {
                        "slo": slo.name,
                        "severity": alert.severity,
                        "long_window": alert.long_window,
                        "short_window": alert.short_window,
                    },
                    "annotations": {
                        "summary": (
                            f"SLO {slo.name}: error budget burning at"
                            f" {alert.burn_rate:g}x over {alert.long_window} and"
                            f" {alert.short_window}"
                        ),
                        "description": (
                            f"SLO {slo.name} ({describe(slo)}) is spending its"
                            f" {slo.window_days}-day error budget at {alert.burn_rate:g} times"
                            f" the sustainable rate: {spent:.1%} of it in {alert.long_window}."
                            f" Routes: {routes}. Error ratio over {alert.long_window}:"
                            " {{ $value | humanizePercentage }}."
                        ),
                    },
                }
            )
        groups.append({"name": f"vgate-slo-{slo.name}", "rules": rules})
    return {"groups": groups}


class _Literal(str):
    """A multi-line PromQL expression, written as a YAML block (`|`) to stay readable."""


def _literal(dumper: yaml.SafeDumper, text: _Literal) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|")


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, _literal)


def _blocks(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _blocks(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_blocks(item) for item in node]
    if isinstance(node, str) and "\n" in node:
        return _Literal(node + "\n")
    return node


def render(config: GatewayConfig) -> str:
    header = f"# Generated by `vgate slo rules` from {config.source}: edit its slos:, not this.\n"
    body = yaml.dump(_blocks(rule_groups(config.slos)), Dumper=_Dumper, sort_keys=False, width=100)
    return header + body


def run(config: GatewayConfig, output: str | None, stdout: TextIO = sys.stdout) -> int:
    if not config.slos:
        print(f"vgate: {config.source} has no slos: section; no rules to write", file=sys.stderr)
        return 2
    text = render(config)
    if output is None or output == "-":
        stdout.write(text)
        return 0
    try:
        with open(output, "w", encoding="utf-8") as file:
            file.write(text)
    except OSError as exc:
        print(f"vgate: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"{output}: {len(config.slos)} objectives, {4 * len(config.slos)} alerts")
    return 0


def write_dashboards(config: GatewayConfig, out: str) -> int:
    """`vgate slo dashboards`: the Grafana dashboards (gateway/cli/dashboards.py) into `out`."""
    try:
        from gateway.cli import dashboards
    except ImportError as exc:  # the builder is an optional dependency of this command only
        print(f"vgate: {exc}; install grafana-foundation-sdk", file=sys.stderr)
        return 2
    built = dashboards.dashboards(config)
    try:
        os.makedirs(out, exist_ok=True)
        for name, board in built.items():
            with open(os.path.join(out, name), "w", encoding="utf-8") as file:
                file.write(dashboards.encode(board))
    except OSError as exc:
        print(f"vgate: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"{out}: {', '.join(built)}")
    if not config.slos:
        print(f"vgate: {config.source} has no slos: section; no SLO dashboard", file=sys.stderr)
    return 0
