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

What an upstream sends is bounded before it is kept: the head (and trailers, chunk lines)
by `max_head_bytes` and `max_headers`, a body read whole by the caller's limit and by a
`ByteBudget` shared across pools. Interim answers (1xx) are skipped. A connection goes back
to the pool only after an exchange that ended cleanly (answer read whole, request sent
whole, nothing more arrived), and one that receives anything while idle is dropped: its
bytes would otherwise become the next caller's answer.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

from gateway.errors import UpstreamBroken, UpstreamBufferFull, UpstreamConnectError

_HIGH_WATER = 256 * 1024  # buffered body bytes before reading from the socket pauses
# An LLM API's head is under 2 KiB (OpenAI's, the largest, about 1.5 KiB in 30 fields).
DEFAULT_MAX_HEAD_BYTES = 64 * 1024
DEFAULT_MAX_HEADERS = 256


class ByteBudget:
    """Body bytes that reads in progress hold at once, across every pool that shares it.

    No lock: the event loop runs one callback at a time, so check-and-add cannot race.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


class _OutOfStep(Exception):
    """Raised in a parser callback to stop parsing; the reason is already in `error`."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one exchange at a time."""

    def __init__(self, max_head_bytes: int, max_headers: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.idle_since = 0.0
        self.closed = False
        self.begin()
        # No exchange yet: an upstream that speaks before it is asked is out of step.
        self.complete = True

    def begin(self) -> None:
        """Ready for the next exchange (the previous one, if any, ended cleanly)."""
        self.status = 0  # the final answer's; 0 until its head is whole (1xx are skipped)
        self.headers: dict[bytes, bytes] = {}
        self.header_count = 0
        # Bytes received since the last body byte that were not body: heads, chunk-size
        # lines, trailers; capped by max_head_bytes. A head is counted before the parser
        # keeps any of it; after a body byte, to within the rest of that one socket read.
        self.framing = 0
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.received = 0  # body pieces parsed: a read that adds none was all framing
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.head_waiter: asyncio.Future[None] | None = None
        self.body_waiter: asyncio.Future[None] | None = None
        # Set while `Response.pump` runs: takes the body pieces of each read once it is
        # parsed, all at once (`_pieces` holds them until then).
        self.sink: Callable[[bytes], bool] | None = None
        self._pieces: list[bytes] = []
        self._paused = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.complete:
            # The answer is whole, or the connection idles in the pool: whatever arrives
            # now would be read as the next caller's answer.
            self.abort()
        elif len(data) > self.max_head_bytes - self.framing:
            self._feed_in_steps(data)
        else:  # _feed, inlined: this is every read of every answer
            received = self.received
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                self._broken(exc)
                return
            if self.received == received:
                self.framing += len(data)
                return
            self.framing = 0
            if self._pieces:
                self._hand_over()

    def _feed(self, data: bytes | memoryview) -> bool:
        received = self.received
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(exc)
            return False
        if self.received == received:
            self.framing += len(data)
        else:
            self.framing = 0
            if self._pieces:
                self._hand_over()
        return True

    def _broken(self, exc: httptools.HttpParserError) -> None:
        if self._pieces:
            self._hand_over()  # what arrived before the failure comes first
        self._fail(UpstreamBroken(f"malformed HTTP response: {exc}"))
        self.abort()

    def _hand_over(self) -> None:
        """The body pieces of one read to the pump's sink, at once: the events that came
        together are observed and written together (one write to the client, not one per
        piece); a sink that asks for a pause stops the reading."""
        pieces = self._pieces
        body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        sink = self.sink
        if sink is None:  # not while a read is parsed; were it so, nothing may be lost
            self.body.append(body)
            self.buffered += len(body)
            _wake(self.body_waiter)
        elif sink(body) and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
            _wake(self.body_waiter)

    def _feed_in_steps(self, data: bytes) -> None:
        """Parse `data` no further than the framing cap allows; bytes past it are never kept."""
        view = memoryview(data)
        while view:
            room = self.max_head_bytes - self.framing
            if room <= 0:
                what = "head" if not self.status else "trailers or chunk-size lines"
                self._fail(
                    UpstreamBroken(
                        f"the upstream's {what} passed {self.max_head_bytes} bytes "
                        "(upstream.max_header_bytes)"
                    )
                )
                self.abort()
                return
            if not self._feed(view[:room]):
                return
            view = view[room:]
            if self.complete and view:
                self.abort()  # bytes after the answer: the connection is out of step
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.status and not self.complete and self._ends_at_close():
            self.on_message_complete()
        elif not self.complete:
            self._fail(UpstreamBroken("the upstream closed the connection"))

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:  # more bytes after the answer, in the same read
            self._fail(UpstreamBroken("the upstream sent more than its answer"))
            raise _OutOfStep

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.status:
            return  # a trailer: the head was handed over already; its bytes count as framing
        self.header_count += 1
        if self.header_count > self.max_headers:
            self._fail(
                UpstreamBroken(
                    f"the upstream sent over {self.max_headers} header fields "
                    "(upstream.max_headers)"
                )
            )
            raise _OutOfStep
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101:
                self._fail(UpstreamBroken("the upstream switched protocols (101)"))
                raise _OutOfStep
            # 100 Continue, 103 Early Hints...: an interim answer; the real one follows.
            self.headers.clear()
            return
        self.status = status
        # Asked here: llhttp forgets the message's flags once it completes.
        self.keep_alive = self.parser.should_keep_alive()
        _wake(self.head_waiter)

    def on_body(self, body: bytes) -> None:
        self.received += 1
        if self.sink is not None:
            self._pieces.append(body)  # handed over once the read is parsed
            return
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        _wake(self.body_waiter)

    def on_message_complete(self) -> None:
        if not self.status:
            return  # an interim answer ended
        self.complete = True
        _wake(self.head_waiter)
        _wake(self.body_waiter)

    # used by Response

    def _ends_at_close(self) -> bool:
        # RFC 9112, 6.3: without a length, or with a transfer coding other than chunked last
        # ("identity"), a response's body ends where the connection does (as llhttp reads it).
        if b"content-length" in self.headers:
            return False
        coding = self.headers.get(b"transfer-encoding")
        return coding is None or not coding.rstrip().lower().endswith(b"chunked")

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        _wake(self.head_waiter)
        _wake(self.body_waiter)

    def take(self) -> bytes:
        data = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body.clear()
        self.buffered = 0
        self.resume()
        return data

    def resume(self) -> None:
        """Read again after a pause: a full buffer's, or one a `pump` sink asked for."""
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def reusable(self) -> bool:
        """Whether the exchange ended cleanly: the answer read whole, the request sent whole
        (an upstream may answer before reading it all), the upstream willing to go on."""
        return (
            self.complete
            and self.keep_alive
            and not self.closed
            and not self.buffered
            and self.transport is not None
            and not self.transport.get_write_buffer_size()
        )

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class Response:
    __slots__ = ("_budget", "_connection", "_done", "_pool", "_reserved", "headers", "status")

    def __init__(self, pool: ConnectionPool, connection: _Connection) -> None:
        self._pool = pool
        self._connection = connection
        self._done = False
        self._budget: ByteBudget | None = None
        self._reserved = 0  # bytes of `_budget` this response holds until it is closed
        self.status = connection.status
        self.headers = connection.headers

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")

    async def read(self, limit: int, budget: ByteBudget | None = None, setting: str = "") -> bytes:
        """The whole body; `UpstreamBroken` if it breaks off or exceeds `limit` bytes
        (`setting` names where the limit comes from), `UpstreamBufferFull` if holding it
        would pass `budget`, which it counts against until the response is closed."""
        if self._done:
            return b""  # closed at its body's end: its connection may be another's now
        connection = self._connection
        parts: list[bytes] = []
        size = 0
        while True:
            if connection.buffered:
                part = connection.take()
                size += len(part)
                if size > limit:
                    self.close()
                    where = f" ({setting})" if setting else ""
                    raise UpstreamBroken(f"response body is over {limit} bytes{where}")
                if budget is not None:
                    if budget.used + len(part) > budget.limit:
                        self.close()
                        raise UpstreamBufferFull(budget.limit)
                    budget.used += len(part)  # ByteBudget.take, inlined on the hot path
                    self._budget = budget
                    self._reserved += len(part)
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
        if self._done:
            return  # closed at its body's end: its connection may be another's now
        connection = self._connection
        loop = asyncio.get_running_loop()
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
                # `_next_event`, inlined: this runs once per event of every stream.
                if connection._paused:
                    connection.resume()  # paused by a `pump` that read the first events
                waiter = connection.body_waiter = loop.create_future()
                try:
                    await waiter
                except BaseException:
                    self.close()  # cancelled mid-body: the connection is spoiled
                    raise
                finally:
                    connection.body_waiter = None

    async def pump(self, sink: Callable[[bytes], bool]) -> bool:
        """Body bytes handed to `sink` once each read is parsed (every piece the read held,
        in one call), inside the read's own callback: no task wakes up, nothing is queued,
        per read. Returns True when the body has ended, False when `sink` returned true (it
        asks for a pause: reading stops until `pump` is called again); raises as `chunks`
        does. Bytes that arrived before go first.

        `sink` must not raise (it runs in the protocol's `data_received`) and must be
        quick: it holds up every other connection of the loop.
        """
        if self._done:
            return True  # closed at its body's end: its connection may be another's now
        connection = self._connection
        if connection.buffered and sink(connection.take()) and not connection.complete:
            return False
        if self._ended():
            return True
        connection.sink = sink
        try:
            await self._next_event()
        finally:
            connection.sink = None
        return self._ended()

    def _ended(self) -> bool:
        """Whether the body has ended (the response is then closed); raises its failure."""
        connection = self._connection
        if connection.complete:
            self.close()
            return True
        if connection.error is not None:
            self.close()
            raise connection.error
        return False

    async def _next_event(self) -> None:
        connection = self._connection
        connection.resume()  # a `pump` sink may have paused it
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
        if self._reserved:
            assert self._budget is not None
            self._budget.give(self._reserved)
            self._reserved = 0
        connection = self._connection
        if connection.reusable():
            self._pool.release(connection)
        else:
            self._pool.discard(connection)


class ConnectionPool:
    """Keep-alive connections to one origin, at most `max_connections` at once."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        keepalive_s: float,
        connect_timeout_s: float,
        max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
        max_headers: int = DEFAULT_MAX_HEADERS,
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
        self._max_head_bytes = max_head_bytes
        self._max_headers = max_headers
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
            connection.begin()
            if connection.closed:  # spoke before it was asked, or went away: never used
                raise UpstreamBroken("the upstream closed the connection")
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
                # Bounded by the caller's deadline (the router's phase timeouts).
                waiter = connection.head_waiter = asyncio.get_running_loop().create_future()
                try:
                    await waiter
                finally:
                    connection.head_waiter = None
            if not connection.status:  # no head: only a failure wakes the waiter without one
                assert connection.error is not None
                raise connection.error
        except BaseException:
            self.discard(connection)
            raise
        return Response(self, connection)

    async def _connection(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            # Closed by the upstream, or dropped for speaking while idle: never reused.
            if connection.closed or now - connection.idle_since > self._keepalive_s:
                connection.abort()
                continue
            return connection
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(self._max_head_bytes, self._max_headers),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError:
            raise UpstreamConnectError(
                f"no connection to {self.host}:{self.port} within {self._connect_timeout_s:g}s",
                timed_out=True,
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(
                f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        return protocol

    def release(self, connection: _Connection) -> None:
        # A sink may have paused it as the answer ended: idle, it must hear the upstream close.
        connection.resume()
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
