"""`GET /metrics`: the engine's counters under vLLM's Prometheus metric names and labels.

A collector reads the plain counters of `chaos.sim.engine` at scrape time, so requests never
touch a metric lock, and prometheus_client renders them as vLLM's are rendered.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chaos.sim.engine import ModelStats
from gateway.asgi import Receive, Scope, Send

__all__ = ["Metrics"]

_METRICS_TYPE = CONTENT_TYPE_LATEST.encode()


class Metrics:
    """The metrics endpoint of one worker, over its per-model counters."""

    __slots__ = ("_registry",)

    def __init__(self, stats: dict[str, ModelStats], created: float) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(stats, created))

    def render(self) -> bytes:
        """vLLM's metric names and labels, rendered by prometheus_client as vLLM's are."""
        return generate_latest(self._registry)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.render()
        headers = [(b"content-type", _METRICS_TYPE), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _Collector(Collector):
    """Reads the worker's plain counters at scrape time, so requests never touch a metric lock."""

    def __init__(self, stats: dict[str, ModelStats], created: float) -> None:
        self._stats = stats
        self._created = created

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "engine"]
        running = GaugeMetricFamily(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels=labels,
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            labels=labels,
        )
        prompt = CounterMetricFamily(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels=labels
        )
        generation = CounterMetricFamily(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels=labels
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*labels, "finished_reason"],
        )
        for name, stats in self._stats.items():
            values = [name, "0"]
            running.add_metric(values, stats.running)
            waiting.add_metric(values, stats.waiting)
            prompt.add_metric(values, stats.prompt_tokens, created=self._created)
            generation.add_metric(values, stats.generation_tokens, created=self._created)
            for reason, count in stats.finished.items():
                success.add_metric([*values, reason], count, created=self._created)
        yield from (running, waiting, prompt, generation, success)
