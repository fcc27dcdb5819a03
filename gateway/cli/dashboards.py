"""Grafana dashboards as code: `vgate slo dashboards` builds them from the config's `slos:`
and the metrics gateway/edge/metrics.py exports.

Two dashboards, built with the Grafana Foundation SDK (grafana-foundation-sdk, Grafana Labs'
typed builders for the dashboard schema):

- `vgate-slos`, the SLO overview: per objective its SLI and error budget left over its
  window, its burn rates over the windows the alerts read (`vgate slo rules`' recordings),
  and its alerts;
- `vgate-gateway`: requests, errors, latency, TTFT, TPOT and tokens per route, attempts,
  breakers and health per backend, retries, fallbacks, chaos injections (also as
  annotations), limit refusals per key, requests in flight and queued, and the response
  cache (hit ratio, hits/misses/coalesced per route, bypasses, lookup latency, size).

Every query reads the Prometheus data source `PROMETHEUS_UID`; the latency panels ask for
exemplars, whose `trace_id` the data source's provisioning (deploy/grafana/provisioning)
links to the Jaeger data source `JAEGER_UID`. `concrete` turns a panel's query into plain
PromQL (no Grafana variables) for promtool and the tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_model
from grafana_foundation_sdk.models import dashboard as model

from gateway.cli.slo import BURN_ALERTS, WINDOWS, describe, error_ratio, recorded_ratio
from gateway.config import GatewayConfig, SloObjective

PROMETHEUS_UID = "vgate-prometheus"
JAEGER_UID = "vgate-jaeger"
GATEWAY_UID = "vgate-gateway"
SLOS_UID = "vgate-slos"
TAG = "vgate"
RATE = "$__rate_interval"  # Grafana's: at least four scrape intervals
_PROMETHEUS = model.DataSourceRef(type_val="prometheus", uid=PROMETHEUS_UID)
_VARIABLES = {"$model": ".*", "$backend": ".*"}  # what "All" stands for


@dataclass(frozen=True, slots=True)
class Query:
    expr: str
    legend: str = ""
    exemplar: bool = False  # a latency histogram's: its buckets carry trace ids


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"  # or "stat"
    width: int = 12
    height: int = 8
    # (from value, colour), ascending; drawn as lines on a time series
    thresholds: tuple[tuple[float | None, str], ...] = ()


def concrete(expr: str, rate_interval: str = "1m") -> str:
    """`expr` as plain PromQL: Grafana's variables replaced by what "All" and the rate
    interval stand for."""
    expr = expr.replace(RATE, rate_interval)
    for variable, value in _VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def _rate(metric: str, selector: str = "", by: str = "") -> str:
    grouping = f"sum by ({by}) " if by else "sum "
    matchers = f"{{{selector}}}" if selector else ""
    return f"{grouping}(rate({metric}{matchers}[{RATE}]))"


def _quantiles(
    metric: str, selector: str, by: str, legend: str, *, exemplar: bool = False
) -> tuple[Query, ...]:
    """p50 and p99 (`by` "": over all series); `exemplar`: the histogram's buckets carry trace
    ids (metrics.py)."""
    grouping = f"{by}, le" if by else "le"
    return tuple(
        Query(
            f"histogram_quantile({q}, {_rate(metric + '_bucket', selector, grouping)})",
            f"{legend} p{round(q * 100)}".strip(),
            exemplar=exemplar,
        )
        for q in (0.5, 0.99)
    )


def _latency_panel(
    title: str,
    metric: str,
    selector: str,
    by: str,
    legend: str,
    description: str,
    *,
    exemplar: bool = False,
    **options: Any,
) -> Panel:
    """p50 and p99 of a latency histogram, in seconds; `exemplar`: its dots link to traces."""
    if exemplar:
        description += _EXEMPLARS
    quantiles = _quantiles(metric, selector, by, legend, exemplar=exemplar)
    return Panel(title, quantiles, unit="s", description=description, **options)


def _single(title: str, expr: str, legend: str, **options: Any) -> Panel:
    """A panel of one query."""
    return Panel(title, (Query(expr, legend),), **options)


def _rate_panel(
    title: str, metric: str, selector: str, by: str, legend: str, **options: Any
) -> Panel:
    """A panel of one summed rate, in requests per second unless `options` say otherwise."""
    return _single(title, _rate(metric, selector, by), legend, **{"unit": "reqps", **options})


def _share(metric: str, selector: str, failed: str, by: str) -> str:
    """The share of `metric`'s rate that `failed` (more matchers) selects, per `by`."""
    return _rate(metric, f"{selector}, {failed}", by) + "\n/\n" + _rate(metric, selector, by)


