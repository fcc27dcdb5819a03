"""The spans a finished request makes, from its record: attempts as children on the
request's clock, and which requests the ratio left out are kept at the end."""

from __future__ import annotations

import io
from collections.abc import Iterator

import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.config import TracingConfig
from gateway.edge.accesslog import AccessLog
from gateway.edge.record import RequestRecord
from gateway.edge.tracing import Tracer
from gateway.router.outcome import AttemptRecord, RedisCall

START = 1000.0  # the request's perf_counter start


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    yield InMemorySpanExporter()


def finished(
    exporter: InMemorySpanExporter, *records: tuple[RequestRecord, float], **config: object
) -> list[ReadableSpan]:
    """The spans exported for `records` (each with its end) by a tracer of `config`."""
    tracer = Tracer(TracingConfig(enabled=True, **config), exporter=exporter)  # type: ignore[arg-type]
    for record, end in records:
        tracer.end(record, end)
    tracer.shutdown()
    return list(exporter.get_finished_spans())


def request(
    headers: list[tuple[bytes, bytes]] | None = None, *, ratio: float = 1.0
) -> RequestRecord:
    record = RequestRecord("r1", START, "POST", "/v1/chat/completions")
    record.endpoint = "chat"
    record.model = "m"
    tracer = Tracer(TracingConfig(enabled=True, sample_ratio=ratio), InMemorySpanExporter())
    tracer.begin({"headers": headers or []}, record)
    tracer.shutdown()
    return record


def attempt(
    backend: str, start: float, end: float, result: str = "ok", status: int | None = 200
) -> AttemptRecord:
    tried = AttemptRecord("m", backend, START + start)
    tried.first_byte = None if status is None else START + start + 0.01
    tried.status = status
    tried.end = START + end
    if result != "ok":
        tried.failed(result)
    return tried


def test_a_resumed_stream_shows_each_attempt_on_the_requests_clock(
    exporter: InMemorySpanExporter,
) -> None:
    record = request()
    record.status, record.stream = 200, True
    broken = attempt("w1", 0.1, 0.5, "upstream_stream_broken")
    broken.first_token = START + 0.2
    resumed = attempt("w2", 0.5, 0.9)
    resumed.resumption = "prefill"
    record.tried = [broken, resumed]
    spans = finished(exporter, (record, START + 1.0))
    span, *attempts = spans  # the request's first
    assert span.kind is SpanKind.SERVER and len(attempts) == 2
    assert span.start_time is not None
    offsets = [
        (
            (child.start_time or 0) - span.start_time,
            (child.end_time or 0) - span.start_time,
        )
        for child in attempts
    ]
    assert offsets == [(100_000_000, 500_000_000), (500_000_000, 900_000_000)]
    assert span.end_time == span.start_time + 1_000_000_000
    first, second = attempts
    assert first.parent is not None and first.parent.span_id == span.context.span_id
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["vgate.attempt.outcome"] == "upstream_stream_broken"
    assert [(e.name, e.timestamp - span.start_time) for e in first.events] == [
        ("vgate.first_byte", 110_000_000),
        ("vgate.first_token", 200_000_000),
    ]
    assert second.status.status_code is StatusCode.UNSET
    assert second.attributes["vgate.resumption"] == "prefill"
    assert second.attributes["vgate.attempt"] == 2
    assert "vgate.resumption" not in first.attributes
    assert {child.name for child in attempts} == {"chat m"}
    assert {child.attributes["vgate.request_id"] for child in attempts} == {"r1"}  # type: ignore[index]
    assert len({child.context.span_id for child in attempts}) == 2


