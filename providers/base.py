"""What every adapter offers the router: the seam between it and one upstream API.

How an exchange can fail is `gateway.errors.TransportError` (and `UpstreamBufferFull`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

# Transitional, for the router and providers/__init__.py until they import these from
# gateway.errors and gateway.wire.headers, where they live now (issue 10); then drop.
from gateway.errors import UpstreamBroken, UpstreamBufferFull, UpstreamConnectError  # noqa: F401
from gateway.wire.headers import RETRY_AFTER_MAX_S, retry_after_seconds  # noqa: F401


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
