"""What every adapter offers the router, and the two ways an upstream can fail."""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Protocol

from gateway.errors import GatewayError

# A longer wait told to a client is no longer a hint to retry; how long the gateway itself
# honours one is the route's retries.retry_after_max_s.
RETRY_AFTER_MAX_S = 3600
_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


class UpstreamConnectError(Exception):
    """No connection could be made: the request never reached the upstream."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class UpstreamBroken(Exception):
    """The connection failed after the request was sent (reset, closed, malformed HTTP)."""


class UpstreamBufferFull(GatewayError):
    """Taking more of an upstream's answer would pass `upstream.max_buffered_bytes`, the
    process's bound on answers held in memory at once: the gateway is overloaded, not the
    upstream at fault, so the client is told to retry shortly (and no breaker counts it)."""

    status = 503
    type = "service_unavailable"
    default_code = "overloaded"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The gateway holds as much of upstream answers as it may at once ({limit} bytes, "
            "upstream.max_buffered_bytes); retry shortly.",
            headers={"Retry-After": "1"},
        )


class UpstreamResponse(Protocol):
    status: int
    content_type: str
    retry_after: str | None

    async def read(self, limit: int) -> bytes:
        """The whole body, or `UpstreamBroken` if it breaks off or exceeds `limit` bytes."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; raises `UpstreamBroken` if the connection fails."""
        ...

    def close(self) -> None:
        """Drop the connection (cancels the upstream's work) unless the body was consumed."""
        ...


class Adapter(Protocol):
    name: str

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def post(
        self, path: str, body: bytes, request_id: str, traceparent: bytes | None = None
    ) -> UpstreamResponse:
        """Send a JSON POST; returns once the response's status and headers arrived.
        `traceparent` (W3C) carries the request's trace to the upstream."""
        ...

    async def health(self, timeout_s: float) -> bool: ...

    async def metrics(self) -> bytes | None:
        """The worker's Prometheus text, or None where it has none (404)."""
        ...


def retry_after_seconds(
    value: str | None, *, cap: int = RETRY_AFTER_MAX_S, now: float | None = None
) -> int | None:
    """An upstream's Retry-After as whole seconds within [0, cap]; None unless it is
    delta-seconds or an HTTP-date (RFC 9110, 10.2.3). A fraction rounds up, a past date is 0.
    What reaches a client is this number, never the upstream's bytes."""
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        seconds = float(value)  # inf for a thousand digits, never an error
    elif len(value) <= 64:  # an HTTP-date is 29 characters
        try:
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is None:  # "-0000": UTC, says RFC 5322
                when = when.replace(tzinfo=UTC)
            seconds = when.timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    else:
        return None
    if seconds >= cap:
        return cap
    return max(math.ceil(seconds), 0)
