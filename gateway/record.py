"""One request's facts, filled in along its way and read once at the end (log, metrics)."""

from __future__ import annotations

from typing import Any


class RequestRecord:
    __slots__ = (
        "attempts",
        "backend",
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
        self.decisions: list[Any] = []  # the router's backend choices (gateway.router.Decision)
        # With tracing: (trace id, span id, parent span id or 0, wall-clock start in ns)
        # when sampled, and the W3C traceparent sent upstream.
        self.trace: tuple[int, int, int, int] | None = None
        self.traceparent: bytes | None = None
        self.stream = False
        self.status = 0
        self.error: str | None = None
        self.upstream_s: float | None = None
        self.ttft_s: float | None = None
        self.response_started: float | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def record_usage(self, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if isinstance(prompt, int):
            self.prompt_tokens = prompt
        if isinstance(completion, int):
            self.completion_tokens = completion
