"""One request's facts, filled in along its way and read once at the end (log, metrics)."""

from __future__ import annotations

from typing import Any


class RequestRecord:
    __slots__ = (
        "attempts",
        "backend",
        "backend_s",
        "caller",
        "completion_tokens",
        "decisions",
        "dropped_events",
        "endpoint",
        "error",
        "fallback_from",
        "method",
        "model",
        "path",
        "prompt_tokens",
        "request_id",
        "response_started",
        "resumptions",
        "start",
        "status",
        "stream",
        "trace",
        "traceparent",
        "ttft_s",
        "upstream_s",
        "waited_s",
    )

    def __init__(self, request_id: str, start: float, method: str, path: str) -> None:
        self.request_id = request_id
        self.start = start
        self.method = method
        self.path = path
        self.endpoint: str | None = None
        self.caller: str | None = None
        self.model: str | None = None
        self.backend: str | None = None
        self.attempts = 0
        self.fallback_from: str | None = None
        self.resumptions = 0  # times a stream that broke after its first byte went on elsewhere
        self.dropped_events = 0  # unparseable upstream events not forwarded
        self.decisions: list[Any] = []  # the router's backend choices
        # With tracing: (trace id, span id, parent span id or 0, wall-clock start in ns)
        # when sampled, and the W3C traceparent sent upstream.
        self.trace: tuple[int, int, int, int] | None = None
        self.traceparent: bytes | None = None
        self.stream = False
        self.status = 0
        self.error: str | None = None
        # Whose time it was: every attempt's upstream time summed (the last attempt's
        # alone in backend_s), and the waits the gateway's policies imposed (admission
        # queue, retry backoff). The rest of a response's start is the gateway's own.
        self.upstream_s: float | None = None
        self.backend_s = 0.0
        self.waited_s = 0.0
        self.ttft_s: float | None = None
        self.response_started: float | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def add_upstream(self, seconds: float) -> None:
        self.backend_s = seconds
        self.upstream_s = seconds if self.upstream_s is None else self.upstream_s + seconds

    def own_s(self, until: float) -> float:
        """The gateway's own time from the request's start to `until`."""
        return max(until - self.start - (self.upstream_s or 0.0) - self.waited_s, 0.0)

    def record_usage(self, usage: object) -> None:
        """Token counts from an upstream's `usage`, if it is the object it should be."""
        if type(usage) is not dict:
            return  # absent or malformed: the answer still goes through, uncounted
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if isinstance(prompt, int):
            self.prompt_tokens = prompt
        if isinstance(completion, int):
            self.completion_tokens = completion
