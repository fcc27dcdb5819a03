"""Request traces over OTLP: one span per request, one child span per upstream attempt.

The request's span (SERVER) carries OpenTelemetry's GenAI attributes (`gen_ai.*`) beside
vgate's own, its routing decisions as events; each attempt the router made is a CLIENT
span under it, named as GenAI client spans are ("{gen_ai.operation.name} {route}"), with
its backend, upstream status, result, and its first byte and first token as events.

Every span is built when the request ends, from the facts its record collected (the router
notes each attempt as a few clock readings), and handed to OpenTelemetry's batch processor:
nothing is timed, entered or exited on the hot path. Ids are chosen when the request
starts, so the `traceparent` sent upstream names the request's span and a traced
`vllm serve` continues the trace.

Sampling: an incoming W3C `traceparent` is honoured (its trace goes on, its decision is
kept); otherwise `sample_ratio` decides at the start, and a request it left out is still
exported at the end if it failed (a 5xx, a stream broken off) or took longer than
`keep_slow_s`. Such a request told its upstream "not sampled", so a traced upstream's own
spans are missing from it. Export runs on the processor's own thread with a bounded queue:
a slow or absent collector drops spans (the SDK counts them), never delays a request.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from gateway.asgi import Scope
from gateway.config import TracingConfig
from gateway.edge.record import RequestRecord
from gateway.router.outcome import AttemptRecord, RedisCall
from gateway.wire.validation import ProxyRequest

logger = logging.getLogger("vgate.tracing")

_TRACEPARENT = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_SCOPE = InstrumentationScope("vgate")
_EXPORT_BATCH = 512  # spans per export, the SDK's default
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
# GenAI's gen_ai.operation.name for each endpoint (RequestRecord.endpoint).
_OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}
# The request's parameters GenAI names, where the client set them.
_PARAMETERS = (
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("max_completion_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
    ("frequency_penalty", "gen_ai.request.frequency_penalty"),
    ("presence_penalty", "gen_ai.request.presence_penalty"),
    ("seed", "gen_ai.request.seed"),
    ("n", "gen_ai.request.choice.count"),
)


# While a collector is down the OTLP exporter logs every failed batch, several a second
# under load; its operators need to hear it once a minute, with a count, not each time.
EXPORT_LOG_INTERVAL_S = 60.0


class OncePerInterval(logging.Filter):
    """Passes one record per `interval_s` and counts the rest into the next one it passes."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        self._next = float("-inf")
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.interval_s
        if self.suppressed:
            record.msg = (
                f"{record.getMessage()} (and {self.suppressed} more like it in the "
                f"last {self.interval_s:g}s, not logged)"
            )
            record.args = None
            self.suppressed = 0
        return True


