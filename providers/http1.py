"""A lean HTTP/1.1 client for the hot path: asyncio protocols, parsing by httptools.

Why not aiohttp or httpx: proxying a small request costs a bare Starlette proxy about
340 µs of CPU with aiohttp, 2,300 µs with httpx and 177 µs with this client (`make bench`,
README "Why a lean upstream client"). The gateway's own work has to fit beside the client
in about 330 µs, so the client decides whether it can.

It does only what the adapters need: one origin per pool, bounded keep-alive connections,
requests with a body, responses with a length, chunked or ending at close, read whole or
streamed with flow control, TLS, a connect timeout, and abort on cancellation (closing the
connection is how an upstream such as vLLM learns to stop generating). Parsing, the part
that is easy to get wrong, is llhttp's via httptools, as in uvicorn.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import httptools

from providers.base import UpstreamBroken, UpstreamConnectError

_HIGH_WATER = 256 * 1024  # buffered body bytes before reading from the socket pauses


class ConnectFailed(UpstreamConnectError):
    """No connection: refused, unresolvable, or not accepted within the connect timeout."""


class ConnectionBroken(UpstreamBroken):
    """The connection failed or the upstream spoke broken HTTP after the request was sent."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.head_waiter: asyncio.Future[None] | None = None
        self.body_waiter: asyncio.Future[None] | None = None
        self._paused = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionBroken(f"malformed HTTP response: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.status and not self.complete and self._ends_at_close():
            self.on_message_complete()
        elif not self.complete:
            self._fail(ConnectionBroken("the upstream closed the connection"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # Asked here: llhttp forgets the message's flags once it completes.
        self.keep_alive = self.parser.should_keep_alive()
        _wake(self.head_waiter)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        _wake(self.body_waiter)

    def on_message_complete(self) -> None:
        self.complete = True
        _wake(self.head_waiter)
        _wake(self.body_waiter)

    # used by Response

    def _ends_at_close(self) -> bool:
        return b"content-length" not in self.headers and b"transfer-encoding" not in self.headers

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        _wake(self.head_waiter)
        _wake(self.body_waiter)

    def take(self) -> bytes:
        data = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body.clear()
        self.buffered = 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return data

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class Response:
    __slots__ = ("_connection", "_done", "_pool", "headers", "status")

    def __init__(self, pool: ConnectionPool, connection: _Connection) -> None:
        self._pool = pool
        self._connection = connection
        self._done = False
        self.status = connection.status
        self.headers = connection.headers

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")

    async def read(self, limit: int) -> bytes:
        """The whole body; `ConnectionBroken` if it breaks off or exceeds `limit` bytes."""
        connection = self._connection
        parts: list[bytes] = []
        size = 0
        while True:
            if connection.buffered:
                part = connection.take()
                size += len(part)
                if size > limit:
                    self.close()
                    raise ConnectionBroken(f"response body is over {limit} bytes")
                parts.append(part)
            elif connection.complete:
                self.close()
                return parts[0] if len(parts) == 1 else b"".join(parts)
            elif connection.error is not None:
                self.close()
                raise connection.error
            else:
                await self._next_event()

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; what arrived before a failure comes first."""
        connection = self._connection
        while True:
            if connection.buffered:
                yield connection.take()
            elif connection.complete:
                self.close()
                return
            elif connection.error is not None:
                self.close()
                raise connection.error
            else:
                await self._next_event()

    async def _next_event(self) -> None:
        connection = self._connection
        waiter = connection.body_waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        except BaseException:
            # Cancelled mid-body (a timeout, the client gone): the connection is spoiled.
            self.close()
            raise
        finally:
            connection.body_waiter = None

    def close(self) -> None:
        """Return the connection if the exchange finished cleanly, else drop it. Idempotent."""
        if self._done:
            return
        self._done = True
        connection = self._connection
        if connection.reusable() and not connection.buffered:
            self._pool.release(connection)
        else:
            self._pool.discard(connection)


class ConnectionPool:
    """Keep-alive connections to one origin, at most `max_connections` at once."""

    def __init__(
        self, base_url: str, *, max_connections: int, keepalive_s: float, connect_timeout_s: float
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/").encode()
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        self.host_header = (self.host if default_port else f"{self.host}:{self.port}").encode()
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._held: set[_Connection] = set()

    async def request(self, method: bytes, path: bytes, headers: bytes, body: bytes) -> Response:
        """Send a request; returns once the status and headers arrived.

        `headers` is the pre-encoded header block (each line ending in CRLF) without Host
        and Content-Length, which are added here.
        """
        await self._slots.acquire()
        try:
            connection = await self._connection()
        except BaseException:
            self._slots.release()
            raise
        self._held.add(connection)
        try:
            head = b"%s %s%s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n%s\r\n" % (
                method,
                self.base_path,
                path,
                self.host_header,
                len(body),
                headers,
            )
            assert connection.transport is not None
            connection.transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                connection.transport.write(body)
            if not connection.status and connection.error is None:
                waiter = connection.head_waiter = asyncio.get_running_loop().create_future()
                try:
                    await waiter
                finally:
                    connection.head_waiter = None
            if connection.error is not None:
                raise connection.error
        except BaseException:
            self.discard(connection)
            raise
        return Response(self, connection)

    async def _connection(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.closed or now - connection.idle_since > self._keepalive_s:
                connection.abort()
                continue
            connection._reset()
            return connection
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, protocol = await loop.create_connection(
                    _Connection,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError:
            raise ConnectFailed(
                f"no connection to {self.host}:{self.port} within {self._connect_timeout_s:g}s",
                timed_out=True,
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(
                f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        return protocol

    def release(self, connection: _Connection) -> None:
        if connection in self._held:
            self._held.discard(connection)
            self._slots.release()
            connection.idle_since = time.monotonic()
            self._idle.append(connection)

    def discard(self, connection: _Connection) -> None:
        connection.abort()
        if connection in self._held:
            self._held.discard(connection)
            self._slots.release()

    async def aclose(self) -> None:
        for connection in (*self._idle, *self._held):
            connection.abort()
        self._idle.clear()
        self._held.clear()
