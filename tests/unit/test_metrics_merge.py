"""The merge of worker processes' expositions into one server's /metrics."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.edge import metrics_merge
from gateway.edge.metrics import GatewayMetrics
from gateway.runtime.peer_metrics import OPENMETRICS, PeerMetrics

TEXT = "text/plain"


def _process(requests: int, latency_s: float, *, trace: str | None = None) -> GatewayMetrics:
    metrics = GatewayMetrics(models=["m"], backends=["b"])
    for _ in range(requests):
        metrics.requests.labels("chat", "m", "200").inc()
        exemplar = {"trace_id": trace} if trace else None
        metrics.duration.labels("chat", "m").observe(latency_s, exemplar)
    return metrics


def _om(metrics: GatewayMetrics) -> str:
    return metrics.exposition(OPENMETRICS)[0].decode()


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text-format exposition, by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def _value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_one_process_merged_is_what_it_exposes() -> None:
    """With one process the merge changes nothing a scraper reads."""
    metrics = _process(3, 0.2)
    metrics.in_flight.set(4)
    merged = metrics_merge.merge([metrics_merge.parse(_om(metrics))])
    body, content_type = metrics_merge.render(merged, TEXT)
    assert content_type == metrics.exposition(TEXT)[1]
    assert _samples(body) == _samples(metrics.exposition(TEXT)[0])


def test_counters_and_histograms_are_summed_by_label_set() -> None:
    a, b = _process(3, 0.2), _process(5, 2.0)
    b.requests.labels("chat", "m", "429").inc(2)  # a label set only one process has
    merged = metrics_merge.merge([metrics_merge.parse(_om(a)), metrics_merge.parse(_om(b))])
    samples = _samples(metrics_merge.render(merged, TEXT)[0])
    assert _value(samples, "vgate_requests_total", endpoint="chat", model="m", status="200") == 8
    assert _value(samples, "vgate_requests_total", endpoint="chat", model="m", status="429") == 2
    bucket = "vgate_request_latency_seconds_bucket"
    assert _value(samples, bucket, endpoint="chat", model="m", le="0.25") == 3
    assert _value(samples, bucket, endpoint="chat", model="m", le="+Inf") == 8
    assert _value(samples, "vgate_request_latency_seconds_count", endpoint="chat", model="m") == 8
    total = _value(samples, "vgate_request_latency_seconds_sum", endpoint="chat", model="m")
    assert abs(total - (3 * 0.2 + 5 * 2.0)) < 1e-9
    # The legacy names are merged as the new ones are.
    assert _value(samples, "vgate_request_duration_seconds_count", endpoint="chat", model="m") == 8


def test_created_is_the_earliest() -> None:
    a, b = _process(1, 0.1), _process(1, 0.1)
    families = [metrics_merge.parse(_om(p)) for p in (b, a)]  # the later-made one first
    samples = _samples(metrics_merge.render(metrics_merge.merge(families), TEXT)[0])
    created = {
        p: _value(
            _samples(p.exposition(TEXT)[0]),
            "vgate_requests_created",
            endpoint="chat",
            model="m",
            status="200",
        )
        for p in (a, b)
    }
    merged = _value(samples, "vgate_requests_created", endpoint="chat", model="m", status="200")
    assert merged == min(created.values())


def test_gauges_follow_their_rule() -> None:
    a, b = _process(0, 0.1), _process(0, 0.1)
    a.in_flight.set(3)
    b.in_flight.set(4)
    a.breaker_changed("b", "closed", "open")  # open in one process: open for the server
    b.health_changed("b", False)  # unhealthy as one process sees it: not healthy
    a.redis_changed("limits", True)
    b.redis_changed("limits", False)
    merged = metrics_merge.merge([metrics_merge.parse(_om(a)), metrics_merge.parse(_om(b))])
    samples = _samples(metrics_merge.render(merged, TEXT)[0])
    assert _value(samples, "vgate_requests_in_flight") == 7
    assert _value(samples, "vgate_breaker_open", backend="b") == 1
    assert _value(samples, "vgate_breaker_state", backend="b", state="open") == 1
    assert _value(samples, "vgate_backend_healthy", backend="b") == 0
    assert _value(samples, "vgate_redis_up", component="limits") == 0


def _exemplar_at(metrics: GatewayMetrics, when: str) -> str:
    """The exposition with its exemplars' timestamps set to `when` (they are the clock's)."""
    return re.sub(r"(# \{[^}]*\} \S+) \S+$", rf"\1 {when}", _om(metrics), flags=re.M)


def test_exemplars_are_kept_the_latest_per_series() -> None:
    old = _exemplar_at(_process(1, 0.2, trace="0" * 31 + "1"), "1000.5")
    new = _exemplar_at(_process(1, 0.2, trace="0" * 31 + "2"), "2000.5")
    for order in ((old, new), (new, old)):
        merged = metrics_merge.merge([metrics_merge.parse(text) for text in order])
        body, content_type = metrics_merge.render(merged, OPENMETRICS)
        assert content_type.startswith("application/openmetrics-text")
        [line] = [
            x
            for x in body.decode().splitlines()
            if x.startswith("vgate_request_latency_seconds_bucket") and 'le="0.25"' in x
        ]
        assert line.endswith('{trace_id="' + "0" * 31 + '2"} 0.2 2000.500000000'), line


def test_a_sibling_that_does_not_answer_is_left_out_and_counted(tmp_path: Path) -> None:
    """Worker 0 asks worker 1 (serving) and worker 2 (no socket: dead, or restarting)."""
    mine, sibling = _process(2, 0.1), _process(5, 0.1)

    async def scrape() -> bytes:
        peers = [
            PeerMetrics(p.exposition, run_dir=str(tmp_path), index=i, workers=3, timeout_s=0.5)
            for i, p in enumerate((mine, sibling))
        ]
        await peers[1].start()
        try:
            return (await peers[0].exposition(TEXT))[0]
        finally:
            await peers[1].aclose()

    samples = _samples(asyncio.run(scrape()))
    assert _value(samples, "vgate_requests_total", endpoint="chat", model="m", status="200") == 7
    assert _value(samples, "vgate_worker_requests_total", worker="0") == 2
    assert _value(samples, "vgate_worker_requests_total", worker="1") == 5
    assert ("vgate_worker_requests_total", (("worker", "2"),)) not in samples
    assert _value(samples, "vgate_metrics_workers", state="answered") == 2
    assert _value(samples, "vgate_metrics_workers", state="missing") == 1