class Tracer:
    __slots__ = (
        "_flush_s",
        "_keep_slow_s",
        "_log_filter",
        "_processor",
        "_random",
        "_ratio",
        "_resource",
    )

    def __init__(self, config: TracingConfig, exporter: SpanExporter | None = None) -> None:
        self._log_filter: tuple[logging.Logger, OncePerInterval] | None = None
        if exporter is None:
            exporter = OTLPSpanExporter(endpoint=config.endpoint, timeout=config.export_timeout_s)
            exporter_logger = logging.getLogger(OTLPSpanExporter.__module__)
            log_filter = OncePerInterval(EXPORT_LOG_INTERVAL_S)
            exporter_logger.addFilter(log_filter)
            self._log_filter = (exporter_logger, log_filter)
        self._processor = BatchSpanProcessor(
            exporter,
            max_queue_size=config.max_queue_size,
            # The SDK's batch (512) may not exceed the queue: a small queue was a crash.
            max_export_batch_size=min(_EXPORT_BATCH, config.max_queue_size),
            schedule_delay_millis=config.schedule_delay_s * 1000,
            export_timeout_millis=config.export_timeout_s * 1000,
        )
        self._flush_s = config.export_timeout_s
        self._resource = Resource.create({"service.name": config.service_name})
        self._ratio = config.sample_ratio
        self._keep_slow_s = config.keep_slow_s
        self._random = random.Random()

    def begin(self, scope: Scope, record: RequestRecord) -> None:
        """Decide whether `record`'s request is traced and name its span."""
        incoming = None
        for key, value in scope["headers"]:
            if key == b"traceparent":
                incoming = _TRACEPARENT.fullmatch(value.strip().lower())
                break
        if incoming is not None:
            trace_id = int(incoming[1], 16)
            parent_id = int(incoming[2], 16)
            sampled = bool(int(incoming[3], 16) & 1)
            if not trace_id or not parent_id:
                incoming, sampled = None, False
        if incoming is None:
            trace_id, parent_id = self._random.getrandbits(128) or 1, 0
            sampled = self._random.random() < self._ratio
        span_id = self._random.getrandbits(64) or 1
        flags = b"01" if sampled else b"00"
        record.traceparent = b"00-%032x-%016x-%s" % (trace_id, span_id, flags)
        if sampled:
            record.trace = (trace_id, span_id, parent_id, time.time_ns())
        elif incoming is None:
            # Left out by the ratio: the end decides whether it is kept after all.
            record.trace = (trace_id, span_id, 0, 0)

    def end(self, record: RequestRecord, end: float) -> None:
        """Hand the finished request's spans to the exporter (`end`: its perf_counter end)."""
        if record.trace is None:
            return
        trace_id, span_id, parent_id, start_ns = record.trace
        if not start_ns:
            if not self._keeps(record, end):
                return
            start_ns = time.time_ns() - round((end - record.start) * 1e9)
            record.trace = (trace_id, span_id, parent_id, start_ns)  # the log names it too
        context = SpanContext(trace_id, span_id, False, _SAMPLED)
        parent = None
        if parent_id:
            parent = SpanContext(trace_id, parent_id, True, _SAMPLED)
        end_ns = start_ns + round((end - record.start) * 1e9)
        chaos = record.chaos or ()
        failed = record.status >= 500 or (record.error is not None and record.status != 499)
        span = ReadableSpan(
            name=f"{record.method} {record.path}",
            context=context,
            parent=parent,
            resource=self._resource,
            attributes=_attributes(record),
            events=[
                *(
                    Event("vgate.route.decision", _decision_attributes(d.to_json()), start_ns)
                    for d in record.decisions
                ),
                *(Event("vgate.chaos.injected", _chaos_attributes(i), start_ns) for i in chaos),
            ],
            kind=SpanKind.SERVER,
            status=Status(StatusCode.ERROR, record.error) if failed else Status(StatusCode.UNSET),
            start_time=start_ns,
            end_time=end_ns,
            instrumentation_scope=_SCOPE,
        )
        processor = self._processor
        processor.on_end(span)  # first: a search by request id finds the request's span first
        if record.tried:
            operation = _OPERATIONS.get(record.endpoint or "", record.endpoint or "")
            for number, attempt in enumerate(record.tried, 1):
                processor.on_end(
                    self._attempt_span(
                        record, attempt, number, operation, context, start_ns, end_ns
                    )
                )
        for call in record.redis_calls or ():
            processor.on_end(self._redis_span(record, call, context, start_ns, end_ns))

    def _keeps(self, record: RequestRecord, end: float) -> bool:
        """Whether a request the ratio left out is exported all the same: it failed (a 5xx,
        or a stream broken off after its 200), or it was slow."""
        if record.status >= 500 or (record.error is not None and record.status < 400):
            return True
        slow = self._keep_slow_s
        return slow is not None and end - record.start > slow

    def _attempt_span(
        self,
        record: RequestRecord,
        attempt: AttemptRecord,
        number: int,
        operation: str,
        parent: SpanContext,
        start_ns: int,
        end_ns: int,
    ) -> ReadableSpan:
        """One upstream attempt as a child of the request's span, on its clock: its
        perf_counter readings are offsets from the request's start (`start_ns`)."""
        wall = _on_the_requests_clock(record.start, start_ns, end_ns)

        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": attempt.route,
            "vgate.request_id": record.request_id,
            "vgate.route": attempt.route,
            "vgate.backend": attempt.backend,
            "vgate.attempt": number,
            "vgate.attempt.outcome": attempt.result,
        }
        events = []
        if attempt.status is not None:
            attributes["http.response.status_code"] = attempt.status
        if attempt.first_byte is not None:
            attributes["vgate.ttfb_s"] = attempt.first_byte - attempt.start
            events.append(Event("vgate.first_byte", {}, wall(attempt.first_byte)))
        if attempt.first_token is not None:
            attributes["vgate.ttft_s"] = attempt.first_token - attempt.start
            events.append(Event("vgate.first_token", {}, wall(attempt.first_token)))
        if attempt.resumption is not None:
            attributes["vgate.resumption"] = attempt.resumption
        ok = attempt.result == "ok"
        if not ok:
            attributes["error.type"] = attempt.result
        return ReadableSpan(
            name=f"{operation} {attempt.route}",
            context=SpanContext(
                parent.trace_id, self._random.getrandbits(64) or 1, False, _SAMPLED
            ),
            parent=parent,
            resource=self._resource,
            attributes=attributes,
            events=events,
            kind=SpanKind.CLIENT,
            status=Status(StatusCode.UNSET) if ok else Status(StatusCode.ERROR, attempt.result),
            start_time=wall(attempt.start),
            end_time=end_ns if attempt.end is None else wall(attempt.end),
            instrumentation_scope=_SCOPE,
        )

    def _redis_span(
        self,
        record: RequestRecord,
        call: RedisCall,
        parent: SpanContext,
        start_ns: int,
        end_ns: int,
    ) -> ReadableSpan:
        """A call to Redis (the limits' admission, the cache's lookup) as a child of the
        request's span, named as OpenTelemetry's database conventions name it."""
        wall = _on_the_requests_clock(record.start, start_ns, end_ns)

        attributes: dict[str, Any] = {
            "db.system.name": "redis",
            "db.operation.name": call.operation,
            "vgate.request_id": record.request_id,
            "vgate.redis.purpose": call.purpose,
        }
        if call.failed:
            attributes["error.type"] = "redis_unavailable"
        return ReadableSpan(
            name=f"{call.operation} {call.purpose}",
            context=SpanContext(
                parent.trace_id, self._random.getrandbits(64) or 1, False, _SAMPLED
            ),
            parent=parent,
            resource=self._resource,
            attributes=attributes,
            kind=SpanKind.CLIENT,
            status=Status(StatusCode.ERROR, "redis_unavailable")
            if call.failed
            else Status(StatusCode.UNSET),
            start_time=wall(call.start),
            end_time=wall(call.end),
            instrumentation_scope=_SCOPE,
        )

    def shutdown(self) -> None:
        """Flush what is queued and stop the worker, within the export timeout.

        The SDK's own shutdown exports every queued batch, each bounded by the export
        timeout, and waits up to 30 s for them: a slow collector would hold the gateway's
        exit that long. Past the bound, what is left is dropped (its thread is a daemon).
        """
        flush = threading.Thread(
            target=self._processor.shutdown, name="vgate-tracing-flush", daemon=True
        )
        flush.start()
        flush.join(self._flush_s)
        if flush.is_alive():
            logger.warning(
                "tracing: spans not exported within %gs of shutting down were dropped",
                self._flush_s,
            )
        if self._log_filter is not None:
            exporter_logger, log_filter = self._log_filter
            exporter_logger.removeFilter(log_filter)


