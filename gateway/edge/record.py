"""One request's facts, filled in along its way and read once at the end (log, metrics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.router import Decision, Outcome
    from gateway.router.outcome import AttemptRecord, RedisCall
    from gateway.wire.validation import ProxyRequest


class RequestRecord:
    __slots__ = (
        "attempts",
        "backend",
        "backend_s",
        "cache",
        "caller",
        "chaos",
        "completion_tokens",
        "decisions",
        "dropped_events",
        "endpoint",
        "error",
        "fallback_from",
        "key_id",
        "method",
        "model",
        "path",
        "prompt_tokens",
        "redis_calls",
        "request",
        "request_id",
        "response_started",
        "resumptions",
        "start",
        "status",
        "stream",
        "trace",
        "traceparent",
        "tried",
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
        self.caller: str | None = None  # the key's (or token's) name
        self.key_id: str | None = None
        self.model: str | None = None
        self.backend: str | None = None
        self.attempts = 0
        self.fallback_from: str | None = None
        self.resumptions = 0  # times a stream that broke after its first byte went on elsewhere
        self.dropped_events = 0  # unparseable upstream events not forwarded
        self.decisions: list[Decision] = []  # the router's backend choices, replayable
        self.tried: list[AttemptRecord] = []  # the router's upstream attempts, for the trace
        self.request: ProxyRequest | None = None  # as routed: its parameters, for the trace
        # What chaos injected into the request's attempts ("experiment:fault"), in order.
        self.chaos: list[str] | None = None
        # With tracing: (trace id, span id, parent span id or 0, wall-clock start in ns)
        # when sampled (a start of 0: not sampled yet, kept at the end if it failed or was
        # slow), and the W3C traceparent sent upstream.
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
        self.cache: str | None = None  # the response cache's part (Outcome.cache)
        # The calls the request made to Redis (limits, cache), for their spans; None: none.
        self.redis_calls: list[RedisCall] | None = None

    def own_s(self, until: float) -> float:
        """The gateway's own time from the request's start to `until`."""
        return max(until - self.start - (self.upstream_s or 0.0) - self.waited_s, 0.0)

    def absorb(self, outcome: Outcome) -> None:
        """What the router did for this request, for the log, the metrics and the trace."""
        self.model = outcome.route or self.model
        self.backend = outcome.backend
        self.attempts = outcome.attempts
        self.fallback_from = outcome.fallback_from
        self.resumptions = outcome.resumptions
        self.dropped_events = outcome.dropped_events
        self.decisions = outcome.decisions
        self.tried = outcome.tried  # the list itself: a resumption after this call adds to it
        self.request = outcome.request
        self.upstream_s = outcome.upstream_s
        self.backend_s = outcome.backend_s
        self.waited_s = outcome.waited_s
        self.prompt_tokens = outcome.prompt_tokens
        self.completion_tokens = outcome.completion_tokens
        self.cache = outcome.cache
        if outcome.redis_calls is not None:
            if self.redis_calls is None:
                self.redis_calls = outcome.redis_calls
            else:
                self.redis_calls += outcome.redis_calls
