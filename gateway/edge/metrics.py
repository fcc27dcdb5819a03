"""Prometheus metrics with bounded label sets.

Labels come only from configuration (model and backend names), fixed sets (endpoint), and
HTTP status codes. Prompts and request ids never become labels; a key's name (never the key)
labels only its limit refusals, and at most `KEY_LABELS` names do (then "other"). A config reload
extends the model and backend sets with the new config's names (`extend`): bounded by the
configs loaded over the process's life. Chaos experiments'
names, which an admin may add at run time, are bounded by the chaos core (at most 32 at a
time) and here again (`CHAOS_EXPERIMENT_LABELS` in all, then "other").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from gateway.config import LATENCY_BUCKETS, TPOT_BUCKETS, ChaosFaultKind
from gateway.edge.connections import ConnectionGuard
from gateway.edge.record import RequestRecord
from policies.admission import Admission
from policies.cache import LOOKUP_BUCKETS, WITHOUT_UPSTREAM, ResponseCache
from policies.limits import LimitStore
from policies.limits_local import LocalLimits
from policies.limits_redis import FailoverLimits
from policies.load import UpstreamLoad

_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
# Time per output token: a fast GPU's few milliseconds to a loaded CPU worker's second.
_ENDPOINTS = frozenset({"chat", "completions", "embeddings", "models"})
_REDIS_COMPONENTS = frozenset({"breaker", "cache", "limits"})  # what shares state through Redis
NONE = "none"
OTHER = "other"
CHAOS_FAULTS: frozenset[str] = frozenset(get_args(ChaosFaultKind))  # the fixed kinds
CHAOS_EXPERIMENT_LABELS = 64  # distinct experiment names counted over the process's life
KEY_LABELS = 500  # distinct key names whose limit refusals are counted apart, then "other"
ATTEMPT_RESULT_LABELS = 32  # distinct attempt results ("ok", error codes), then "other"
BREAKER_STATES = ("closed", "open", "half-open")  # pybreaker's state names
# A refusal by the key's own limits or quota (policies/limits.py), never an upstream's.
LIMIT_REFUSAL_CODES = frozenset(
    {
        "rate_limit_exceeded",
        "concurrency_limit_exceeded",
        "insufficient_quota",
        "rate_limits_unavailable",
    }
)
# Old name -> new name, for one deprecation period (served while metrics.legacy_names is on).
# The old `vgate_tokens_total{model,kind}` is the two new token counters under one name,
# kind="prompt" and kind="completion".
LEGACY_NAMES: dict[str, str] = {
    "vgate_request_duration_seconds": "vgate_request_latency_seconds",
    "vgate_time_to_first_token_seconds": "vgate_ttft_seconds",
    "vgate_tokens_total": "vgate_tokens_prompt_total, vgate_tokens_generated_total",
}


class _Children(NamedTuple):
    requests: Counter
    duration: Histogram
    overhead: Histogram
    ttft: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter


class GatewayMetrics:
    def __init__(
        self, models: Iterable[str], backends: Iterable[str], *, legacy_names: bool = True
    ) -> None:
        self.registry = CollectorRegistry()
        self._models = frozenset(models)
        self._backends = frozenset(backends)
        registry = self.registry
        self.requests = Counter(
            "vgate_requests",
            "Requests answered, by endpoint, model and status.",
            ["endpoint", "model", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "vgate_request_latency_seconds",
            "Time from request to the end of the response (exemplars: kept traces' ids).",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "vgate_ttft_seconds",
            "Time to the first streamed event (exemplars: kept traces' ids).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "vgate_tpot_seconds",
            "Time per output token of a stream after its first: (end - first token) / "
            "(completion tokens - 1), by model route and the backend that answered.",
            ["model", "backend"],
            buckets=TPOT_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "vgate_gateway_overhead_seconds",
            "The gateway's own time up to the response's start, excluding the upstream's.",
            ["endpoint"],
            buckets=_OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.upstream = Histogram(
            "vgate_upstream_duration_seconds",
            "Upstream time until the response (non-streaming) or the first event (streaming).",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "vgate_tokens_prompt",
            "Prompt (input) tokens reported by upstreams' usage, by model route.",
            ["model"],
            registry=registry,
        )
        self.generated_tokens = Counter(
            "vgate_tokens_generated",
            "Completion (output) tokens reported by upstreams' usage, by model route.",
            ["model"],
            registry=registry,
        )
        self.backend_attempts = Counter(
            "vgate_backend_attempts",
            "Upstream attempts, by backend and result: ok, or the error that ended it "
            "(upstream_timeout, upstream_unreachable, ...; an upstream's own 4xx is ok).",
            ["backend", "result"],
            registry=registry,
        )
        self.limit_refusals = Counter(
            "vgate_limit_refusals",
            "Requests refused by a key's own limits or quota, by the key's name and the "
            "refusal's code.",
            ["key", "code"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "vgate_requests_in_flight", "Requests being handled now.", registry=registry
        )
        self.retries = Counter(
            "vgate_retries", "Attempts retried, by model route.", ["model"], registry=registry
        )
        self.fallbacks = Counter(
            "vgate_fallbacks",
            "Requests passed on to a fallback model route.",
            ["from_model", "to_model"],
            registry=registry,
        )
        self.resumptions = Counter(
            "vgate_stream_resumptions",
            "Streams broken after their first byte and continued elsewhere, by model route, "
            "mode (prefill, regenerate) and outcome (resumed, failed, diverged).",
            ["model", "mode", "outcome"],
            registry=registry,
        )
        self.dropped_events = Counter(
            "vgate_stream_events_dropped",
            "Unparseable upstream stream events dropped instead of forwarded, by model route.",
            ["model"],
            registry=registry,
        )
        self.breaker_transitions = Counter(
            "vgate_breaker_transitions",
            "Circuit breaker state changes, by backend and new state.",
            ["backend", "state"],
            registry=registry,
        )
        self.breaker_open = Gauge(
            "vgate_breaker_open",
            "1 while a backend's circuit breaker is open or half-open.",
            ["backend"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            "vgate_breaker_state",
            "1 for a backend's circuit breaker's state now (closed, open, half-open), 0 for "
            "the others.",
            ["backend", "state"],
            registry=registry,
        )
        for backend in self._backends:
            self._set_breaker_state(backend, "closed")
        self.breaker_shared = Counter(
            "vgate_breaker_shared_updates",
            "Breaker states taken on from other gateway processes through Redis.",
            ["backend", "state"],
            registry=registry,
        )
        self.redis_outages = Counter(
            "vgate_redis_outages",
            "Episodes of Redis being unreachable, by the component that uses it.",
            ["component"],
            registry=registry,
        )
        self.redis_up = Gauge(
            "vgate_redis_up",
            "1 while Redis answers the component that uses it (absent without Redis configured).",
            ["component"],
            registry=registry,
        )
        self.backend_healthy = Gauge(
            "vgate_backend_healthy",
            "1 while a backend passes its active health checks.",
            ["backend"],
            registry=registry,
        )
        self._healthy_backends = set(self._backends)  # the backends in force now
        for backend in self._backends:
            self.backend_healthy.labels(backend).set(1)
        self.chaos_injections = Counter(
            "vgate_chaos_injected",
            "Faults injected by chaos experiments, by experiment and fault.",
            ["experiment", "fault"],
            registry=registry,
        )
        self._chaos_experiments: set[str] = set()
        self._keys: set[str] = set()
        self._attempt_results: set[str] = set()
        self._attempt_children: dict[tuple[str, str], Counter] = {}
        self._children: dict[tuple[str, str, int], _Children] = {}
        self._upstream_children: dict[str, Histogram] = {}
        self._tpot_children: dict[tuple[str, str], Histogram] = {}
        self.config_reloads = Counter(
            "vgate_config_reloads",
            "Config reloads (SIGHUP, the file changed, POST /admin/config/reload), by "
            "outcome: applied, or refused (the config in force stays).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("applied", "refused"):
            self.config_reloads.labels(outcome)
        self._limits = _LimitCollector([])
        registry.register(self._limits)
        self._queues = _UpstreamQueueCollector([])
        registry.register(self._queues)
        if legacy_names:
            registry.register(
                _LegacyNames(self.duration, self.ttft, self.prompt_tokens, self.generated_tokens)
            )

    def extend(self, models: Iterable[str], backends: Iterable[str]) -> None:
        """A config reload's names join the label sets; a backend gone no longer reports
        its health and breaker state (its other series stay, as counters do); a backend new
        (or back) starts healthy, its breaker closed, as a new Backend does."""
        backends = frozenset(backends)
        for gone in self._backends - backends:
            if gone in self._healthy_backends:
                self.backend_healthy.remove(gone)
                for state in BREAKER_STATES:
                    self.breaker_state.remove(gone, state)
                self._healthy_backends.discard(gone)
        for new in backends - self._healthy_backends:
            self.backend_healthy.labels(new).set(1)
            self._set_breaker_state(new, "closed")
            self._healthy_backends.add(new)
        self._models |= frozenset(models)
        self._backends |= backends

    def config_reloaded(self, applied: bool) -> None:
        self.config_reloads.labels("applied" if applied else "refused").inc()

    def observe(self, record: RequestRecord, end: float) -> None:
        endpoint = record.endpoint if record.endpoint in _ENDPOINTS else "other"
        model = record.model if record.model in self._models else NONE
        key = (endpoint, model, record.status)
        children = self._children.get(key)
        if children is None:
            # Resolved once per label combination: `.labels()` locks and hashes each time.
            children = self._children[key] = _Children(
                self.requests.labels(endpoint, model, str(record.status)),
                self.duration.labels(endpoint, model),
                self.overhead.labels(endpoint),
                self.ttft.labels(model),
                self.prompt_tokens.labels(model),
                self.generated_tokens.labels(model),
            )
        children.requests.inc()
        trace = record.trace
        if trace is not None and trace[3]:  # sampled, or kept at its end: exported
            exemplar = {"trace_id": f"{trace[0]:032x}"}
            children.duration.observe(end - record.start, exemplar)
            if record.ttft_s is not None:
                children.ttft.observe(record.ttft_s, exemplar)
        else:
            children.duration.observe(end - record.start)
            if record.ttft_s is not None:
                children.ttft.observe(record.ttft_s)
        if record.response_started is not None:
            children.overhead.observe(record.own_s(record.response_started))
        # An answer from the cache, or shared with an identical request, cost no upstream
        # tokens or time of its own: its (original) usage is not counted again.
        upstream_answered = record.cache not in WITHOUT_UPSTREAM
        if record.prompt_tokens and upstream_answered:
            children.prompt_tokens.inc(record.prompt_tokens)
        if record.completion_tokens and upstream_answered:
            children.completion_tokens.inc(record.completion_tokens)
        if record.dropped_events:
            self.dropped_events.labels(model).inc(record.dropped_events)
        for attempt in record.tried:
            self._count_attempt(attempt.backend, attempt.result)
        if record.error in LIMIT_REFUSAL_CODES and not record.attempts and record.caller:
            self._count_refusal(record.caller, record.error)
        backend = record.backend
        ttft, generated = record.ttft_s, record.completion_tokens
        if ttft is not None and generated is not None and generated > 1 and upstream_answered:
            self._observe_tpot(model, backend, (end - record.start - ttft) / (generated - 1))
        if backend is not None and record.upstream_s is not None:
            upstream = self._upstream_children.get(backend)
            if upstream is None and backend in self._backends:
                upstream = self._upstream_children[backend] = self.upstream.labels(backend)
            if upstream is not None:
                upstream.observe(record.backend_s)

    def _count_attempt(self, backend: str, result: str) -> None:
        key = (backend, result)
        child = self._attempt_children.get(key)
        if child is None:
            if backend not in self._backends:
                return
            known = self._attempt_results
            if result not in known:
                if len(known) >= ATTEMPT_RESULT_LABELS:
                    result = OTHER
                else:
                    known.add(result)
            child = self._attempt_children[key] = self.backend_attempts.labels(backend, result)
        child.inc()

    def _count_refusal(self, key: str, code: str) -> None:
        known = self._keys
        if key not in known:
            if len(known) >= KEY_LABELS:
                key = OTHER
            else:
                known.add(key)
        self.limit_refusals.labels(key, code).inc()

    def _set_breaker_state(self, backend: str, state: str) -> None:
        for each in BREAKER_STATES:
            self.breaker_state.labels(backend, each).set(1 if each == state else 0)

    def _observe_tpot(self, model: str, backend: str | None, seconds: float) -> None:
        name = backend if backend in self._backends else NONE
        key = (model, name)
        child = self._tpot_children.get(key)
        if child is None:
            child = self._tpot_children[key] = self.tpot.labels(model, name)
        child.observe(max(seconds, 0.0))

    def stream_resumed(self, model: str, mode: str, outcome: str) -> None:
        if model in self._models:
            self.resumptions.labels(model, mode, outcome).inc()

    def chaos_injected(self, experiment: str, fault: str) -> None:
        """One fault injected (chaos's `on_injected`); called on the attempt's own path."""
        known = self._chaos_experiments
        if experiment not in known:
            if len(known) >= CHAOS_EXPERIMENT_LABELS:
                experiment = OTHER
            else:
                known.add(experiment)
        self.chaos_injections.labels(experiment, fault if fault in CHAOS_FAULTS else OTHER).inc()

    def breaker_changed(self, backend: str, old: str, new: str) -> None:
        if backend in self._backends:
            self.breaker_transitions.labels(backend, new).inc()
            self.breaker_open.labels(backend).set(0 if new == "closed" else 1)
            if new in BREAKER_STATES:
                self._set_breaker_state(backend, new)

    def breaker_applied(self, backend: str, state: str) -> None:
        if backend in self._backends:
            self.breaker_shared.labels(backend, state).inc()

    def redis_changed(self, component: str, up: bool) -> None:
        if component in _REDIS_COMPONENTS:
            self.redis_up.labels(component).set(1 if up else 0)
            if not up:
                self.redis_outages.labels(component).inc()

    def watch_admission(self, admission: Admission) -> None:
        """Admission's own counters, read at scrape time: nothing on the hot path."""
        self.registry.register(_AdmissionCollector(admission))

    def watch_connections(self, guard: ConnectionGuard) -> None:
        """Client connections open and closed by a bound (edge.connections), at scrape time."""
        self.registry.register(_ConnectionCollector(guard))

    def watch_limits(self, store: LimitStore) -> None:
        """The per-key limit store's own counters, read at scrape time: this process's
        (`LocalLimits`), and with Redis what was decided without it (`FailoverLimits`)."""
        if isinstance(store, FailoverLimits):
            self.registry.register(_LimitStoreCollector(store.local, store))
        elif isinstance(store, LocalLimits):
            self.registry.register(_LimitStoreCollector(store, None))

    def watch_cache(self, cache: ResponseCache) -> None:
        """The response cache's own counters and its store's size, read at scrape time."""
        self.registry.register(_CacheCollector(cache))

    def watch_concurrency_limits(self, limits: Iterable[tuple[str, Callable[[], int]]]) -> None:
        """Each backend's concurrency limit in force, read at scrape time (per backend name);
        called again after a config reload, with the backends in force then."""
        self._limits.limits = [(name, limit) for name, limit in limits if name in self._backends]

    def watch_upstream_queues(self, loads: Iterable[tuple[str, UpstreamLoad]]) -> None:
        """What each backend's vLLM last said it runs and queues (load_scrape), read at
        scrape time; called again after a config reload, with the backends in force then."""
        self._queues.loads = [(name, load) for name, load in loads if name in self._backends]

    def health_changed(self, backend: str, healthy: bool) -> None:
        if backend in self._healthy_backends:
            self.backend_healthy.labels(backend).set(1 if healthy else 0)

    def render(self) -> bytes:
        """The Prometheus text format (0.0.4): no exemplars."""
        return generate_latest(self.registry)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The body and its content type for a scrape's Accept header: OpenMetrics (with
        exemplars) when the scraper asks for it, as Prometheus does, else the text format."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _LegacyNames(Collector):
    """The renamed families under their old names (LEGACY_NAMES), copied at scrape time
    from the new ones' samples, exemplars left out (the new names carry them)."""

    def __init__(
        self, duration: Histogram, ttft: Histogram, prompt: Counter, generated: Counter
    ) -> None:
        self._renamed = (
            (duration, "vgate_request_duration_seconds"),
            (ttft, "vgate_time_to_first_token_seconds"),
        )
        self._tokens = ((prompt, "prompt"), (generated, "completion"))

    def collect(self) -> Iterator[Metric]:
        for current, old in self._renamed:
            for family in current.collect():
                legacy = Metric(old, f"Deprecated: renamed {family.name}.", family.type)
                legacy.samples = [
                    Sample(
                        old + sample.name[len(family.name) :],
                        sample.labels,
                        sample.value,
                        sample.timestamp,
                    )
                    for sample in family.samples
                ]
                yield legacy
        tokens = Metric(
            "vgate_tokens",
            "Deprecated: vgate_tokens_prompt_total (kind=prompt) and "
            "vgate_tokens_generated_total (kind=completion).",
            "counter",
        )
        for counter, kind in self._tokens:
            for family in counter.collect():
                tokens.samples += [
                    Sample(
                        "vgate_tokens" + sample.name[len(family.name) :],
                        {**sample.labels, "kind": kind},
                        sample.value,
                        sample.timestamp,
                    )
                    for sample in family.samples
                ]
        yield tokens


