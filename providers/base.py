"""What every adapter offers the router: the seam between it and one upstream API.

An exchange that fails raises a `gateway.errors.TransportError` (`UpstreamConnectError`,
`UpstreamBroken`), or `UpstreamBufferFull` where the process holds all it may.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class RequestContext:
    """What an adapter is told of the request an exchange is for, besides its body."""

    request_id: str  # sent as X-Request-ID
    traceparent: bytes | None = None  # W3C trace context, sent as traceparent
    caller: str | None = None  # the key's name: what a chaos experiment may target
    chaos: str | None = None  # the chaos experiment the request asked for (X-VGate-Chaos)
    # What chaos did to the request's attempts ("experiment:fault"), for its log line.
    injected: list[str] | None = None


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

    async def post(self, path: str, body: bytes, context: RequestContext) -> UpstreamResponse:
        """Send a JSON POST; returns once the response's status and headers arrived.
        The context's request id and trace go to the upstream as headers."""
        ...

    async def health(self, timeout_s: float) -> bool: ...

    async def metrics(self) -> bytes | None:
        """The worker's Prometheus text, or None where it has none (404)."""
        ...
