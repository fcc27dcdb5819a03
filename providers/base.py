"""What every adapter offers the router: the seam between it and one upstream API.

An exchange that fails raises a `gateway.errors.TransportError` (`UpstreamConnectError`,
`UpstreamBroken`), or `UpstreamBufferFull` where the process holds all it may.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


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