class _ConnectionCollector(Collector):
    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "vgate_connections_open", "Client connections open.", self._guard.open_connections
        )
        rejected = CounterMetricFamily(
            "vgate_connections_rejected",
            "Client connections closed by a bound of server: config, by the bound.",
            labels=["reason"],
        )
        for reason, count in self._guard.rejected.items():
            rejected.add_metric([reason], count)
        yield rejected


class _AdmissionCollector(Collector):
    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def collect(self) -> Iterator[Metric]:
        admission = self._admission
        yield GaugeMetricFamily(
            "vgate_admission_in_flight", "Requests holding an admission slot.", admission.in_flight
        )
        yield GaugeMetricFamily(
            "vgate_admission_waiting", "Requests waiting for an admission slot.", admission.waiting
        )
        shed = CounterMetricFamily("vgate_shed", "Requests shed by admission.", labels=["reason"])
        shed.add_metric(["queue_full"], admission.shed_full)
        shed.add_metric(["queue_timeout"], admission.shed_timeout)
        yield shed


class _LimitStoreCollector(Collector):
    def __init__(self, local: LocalLimits, shared: FailoverLimits | None) -> None:
        self._local = local
        self._shared = shared

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "vgate_limits_evicted_active",
            "Keys' limit states this process dropped while they still counted something "
            "(more keys active at once than limits.local_max_keys).",
            self._local.evicted_active,
        )
        shared = self._shared
        if shared is None:
            return
        without = CounterMetricFamily(
            "vgate_limits_without_redis",
            "Requests decided while Redis did not answer, by limits.redis_failure: open (by "
            "this process's own limits) or closed (refused with 503).",
            labels=["mode"],
        )
        without.add_metric(["open"], shared.degraded_admits)
        without.add_metric(["closed"], shared.unavailable_refusals)
        yield without
        lost = CounterMetricFamily(
            "vgate_limits_settles_lost",
            "Settles that never reached Redis (their slots are freed when their leases "
            "end), by reason: dropped (too many pending) or failed (past their deadline).",
            labels=["reason"],
        )
        lost.add_metric(["dropped"], shared.dropped_settles)
        lost.add_metric(["failed"], shared.lost_settles)
        yield lost
        yield GaugeMetricFamily(
            "vgate_limits_settles_pending",
            "Settles queued or in flight to Redis.",
            shared.pending_settles,
        )