# A count that should be 0: green, red from 1.
_ZERO_IS_GREEN = ((None, "green"), (1, "red"))


def _backend_alarm(title: str, expr: str) -> Panel:
    """A small stat per backend of something that should be 0 (open breakers, failed checks)."""
    return _single(
        title, expr, "{{backend}}", kind="stat", width=8, height=6, thresholds=_ZERO_IS_GREEN
    )


_ROUTE = 'model=~"$model"'
_BACKEND = 'backend=~"$backend"'
_EXEMPLARS = " Exemplars (dots) link to the request's trace in Jaeger."
# What the response cache did with a cacheable request, one counter each (metrics.py).
_CACHE_RESULTS = ("hits", "misses", "coalesced")


def _cache_hit_ratio() -> str:
    """Hits / (hits + misses + coalesced) per route. A route's series of each counter exists
    only once that happened to it, and `a + b` drops a route that `b` lacks, so each term is
    filled with 0 for every route with any of the three. (Selecting the three by `__name__`
    in one rate() fails: without their names their series collide.)"""
    rates = {
        result: f"rate(vgate_cache_{result}_total{{{_ROUTE}}}[{RATE}])" for result in _CACHE_RESULTS
    }
    zero = f"0 * sum by (model) ({' or '.join(rates.values())})"
    terms = {result: f"(sum by (model) ({rate}) or {zero})" for result, rate in rates.items()}
    return f"{terms['hits']}\n/\n(\n" + "\n+ ".join(terms.values()) + "\n)"


def cache_row() -> tuple[str, list[Panel]]:
    """The response cache (README "Cache"): its effect per route, why requests skip it, the
    store's latency and size. Evictions are left off: a test gateway cannot show them cheaply."""
    return (
        "Response cache",
        [
            _single(
                "Cache hit ratio by route",
                _cache_hit_ratio(),
                "{{model}}",
                unit="percentunit",
                description="Hits / (hits + misses + coalesced) of the cacheable requests. "
                "Bypasses (not cacheable, no-store, store unavailable) are not counted.",
            ),
            Panel(
                "Cache hits, misses and coalesced by route",
                tuple(
                    Query(
                        _rate(f"vgate_cache_{result}_total", _ROUTE, "model"),
                        f"{{{{model}}}} {result}",
                    )
                    for result in _CACHE_RESULTS
                ),
                unit="reqps",
                description="Coalesced: shared an identical request's upstream call in flight.",
            ),
            _rate_panel(
                "Cache bypasses by reason",
                "vgate_cache_bypasses_total",
                "",
                "reason",
                "{{reason}}",
                width=8,
                description="not_deterministic (no temperature 0 or seed), no_store, "
                "not_cacheable, unavailable (the store did not answer in time).",
            ),
            _latency_panel(
                "Cache lookup latency",
                "vgate_cache_lookup_seconds",
                "",
                "",
                "",
                "Time to look an answer up in the store (a Redis round trip with the redis "
                "backend).",
                width=8,
            ),
            _single(
                "Cache entries (memory backend)", "sum(vgate_cache_entries)", "entries", width=4
            ),
            _single(
                "Cache bytes (memory backend)",
                "sum(vgate_cache_bytes)",
                "bytes",
                unit="bytes",
                width=4,
            ),
        ],
    )


