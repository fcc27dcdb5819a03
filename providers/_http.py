"""The OpenAI-compatible HTTP adapter both providers share, on the lean HTTP/1.1 client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ClassVar

from gateway.config import BackendConfig, UpstreamConfig
from gateway.errors import TransportError
from providers.base import RequestContext
from providers.http1 import ByteBudget, ConnectionPool, Response

# Below uvicorn's (and so vLLM's) 5 s keep-alive: a pooled connection the server is
# about to close would otherwise fail a request that never reached it.
KEEPALIVE_S = 4.0
MAX_HEALTH_BODY = 64 * 1024
MAX_METRICS_BODY = 2 * 1024 * 1024  # vLLM's /metrics is tens of KiB; more is not vLLM's


_EMBEDDINGS_PATH = "/v1/embeddings"


class HTTPUpstreamResponse:
    __slots__ = (
        "_budget",
        "_cap",
        "_response",
        "_setting",
        "content_type",
        "retry_after",
        "status",
    )

    def __init__(self, response: Response, cap: int, setting: str, budget: ByteBudget) -> None:
        self._response = response
        self._cap = cap
        self._setting = setting
        self._budget = budget
        self.status = response.status
        self.content_type = response.header(b"content-type") or ""
        self.retry_after = response.header(b"retry-after")

    # The lean client's errors are the gateway's own already (`gateway.errors`): a
    # TransportError, or UpstreamBufferFull when the process holds as much as it may.

    async def read(self, limit: int) -> bytes:
        if limit < self._cap:  # the router's own, smaller limit (an error body)
            return await self._response.read(limit, self._budget)
        return await self._response.read(self._cap, self._budget, self._setting)

    def chunks(self) -> AsyncIterator[bytes]:
        return self._response.chunks()

    def pump(self, sink: Callable[[bytes], bool]) -> Awaitable[bool]:
        """providers.http1's `Response.pump`: the router's streams use it when present."""
        return self._response.pump(sink)

    def close(self) -> None:
        self._response.close()


class OpenAICompatibleAdapter:
    provider: ClassVar[str] = "openai-compatible"
    health_path: ClassVar[str] = "/health"

    def __init__(
        self,
        backend: BackendConfig,
        *,
        connect_timeout_s: float,
        api_key: str | None,
        upstream: UpstreamConfig | None = None,
        budget: ByteBudget | None = None,
    ) -> None:
        self.name = backend.name
        self._base_url = backend.url
        self._max_connections = backend.max_connections
        self._connect_timeout_s = connect_timeout_s
        self._limits = upstream = upstream or UpstreamConfig()
        # Shared by every adapter of the process (gateway.router.build); its own when built alone.
        self._budget = budget or ByteBudget(upstream.max_buffered_bytes)
        # The header block is encoded once; only the request id changes per request.
        headers = b"Content-Type: application/json\r\n"
        if api_key:
            headers += b"Authorization: Bearer " + api_key.encode("latin-1") + b"\r\n"
        self._headers = headers
        self._pool: ConnectionPool | None = None

    async def start(self) -> None:
        self._pool = ConnectionPool(
            self._base_url,
            max_connections=self._max_connections,
            keepalive_s=KEEPALIVE_S,
            connect_timeout_s=self._connect_timeout_s,
            max_head_bytes=self._limits.max_header_bytes,
            max_headers=self._limits.max_headers,
        )

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    async def post(self, path: str, body: bytes, context: RequestContext) -> HTTPUpstreamResponse:
        response = await self._send(b"POST", path, body, context.request_id, context.traceparent)
        limits = self._limits
        if path == _EMBEDDINGS_PATH:
            cap, setting = limits.max_embeddings_body_bytes, "upstream.max_embeddings_body_bytes"
        else:
            cap, setting = limits.max_body_bytes, "upstream.max_body_bytes"
        return HTTPUpstreamResponse(response, cap, setting, self._budget)

    async def _send(
        self,
        method: bytes,
        path: str,
        body: bytes,
        request_id: str,
        traceparent: bytes | None = None,
    ) -> Response:
        assert self._pool is not None, "adapter used before start()"
        headers = self._headers + b"X-Request-ID: " + request_id.encode("ascii") + b"\r\n"
        if traceparent is not None:
            headers += b"traceparent: " + traceparent + b"\r\n"
        return await self._pool.request(method, path.encode(), headers, body)

    # Probes read small, capped bodies outside the budget: one at a time per backend, they
    # must not fail (and eject a backend) because client answers fill the buffer.

    async def health(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._send(b"GET", self.health_path, b"", "health-check")
                await response.read(MAX_HEALTH_BODY)
                return response.status == 200
        except (TransportError, TimeoutError):
            return False

    async def metrics(self) -> bytes | None:
        """The upstream's Prometheus text, or None where it serves none (OpenAI: 404).

        Failures raise a `TransportError` (also for a body over MAX_METRICS_BODY); the
        caller bounds the time (policies.load.LoadScraper).
        """
        response = await self._send(b"GET", "/metrics", b"", "metrics-scrape")
        body = await response.read(MAX_METRICS_BODY)
        return body if response.status == 200 else None
