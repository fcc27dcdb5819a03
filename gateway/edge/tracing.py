"""Request traces over OTLP: one span per request, with its routing decisions as events.

The span is built when the request ends, from the facts its record collected, and handed
to OpenTelemetry's batch processor: nothing is timed, entered or exited on the hot path,
and an unsampled request costs one random draw. Its ids are chosen when the request starts,
so the `traceparent` sent upstream names it and a traced `vllm serve` continues the trace.

An incoming W3C `traceparent` is honoured: its trace goes on, its sampling decision is kept.
Export runs on the processor's own thread with a bounded queue: a slow or absent collector
drops spans (the SDK counts them), never delays a request.
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

logger = logging.getLogger("vgate.tracing")

_TRACEPARENT = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_SCOPE = InstrumentationScope("vgate")
_EXPORT_BATCH = 512  # spans per export, the SDK's default


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
    __slots__ = ("_flush_s", "_log_filter", "_processor", "_random", "_ratio", "_resource")

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

    def end(self, record: RequestRecord, end: float) -> None:
        """Hand the finished request's span to the exporter."""
        if record.trace is None:
            return
        trace_id, span_id, parent_id, start_ns = record.trace
        context = SpanContext(trace_id, span_id, False, TraceFlags(TraceFlags.SAMPLED))
        parent = None
        if parent_id:
            parent = SpanContext(trace_id, parent_id, True, TraceFlags(TraceFlags.SAMPLED))
        end_ns = start_ns + int((end - record.start) * 1e9)
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
        self._processor.on_end(span)

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


def _attributes(record: RequestRecord) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": record.method,
        "url.path": record.path,
        "http.response.status_code": record.status,
        "vgate.request_id": record.request_id,
        "vgate.attempts": record.attempts,
        "vgate.stream": record.stream,
    }
    optional = {
        "enduser.id": record.caller,
        "gen_ai.request.model": record.model,
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
    return attributes


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