def gateway_rows() -> list[tuple[str, list[Panel]]]:
    """The gateway dashboard's rows and their panels."""
    requests = "vgate_requests_total"
    return [
        (
            "Traffic",
            [
                _rate_panel(
                    "Requests by route and status",
                    requests,
                    _ROUTE,
                    "model, status",
                    "{{model}} {{status}}",
                ),
                _single(
                    "Errors (5xx) by route, share of requests",
                    _share(requests, _ROUTE, 'status=~"5.."', "model"),
                    "{{model}}",
                    unit="percentunit",
                    description="Requests failed by the gateway or an upstream (5xx); 4xx are "
                    "the client's.",
                ),
                Panel(
                    "In flight and queued",
                    (
                        Query("sum(vgate_requests_in_flight)", "requests in flight"),
                        Query("sum(vgate_admission_in_flight)", "holding an admission slot"),
                        Query("sum(vgate_admission_waiting)", "queued for admission"),
                        Query("sum(vgate_connections_open)", "client connections"),
                    ),
                ),
                _rate_panel("Shed by admission", "vgate_shed_total", "", "reason", "{{reason}}"),
            ],
        ),
        (
            "Latency",
            [
                _latency_panel(
                    "Request latency by route",
                    "vgate_request_latency_seconds",
                    _ROUTE,
                    "model",
                    "{{model}}",
                    "Request to the end of its response.",
                    exemplar=True,
                ),
                _latency_panel(
                    "Time to first token by route",
                    "vgate_ttft_seconds",
                    _ROUTE,
                    "model",
                    "{{model}}",
                    "Streams: request to the first event.",
                    exemplar=True,
                ),
                _latency_panel(
                    "Time per output token by backend",
                    "vgate_tpot_seconds",
                    _BACKEND,
                    "backend",
                    "{{backend}}",
                    "Streams: (end - first token) / (completion tokens - 1).",
                ),
                _latency_panel(
                    "Upstream latency by backend",
                    "vgate_upstream_duration_seconds",
                    _BACKEND,
                    "backend",
                    "{{backend}}",
                    "The answering attempt's time to its response (non-streaming) or first "
                    "event (streaming).",
                ),
                _latency_panel(
                    "Gateway overhead by endpoint",
                    "vgate_gateway_overhead_seconds",
                    "",
                    "endpoint",
                    "{{endpoint}}",
                    "The gateway's own time to the response's start, the upstream's and policy "
                    "waits excluded.",
                    width=24,
                ),
            ],
        ),
        (
            "Tokens",
            [
                _rate_panel(
                    "Tokens generated by route",
                    "vgate_tokens_generated_total",
                    _ROUTE,
                    "model",
                    "{{model}}",
                    unit="short",
                    description="Completion tokens per second, from the upstreams' usage.",
                ),
                _rate_panel(
                    "Prompt tokens by route",
                    "vgate_tokens_prompt_total",
                    _ROUTE,
                    "model",
                    "{{model}}",
                    unit="short",
                    description="Prompt tokens per second, from the upstreams' usage.",
                ),
            ],
        ),
        (
            "Backends",
            [
                _rate_panel(
                    "Attempts by backend and result",
                    "vgate_backend_attempts_total",
                    _BACKEND,
                    "backend, result",
                    "{{backend}} {{result}}",
                ),
                _single(
                    "Failed attempts by backend, share of attempts",
                    _share("vgate_backend_attempts_total", _BACKEND, 'result!="ok"', "backend"),
                    "{{backend}}",
                    unit="percentunit",
                ),
                _backend_alarm(
                    "Breakers open or half-open",
                    f'sum by (backend) (vgate_breaker_state{{{_BACKEND}, state!="closed"}})',
                ),
                _backend_alarm(
                    "Backends failing health checks",
                    f"1 - min by (backend) (vgate_backend_healthy{{{_BACKEND}}})",
                ),
                _single(
                    "Concurrency limit by backend",
                    f"sum by (backend) (vgate_backend_concurrency_limit{{{_BACKEND}}})",
                    "{{backend}}",
                    width=8,
                    height=6,
                ),
                _single(
                    "vLLM queue by backend (its own running and waiting requests)",
                    f"sum by (backend, state) (vgate_upstream_requests{{{_BACKEND}}})",
                    "{{backend}} {{state}}",
                    width=24,
                    height=6,
                ),
            ],
        ),
        (
            "Resilience and chaos",
            [
                _rate_panel(
                    "Retries by route", "vgate_retries_total", _ROUTE, "model", "{{model}}", width=8
                ),
                _rate_panel(
                    "Fallbacks",
                    "vgate_fallbacks_total",
                    "",
                    "from_model, to_model",
                    "{{from_model}} → {{to_model}}",
                    width=8,
                ),
                _rate_panel(
                    "Chaos injections",
                    "vgate_chaos_injected_total",
                    "",
                    "experiment, fault",
                    "{{experiment}} {{fault}}",
                    width=8,
                    description="Faults injected by chaos experiments (also the dashboard's "
                    "annotations).",
                ),
            ],
        ),
        (
            "Keys and limits",
            [
                _rate_panel(
                    "Limit refusals by key",
                    "vgate_limit_refusals_total",
                    "",
                    "key, code",
                    "{{key}} {{code}}",
                    width=24,
                    description="Requests refused by a key's own rate limits or quota, by the "
                    "key's name (from the keys file) and the refusal.",
                ),
            ],
        ),
        cache_row(),
    ]