class _CacheCollector(Collector):
    def __init__(self, cache: ResponseCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        cache = self._cache
        families = {
            result: CounterMetricFamily(
                f"vgate_cache_{name}",
                f"Cacheable requests {what}, by model route.",
                labels=["model"],
            )
            for result, name, what in (
                ("hit", "hits", "answered from the response cache"),
                ("miss", "misses", "not found in the response cache (sent upstream)"),
                ("coalesced", "coalesced", "that shared an identical request's upstream call"),
            )
        }
        for (result, route), count in list(cache.counts.items()):
            families[result].add_metric([route], count)
        yield from families.values()
        bypasses = CounterMetricFamily(
            "vgate_cache_bypasses",
            "Requests that bypassed the response cache, by reason (not_deterministic, "
            "no_store, not_cacheable, unavailable: the store did not answer in time).",
            labels=["reason"],
        )
        for reason, count in cache.bypasses.items():
            bypasses.add_metric([reason], count)
        yield bypasses
        yield CounterMetricFamily(
            "vgate_cache_stored", "Answers handed to the response cache's store.", cache.stored
        )
        yield CounterMetricFamily(
            "vgate_cache_evictions",
            "Entries dropped from this process's cache to make room (memory backend).",
            cache.store.evictions,
        )
        buckets, total = [], 0
        for bound, count in zip((*LOOKUP_BUCKETS, float("inf")), cache.lookup_counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else str(bound), total))
        yield HistogramMetricFamily(
            "vgate_cache_lookup_seconds",
            "Time to look an answer up in the response cache's store (a Redis round trip).",
            buckets=buckets,
            sum_value=cache.lookup_sum_s,
        )
        size = cache.store.size()
        if size is not None:
            yield GaugeMetricFamily(
                "vgate_cache_entries", "Entries in this process's response cache.", size[0]
            )
            yield GaugeMetricFamily(
                "vgate_cache_bytes", "Bytes of answers in this process's response cache.", size[1]
            )


class _UpstreamQueueCollector(Collector):
    def __init__(self, loads: list[tuple[str, UpstreamLoad]]) -> None:
        self.loads = loads

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "vgate_upstream_requests",
            "Requests a backend's vLLM said it has running (in its batch) and waiting (queued), "
            "from its own /metrics (load_scrape); absent without a recent report.",
            labels=["backend", "state"],
        )
        for name, load in self.loads:
            report = load.report
            if report is not None:
                gauge.add_metric([name, "running"], report.running)
                gauge.add_metric([name, "waiting"], report.waiting)
        yield gauge


class _LimitCollector(Collector):
    def __init__(self, limits: list[tuple[str, Callable[[], int]]]) -> None:
        self.limits = limits

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "vgate_backend_concurrency_limit",
            "Requests a backend may have in flight now: its adaptive limit where "
            "adaptive_concurrency is enabled, otherwise its static max_in_flight.",
            labels=["backend"],
        )
        for name, limit in self.limits:
            gauge.add_metric([name], limit())
        yield gauge
