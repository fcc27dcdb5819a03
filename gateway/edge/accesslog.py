"""One JSON line per request. Never the prompt, the completion or a key: only the key's name."""

from __future__ import annotations

import time
from typing import BinaryIO

import orjson

from gateway.edge.record import RequestRecord


class AccessLog:
    __slots__ = ("_stream",)

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def write(self, record: RequestRecord, end: float) -> None:
        line = {
            "ts": round(time.time(), 3),
            "request_id": record.request_id,
            "method": record.method,
            "path": record.path,
            "status": record.status,
            "key": record.caller,
            "model": record.model,
            "backend": record.backend,
            "attempts": record.attempts,
            "fallback_from": record.fallback_from,
            "resumptions": record.resumptions,
            "dropped_events": record.dropped_events,
            "stream": record.stream,
            "latency_ms": _ms(end - record.start),
            "upstream_ms": _ms(record.upstream_s),
            "wait_ms": _ms(record.waited_s),
            "ttft_ms": _ms(record.ttft_s),
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "error": record.error,
            "decisions": [decision.to_json() for decision in record.decisions],
        }
        if record.cache is not None:  # absent where the response cache is not in play
            line["cache"] = record.cache
        if record.chaos:  # absent, not empty, where chaos left the request alone
            line["chaos"] = record.chaos
        trace = record.trace
        if trace is not None and trace[3]:  # traced: sampled at its start, or kept at its end
            line["trace_id"] = f"{trace[0]:032x}"
        self._stream.write(orjson.dumps(line) + b"\n")
        self._stream.flush()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