# Injected faults as annotations: one mark per experiment and fault while it injects.
CHAOS_ANNOTATION = "sum by (experiment, fault) (changes(vgate_chaos_injected_total[1m])) > 0"


def slo_rows(slos: Iterable[SloObjective]) -> list[tuple[str, list[Panel]]]:
    rows = []
    for slo in slos:
        window = f"{slo.window_days}d"
        ratio = error_ratio(slo, window)
        budget = f"{slo.error_budget:g}"
        selector = f'{{slo="{slo.name}"}}'
        fast, slow = BURN_ALERTS[0], BURN_ALERTS[1]  # the two pages
        rows.append(
            (
                f"{slo.name}: {describe(slo)}",
                [
                    Panel(
                        f"SLI over {slo.window_days} days",
                        (Query(f"1 - (\n{ratio}\n)", slo.name),),
                        unit="percentunit",
                        kind="stat",
                        width=6,
                        height=6,
                        thresholds=((None, "red"), (slo.target, "green")),
                        description=f"The share of requests that met the objective (target "
                        f"{slo.target:g}).",
                    ),
                    Panel(
                        "Error budget left",
                        (Query(f"1 - (\n{ratio}\n) / {budget}", slo.name),),
                        unit="percentunit",
                        kind="stat",
                        width=6,
                        height=6,
                        thresholds=((None, "red"), (0.0, "orange"), (0.25, "green")),
                        description=f"1 - the errors' share over the window / the budget "
                        f"({budget}); below 0 the objective is missed.",
                    ),
                    Panel(
                        "Burn rate (1: the budget lasts the window exactly)",
                        tuple(
                            Query(
                                f"{recorded_ratio(w)}{selector}\n/ on (slo)\n"
                                f"vgate:slo_error_budget:ratio{selector}",
                                w,
                            )
                            for w in WINDOWS
                        ),
                        width=12,
                        height=6,
                        thresholds=(
                            (None, "green"),
                            (slow.burn_rate, "orange"),
                            (fast.burn_rate, "red"),
                        ),
                        description="The error ratio over each window the alerts read, in "
                        f"error budgets: the fast-burn page fires above {fast.burn_rate:g} over "
                        f"{fast.long_window} and {fast.short_window}, the slower one above "
                        f"{slow.burn_rate:g} over {slow.long_window} and {slow.short_window}.",
                    ),
                    _single(
                        "Alerts pending or firing",
                        f"sum by (alertname, alertstate) (ALERTS{selector}) or vector(0)",
                        "{{alertname}} {{alertstate}}",
                        width=24,
                        height=5,
                        description="The burn-rate alerts of `vgate slo rules` for this "
                        "objective (0: none).",
                    ),
                ],
            )
        )
    return rows


