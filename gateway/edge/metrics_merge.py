"""One server's /metrics from its processes' expositions (`server.workers` > 1).

Each worker process keeps its own registry (no cost on the hot path: the counters are plain
in-process values); the worker a scrape reaches reads its siblings' OpenMetrics expositions
and merges them with its own, here, so any worker answers for the whole server:

- counters and histograms (buckets, sum, count) are summed by label set; their `_created`
  is the earliest;
- gauges follow their metric's rule (`GAUGE_RULES`): most are summed (requests in flight,
  open connections, cache entries: each process holds its share); a state that every process
  reports of the same thing takes the max (a breaker open anywhere is open) or the min (a
  backend or Redis is "up" only where every process sees it up);
- exemplars: the latest per series (their timestamp), whichever process holds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar, Sample

Rule = Literal["sum", "max", "min"]

# Gauges that are not a share of the server's whole (the default: summed).
GAUGE_RULES: dict[str, Rule] = {
    "vgate_breaker_open": "max",  # open in any process
    "vgate_breaker_state": "max",  # each state some process is in
    "vgate_upstream_requests": "max",  # the backend's own queue, as each process last read it
    "vgate_backend_healthy": "min",  # healthy as every process sees it
    "vgate_redis_up": "min",  # up for every process
}

_SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


def parse(text: str) -> list[Metric]:
    """One process's OpenMetrics exposition (ending in `# EOF`)."""
    return list(text_string_to_metric_families(text))  # type: ignore[no-untyped-call]


def merge(processes: Sequence[Iterable[Metric]]) -> list[Metric]:
    """The families of several processes merged into one server's, in the order they first
    appear (so the output reads like one process's)."""
    merged: dict[str, Metric] = {}
    series: dict[str, dict[_SeriesKey, Sample]] = {}
    for families in processes:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type)
                into.unit = family.unit
                series[family.name] = {}
            rule = _rule(family)
            found = series[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                seen = found.get(key)
                found[key] = sample if seen is None else _combine(seen, sample, rule)
    for name, family in merged.items():
        family.samples = list(series[name].values())
    return list(merged.values())


def _rule(family: Metric) -> Rule:
    if family.type == "gauge":
        return GAUGE_RULES.get(family.name, "sum")
    return "sum"  # counters, histograms, and what else is counted


def _combine(a: Sample, b: Sample, rule: Rule) -> Sample:
    if a.name.endswith("_created"):
        value = min(a.value, b.value)  # the series exists since the first process made it
    elif rule == "max":
        value = max(a.value, b.value)
    elif rule == "min":
        value = min(a.value, b.value)
    else:
        value = a.value + b.value
    return Sample(a.name, a.labels, value, a.timestamp, _latest(a.exemplar, b.exemplar))


def _latest(a: Exemplar | None, b: Exemplar | None) -> Exemplar | None:
    if a is None or b is None:
        return a or b
    return b if _when(b) >= _when(a) else a


def _when(exemplar: Exemplar) -> float:
    # The parser gives a Timestamp (seconds and nanoseconds), or nothing.
    return 0.0 if exemplar.timestamp is None else float(exemplar.timestamp)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render(families: list[Metric], accept: str | None) -> tuple[bytes, str]:
    """Merged families as the scrape asked (`GatewayMetrics.exposition`'s formats):
    OpenMetrics with exemplars, or the text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