def _on_the_requests_clock(start: float, start_ns: int, end_ns: int) -> Callable[[float], int]:
    """A perf_counter reading of the request's as wall-clock nanoseconds, within its span."""

    def wall(at: float) -> int:
        return min(max(start_ns + round((at - start) * 1e9), start_ns), end_ns)

    return wall


def _attributes(record: RequestRecord) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": record.method,
        "url.path": record.path,
        "http.response.status_code": record.status,
        "vgate.request_id": record.request_id,
        "vgate.attempts": record.attempts,
        "vgate.stream": record.stream,
    }
    request = record.request
    operation = _OPERATIONS.get(record.endpoint or "")
    optional = {
        "enduser.id": record.caller,
        "gen_ai.operation.name": operation,
        # What the client asked for (a name or an alias), and the route that answered.
        "gen_ai.request.model": record.model if request is None else request.model,
        "gen_ai.response.model": record.model if record.status == 200 else None,
        "vgate.backend": record.backend,
        "vgate.fallback_from": record.fallback_from,
        "gen_ai.usage.input_tokens": record.prompt_tokens,
        "gen_ai.usage.output_tokens": record.completion_tokens,
        "vgate.ttft_s": record.ttft_s,
        "vgate.upstream_s": record.upstream_s,
        "vgate.wait_s": record.waited_s or None,
        "error.type": record.error,
    }
    attributes.update((key, value) for key, value in optional.items() if value is not None)
    if record.resumptions:
        attributes["vgate.resumptions"] = record.resumptions
    if request is not None:
        _add_parameters(attributes, request)
    return attributes


def _add_parameters(attributes: dict[str, Any], request: ProxyRequest) -> None:
    """The request parameters GenAI names, those the client set, as they were routed."""
    payload = request.payload
    for field, name in _PARAMETERS:
        value = payload.get(field)
        # A number, not a bool (JSON's true is Python's 1): anything else was refused
        # before routing or is the upstream's to refuse, and says nothing here.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            attributes[name] = value
    stop = payload.get("stop")
    if isinstance(stop, str):
        attributes["gen_ai.request.stop_sequences"] = (stop,)
    elif isinstance(stop, list) and all(isinstance(item, str) for item in stop):
        attributes["gen_ai.request.stop_sequences"] = tuple(stop)


def _chaos_attributes(injected: str) -> dict[str, Any]:
    """One injection, "experiment:fault" as the record keeps it, as span-event attributes."""
    experiment, _, fault = injected.rpartition(":")
    return {"vgate.chaos.experiment": experiment, "vgate.chaos.fault": fault}


def _decision_attributes(decision: dict[str, Any]) -> dict[str, Any]:
    """A logged decision as span-event attributes: scalars as they are, the rest as JSON."""
    attributes: dict[str, Any] = {}
    for key, value in decision.items():
        if value is None:
            continue
        if isinstance(value, (str, bool, int, float)):
            attributes[f"vgate.{key}"] = value
        else:
            attributes[f"vgate.{key}"] = orjson.dumps(value).decode()
    return attributes