def _panel(panel: Panel, panel_id: int) -> Any:
    built: Any
    if panel.kind == "stat":
        built = stat.Panel().reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
    else:
        built = (
            timeseries.Panel()
            .legend(
                common.VizLegendOptions()
                .display_mode(common_model.LegendDisplayMode.LIST)
                .placement(common_model.LegendPlacement.BOTTOM)
                .show_legend(True)
            )
            .tooltip(
                common.VizTooltipOptions()
                .mode(common_model.TooltipDisplayMode.MULTI)
                .sort(common_model.SortOrder.DESCENDING)
            )
        )
    built = (
        built.id(panel_id)
        .title(panel.title)
        .datasource(_PROMETHEUS)
        .unit(panel.unit)
        .span(panel.width)
        .height(panel.height)
    )
    if panel.description:
        built = built.description(panel.description)
    if panel.thresholds and panel.kind != "stat":
        built = built.thresholds_style(
            common.GraphThresholdsStyleConfig().mode(common_model.GraphTresholdsStyleMode.LINE)
        )
    if panel.thresholds:
        steps = [model.Threshold(value=value, color=colour) for value, colour in panel.thresholds]
        built = built.thresholds(
            dashboard.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(steps)
        )
    for index, query in enumerate(panel.queries):
        target = (
            prometheus.Dataquery()
            .expr(query.expr)
            .legend_format(query.legend)
            .ref_id(chr(ord("A") + index))
            .datasource(_PROMETHEUS)
        )
        if query.exemplar:
            target = target.exemplar(True)
        built = built.with_target(target)
    return built


def _dashboard(
    uid: str, title: str, description: str, rows: Sequence[tuple[str, list[Panel]]]
) -> Any:
    board = (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("browser")
        .link(
            dashboard.DashboardLink("vgate dashboards")
            .type(model.DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(True)
            .keep_time(True)
            .include_vars(True)
        )
    )
    panel_id = 0
    for title_of_row, panels in rows:
        panel_id += 1
        board = board.with_row(dashboard.Row(title_of_row).id(panel_id))
        for panel in panels:
            panel_id += 1
            board = board.with_panel(_panel(panel, panel_id))
    return board


def _variable(name: str, label: str, metric: str) -> Any:
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(_PROMETHEUS)
        .query(f"label_values({metric}, {name})")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )


def _as_json(board: Any, annotations: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    encoded: dict[str, Any] = json.loads(JSONEncoder(sort_keys=True).encode(board.build()))
    # The SDK's AnnotationQuery has no Prometheus fields (titleFormat, tagKeys, step).
    encoded["annotations"] = {"list": list(annotations)}
    return encoded


def gateway_dashboard() -> dict[str, Any]:
    board = _dashboard(
        GATEWAY_UID,
        "vgate: gateway",
        "Requests, errors, latency, tokens per route; attempts, breakers and health per "
        "backend; retries, fallbacks, chaos and limits; the response cache. Generated by "
        "`vgate slo dashboards`.",
        gateway_rows(),
    )
    board = board.with_variable(_variable("model", "route", "vgate_requests_total"))
    board = board.with_variable(_variable("backend", "backend", "vgate_backend_attempts_total"))
    chaos = {
        "datasource": {"type": "prometheus", "uid": PROMETHEUS_UID},
        "enable": True,
        "expr": CHAOS_ANNOTATION,
        "iconColor": "red",
        "name": "Chaos injections",
        "step": "30s",
        "tagKeys": "experiment,fault",
        "titleFormat": "chaos: {{experiment}} {{fault}}",
        "useValueForTime": False,
    }
    return _as_json(board, [chaos])


def slos_dashboard(config: GatewayConfig) -> dict[str, Any]:
    board = _dashboard(
        SLOS_UID,
        "vgate: SLOs",
        "Per objective of the config's slos:: its SLI and error budget left over its window, "
        "its burn rates, its alerts. Generated by `vgate slo dashboards` (the recorded series "
        "come from the rules of `vgate slo rules`).",
        slo_rows(config.slos),
    )
    return _as_json(board)


def dashboards(config: GatewayConfig) -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON: the gateway's, and the SLOs' where there are any."""
    built = {f"{GATEWAY_UID}.json": gateway_dashboard()}
    if config.slos:
        built[f"{SLOS_UID}.json"] = slos_dashboard(config)
    return built


def encode(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every query of `board`: panels' targets and annotations."""
    found = []
    for panel in board.get("panels", []):
        for target in panel.get("targets") or []:
            found.append((f"{panel['title']} / {target['refId']}", target["expr"]))
    for annotation in board.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            found.append((f"annotation {annotation['name']}", annotation["expr"]))
    return found


_VARIABLE = re.compile(r"\$\w+")


def unresolved(expr: str) -> list[str]:
    """Grafana variables `concrete` does not know (a dashboard bug)."""
    return _VARIABLE.findall(concrete(expr))
