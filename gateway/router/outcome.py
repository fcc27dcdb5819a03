"""What the router did for one request, and what it returns."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.router.route import Decision
    from gateway.wire.validation import ProxyRequest


class AttemptRecord:
    """One upstream attempt's facts, for its span in the request's trace: noted as they
    happen (a few `perf_counter` readings and strings), turned into a span at the end.

    Times are `time.perf_counter()` readings; None where the attempt never got that far.
    """

    __slots__ = (
        "backend",
        "end",
        "first_byte",
        "first_token",
        "result",
        "resumption",
        "route",
        "start",
        "status",
    )

    def __init__(self, route: str, backend: str, start: float) -> None:
        self.route = route
        self.backend = backend
        self.start = start
        self.first_byte: float | None = None  # the upstream's response headers
        self.first_token: float | None = None  # a stream's first event
        self.end: float | None = None  # answered whole, failed, or its stream closed
        self.status: int | None = None  # the upstream's HTTP status, where it sent one
        # "ok", or why it failed: the error's code ("upstream_timeout", "breaker_open",
        # "upstream_unreachable", "upstream_stream_broken", ...).
        self.result = "ok"
        self.resumption: str | None = None  # "prefill" or "regenerate" for a resumed stream

    def failed(self, result: str) -> None:
        self.result = result
        if self.end is None:
            self.end = time.perf_counter()


@dataclass(frozen=True, slots=True)
class RedisCall:
    """One call the request's path made to Redis (the limits' admission, the cache's
    lookup), for its span in the trace: what it was for, the command, and when
    (`time.perf_counter()` readings)."""

    purpose: str  # "limits" or "cache"
    operation: str  # the Redis command: EVALSHA, GET, MGET
    start: float
    end: float
    failed: bool = False  # Redis did not answer (in time): the request went on without it


class Outcome:
    """What happened to one request in the router, filled in as it goes (so a request that
    fails still says what it tried); the edge copies it into its log record.

    The router never reads it back to decide anything.
    """

    __slots__ = (
        "attempts",
        "backend",
        "backend_s",
        "cache",
        "cache_age",
        "completion_tokens",
        "decisions",
        "dropped_events",
        "fallback_from",
        "prompt_tokens",
        "redis_calls",
        "request",
        "resumptions",
        "route",
        "tried",
        "upstream_s",
        "waited_s",
    )

    def __init__(self) -> None:
        self.route: str | None = None  # the route tried last: the one that answered, if any
        self.fallback_from: str | None = None  # the route asked for, when another answered
        self.backend: str | None = None  # the backend of the last attempt
        self.attempts = 0
        self.resumptions = 0  # times a stream that broke after its first byte went on elsewhere
        self.dropped_events = 0  # unparseable upstream events not forwarded
        self.decisions: list[Decision] = []  # every backend choice, replayable
        self.tried: list[AttemptRecord] = []  # every attempt, resumptions included, in order
        self.request: ProxyRequest | None = None  # as the router was given it (for the trace)
        # Whose time it was: every attempt's upstream time summed (the last attempt's alone
        # in backend_s), and the waits the router imposed (admission queue, retry backoff).
        self.upstream_s: float | None = None
        self.backend_s = 0.0
        self.waited_s = 0.0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        # The response cache's part: None (not in play), "hit", "miss", "bypass" or
        # "coalesced"; and a hit's age in whole seconds.
        self.cache: str | None = None
        self.cache_age: int | None = None
        self.redis_calls: list[RedisCall] | None = None  # for the trace; None: none made

    def add_redis_call(self, call: RedisCall) -> None:
        if self.redis_calls is None:
            self.redis_calls = [call]
        else:
            self.redis_calls.append(call)

    def add_upstream(self, seconds: float) -> None:
        self.backend_s = seconds
        self.upstream_s = seconds if self.upstream_s is None else self.upstream_s + seconds

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

    @property
    def tokens(self) -> int | None:
        """The tokens the upstream reported (None: it reported none)."""
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)


@dataclass(slots=True)  # not frozen: see gateway.router.plan.Call
class Completion:
    """A whole (non-streaming) answer, and where it came from."""

    body: bytes
    content_type: str
    route: str  # the route that answered: the one asked for, or a fallback
    backend: str
