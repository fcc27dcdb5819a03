"""A collector that is down is logged once a minute with a count, not once per failed batch."""

from __future__ import annotations

import asyncio
import logging
import time

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

from gateway.config import TracingConfig
from gateway.edge.record import RequestRecord
from gateway.edge.tracing import EXPORT_LOG_INTERVAL_S, OncePerInterval, Tracer
from tests.fake_upstream import ScriptedUpstream


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("otlp", logging.WARNING, __file__, 1, message, args, None)


def test_one_record_per_interval_and_the_rest_counted_into_the_next() -> None:
    now = [100.0]
    limiter = OncePerInterval(60.0, clock=lambda: now[0])
    assert limiter.filter(record("export failed: %s", "refused"))
    for second in range(1, 60):
        now[0] = 100.0 + second
        assert not limiter.filter(record("export failed: %s", "refused"))
    now[0] = 160.0
    passed = record("export failed: %s", "timed out")
    assert limiter.filter(passed)
    assert passed.getMessage() == (
        "export failed: timed out (and 59 more like it in the last 60s, not logged)"
    )
    now[0] = 161.0
    assert not limiter.filter(record("export failed"))
    now[0] = 220.0
    quiet = record("export failed")
    assert limiter.filter(quiet)
    assert quiet.getMessage() == "export failed (and 1 more like it in the last 60s, not logged)"


def test_the_tracer_limits_the_otlp_exporters_log_while_it_runs_only() -> None:
    exporter_logger = logging.getLogger(OTLPSpanExporter.__module__)
    before = list(exporter_logger.filters)
    tracer = Tracer(TracingConfig(enabled=True, endpoint="http://127.0.0.1:9/v1/traces"))
    (added,) = [f for f in exporter_logger.filters if f not in before]
    assert isinstance(added, OncePerInterval) and added.interval_s == EXPORT_LOG_INTERVAL_S
    tracer.shutdown()
    assert exporter_logger.filters == before


async def _blackhole(
    upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await asyncio.Event().wait()  # a collector that accepts and never answers


def test_shutdown_with_a_collector_that_never_answers_takes_one_export_timeout() -> None:
    """Each queued batch waited out the export timeout in turn, for up to the SDK's 30 s:
    a gateway stopping with a stalled collector outlived its orchestrator's grace period."""
    collector = ScriptedUpstream(_blackhole)
    config = TracingConfig(
        enabled=True,
        endpoint=collector.url + "/v1/traces",
        export_timeout_s=0.5,
        schedule_delay_s=60,
        max_queue_size=20_000,
    )
    tracer = Tracer(config)
    try:
        for number in range(20_000):  # 40 batches: 20 s of timeouts in a row
            request = RequestRecord(f"r{number}", 0.0, "POST", "/v1/chat/completions")
            tracer.begin({"headers": []}, request)
            tracer.end(request, 0.001)
        began = time.monotonic()
        tracer.shutdown()
        assert time.monotonic() - began < 10  # one export timeout, and a loaded machine's slack
    finally:
        collector.stop()


def test_a_queue_smaller_than_the_sdks_batch_is_a_valid_setting() -> None:
    """`tracing.max_queue_size` accepts 1 and up; below 512 the SDK refused to start
    (its export batch may not exceed the queue), and so did the gateway."""
    tracer = Tracer(
        TracingConfig(enabled=True, endpoint="http://127.0.0.1:9/v1/traces", max_queue_size=1)
    )
    tracer.shutdown()