def test_calls_to_redis_are_spans_of_their_own_on_the_requests_clock(
    exporter: InMemorySpanExporter,
) -> None:
    record = request()
    record.status = 200
    record.redis_calls = [
        RedisCall("limits", "EVALSHA", START + 0.010, START + 0.012),
        RedisCall("cache", "GET", START + 0.020, START + 0.070, failed=True),
    ]
    record.tried = [attempt("w1", 0.1, 0.5)]
    span, *children = finished(exporter, (record, START + 1.0))
    assert span.start_time is not None
    calls = [
        child for child in children if child.kind is SpanKind.CLIENT and child.name != "chat m"
    ]
    assert [c.name for c in calls] == ["EVALSHA limits", "GET cache"]
    assert [
        ((c.start_time or 0) - span.start_time, (c.end_time or 0) - span.start_time) for c in calls
    ] == [
        (10_000_000, 12_000_000),
        (20_000_000, 70_000_000),
    ]
    limits, cache = calls
    assert limits.parent is not None and limits.parent.span_id == span.context.span_id
    assert limits.attributes is not None and cache.attributes is not None
    assert limits.attributes["db.system.name"] == "redis"
    assert limits.attributes["vgate.redis.purpose"] == "limits"
    assert limits.status.status_code is StatusCode.UNSET
    assert cache.status.status_code is StatusCode.ERROR  # Redis did not answer in time
    assert cache.attributes["error.type"] == "redis_unavailable"


@pytest.mark.parametrize(
    ("status", "error", "took_s", "kept"),
    [
        (200, None, 0.1, False),  # fast and fine: the ratio's decision stands
        (503, "no_live_backend", 0.1, True),
        (200, "upstream_stream_broken", 0.1, True),  # a stream broken off after its 200
        (400, "invalid_request_error", 0.1, False),  # the client's error
        (499, "client_disconnected", 0.1, False),
        (200, None, 2.5, True),  # slow
    ],
)
def test_a_request_the_ratio_left_out_is_kept_if_it_failed_or_was_slow(
    exporter: InMemorySpanExporter, status: int, error: str | None, took_s: float, kept: bool
) -> None:
    record = request(ratio=0.0)
    assert record.traceparent is not None and record.traceparent.endswith(b"-00")
    record.status, record.error = status, error
    record.tried = [attempt("w1", 0.0, took_s)]
    spans = finished(exporter, (record, START + took_s), sample_ratio=0.0, keep_slow_s=2.0)
    assert len(spans) == (2 if kept else 0)
    if kept:
        trace_id = int(record.traceparent[3:35], 16)
        assert {span.context.trace_id for span in spans} == {trace_id}
        request_span = spans[0]
        assert request_span.end_time is not None and request_span.start_time is not None
        assert request_span.end_time - request_span.start_time == round(took_s * 1e9)


def test_slow_requests_are_not_kept_with_keep_slow_s_off(exporter: InMemorySpanExporter) -> None:
    record = request(ratio=0.0)
    record.status = 200
    assert finished(exporter, (record, START + 60), sample_ratio=0.0, keep_slow_s=None) == []


def test_a_caller_that_said_not_sampled_is_obeyed_even_for_an_error(
    exporter: InMemorySpanExporter,
) -> None:
    parent = b"00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    record = request([(b"traceparent", parent)])
    record.status = 503
    assert finished(exporter, (record, START + 0.1)) == []


def test_the_access_log_names_the_trace_of_a_traced_request_only() -> None:
    traced, untraced = request(), request(ratio=0.0)
    log = io.BytesIO()
    access = AccessLog(log)
    access.write(traced, START + 0.1)
    access.write(untraced, START + 0.1)
    access.flush()
    first, second = (orjson.loads(line) for line in log.getvalue().splitlines())
    assert traced.trace is not None
    assert first["trace_id"] == f"{traced.trace[0]:032x}" and len(first["trace_id"]) == 32
    assert "trace_id" not in second


def test_a_request_kept_at_its_end_names_its_trace_in_a_log_written_after(
    exporter: InMemorySpanExporter,
) -> None:
    record = request(ratio=0.0)
    record.status = 502
    finished(exporter, (record, START + 0.1), sample_ratio=0.0)
    log = io.BytesIO()
    access = AccessLog(log)
    access.write(record, START + 0.1)
    access.flush()
    assert record.traceparent is not None
    assert orjson.loads(log.getvalue())["trace_id"] == record.traceparent[3:35].decode()
