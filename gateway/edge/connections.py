"""Bounds on what one client connection may take from the server, before any key is checked.

uvicorn's httptools protocol keeps whatever a peer sends: a request head of any size (httptools
grows a header value by repeated concatenation, so one huge value is quadratic), a head or a
body trickled for as long as the peer likes, and as many connections as there are descriptors.
Anyone could take the gateway down that way without a key. `GuardedHttpToolsProtocol` is the
same protocol with four bounds, all from `server:` config:

- the head (request line and headers) is counted as bytes arrive, before the parser keeps
  them: past `max_header_bytes`, or past `max_headers` fields, the answer is 431 and the
  connection closes;
- a head must arrive within `head_timeout_s` of its first byte (or of the connection), and a
  body may pause at most `body_timeout_s` between pieces: past either, 408 and close;
- a client that stops reading its answer for `send_timeout_s` is disconnected, which cancels
  the upstream request as any disconnect does;
- beyond `max_connections` open connections, a new one gets 503 and is closed at once, so the
  descriptors left over still serve `/health` and `/ready` once the others time out.

Deadlines are checked by one sweep a second over the open connections, not by a timer per
request: the hot path pays an attribute write and a clock read, never a timer handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import resource
import urllib.parse
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import orjson
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from gateway.asgi import BODY_WRITER
from gateway.config import ServerConfig

log = logging.getLogger("vgate.connections")

_HEAD_END = b"\r\n\r\n"
_SWEEP_INTERVAL_S = 1.0
_READING_HEAD, _READING_BODY, _IDLE = 0, 1, 2
BODY_TIMED_OUT = "vgate.body_timed_out"  # in the scope of a request whose body timed out
REJECT_REASONS = (
    "max_connections",
    "max_header_bytes",
    "max_headers",
    "head_timeout",
    "body_timeout",
    "send_timeout",
)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one client connection may take; `server:` config holds the values."""

    max_connections: int = 1024
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    send_timeout_s: float = 60.0


def connection_limits(server: ServerConfig) -> ConnectionLimits:
    return ConnectionLimits(
        max_connections=server.max_connections,
        max_header_bytes=server.max_header_bytes,
        max_headers=server.max_headers,
        head_timeout_s=server.head_timeout_s,
        body_timeout_s=server.body_timeout_s,
        send_timeout_s=server.send_timeout_s,
    )


def _error_response(status: int, reason: bytes, code: str, message: str) -> bytes:
    body = orjson.dumps(
        {
            "error": {
                "message": message,
                "type": "server_error" if status >= 500 else "invalid_request_error",
                "param": None,
                "code": code,
            }
        }
    )
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n" % (status, reason, len(body))
    )
    if status == 503:
        head += b"retry-after: 1\r\n"
    return head + b"\r\n" + body


class _Rejected(Exception):
    """Raised from a parser callback to stop parsing a connection already answered."""


class ConnectionGuard:
    """The bounds, their prepared answers, and the sweep that enforces the deadlines.

    One per server; handed to every connection's protocol through `protocol_class`. The sweep
    is a callback rescheduled once a second while any connection is open: no task to start
    or stop, and nothing runs when the server is idle.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._open: set[GuardedHttpToolsProtocol] = set()
        self._sweep: asyncio.TimerHandle | None = None
        # Connections closed by a bound, by reason; read by /metrics at scrape time.
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.too_large = _error_response(
            431,
            b"Request Header Fields Too Large",
            "request_header_fields_too_large",
            f"The request's head is larger than the gateway's limit of "
            f"{limits.max_header_bytes} bytes or {limits.max_headers} header fields.",
        )
        self.head_timeout = _error_response(
            408,
            b"Request Timeout",
            "request_timeout",
            f"The request's head did not arrive within {limits.head_timeout_s:g} s.",
        )
        self.body_timeout = _error_response(
            408,
            b"Request Timeout",
            "request_timeout",
            f"The request's body paused for more than {limits.body_timeout_s:g} s.",
        )
        self.busy = _error_response(
            503,
            b"Service Unavailable",
            "too_many_connections",
            f"The gateway has {limits.max_connections} connections open, its limit. Retry shortly.",
        )

    def protocol_class(self) -> type[GuardedHttpToolsProtocol]:
        """What uvicorn's `http=` setting takes: the guarded protocol bound to this guard."""
        return type(GuardedHttpToolsProtocol.__name__, (GuardedHttpToolsProtocol,), {"guard": self})

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def opened(self, protocol: GuardedHttpToolsProtocol, loop: asyncio.AbstractEventLoop) -> None:
        self._open.add(protocol)
        if self._sweep is None:
            self._sweep = loop.call_later(_SWEEP_INTERVAL_S, self._check_deadlines, loop)

    def closed(self, protocol: GuardedHttpToolsProtocol) -> None:
        self._open.discard(protocol)

    def _check_deadlines(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        due = [p for p in self._open if p.read_deadline <= now or p.send_deadline <= now]
        for protocol in due:
            protocol.deadline_passed(now)
        self._sweep = (
            loop.call_later(_SWEEP_INTERVAL_S, self._check_deadlines, loop) if self._open else None
        )


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with `ConnectionGuard`'s bounds (see the module doc).

    The per-request callbacks are uvicorn's own (0.55, pinned), inlined rather than called
    through `super()`: a request passes through six of them, and the bounds must cost a
    clock read and a few attribute writes, not six more Python frames. The gateway speaks
    no WebSocket (`ws="none"`), so uvicorn's upgrade checks have nothing to find.
    """

    guard: ClassVar[ConnectionGuard]  # set by ConnectionGuard.protocol_class

    def __init__(self, **uvicorn_kwargs: Any) -> None:
        super().__init__(**uvicorn_kwargs)
        limits = self.guard.limits
        self.limits = limits
        self._max_header_bytes = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._head_timeout_s = limits.head_timeout_s
        self._body_timeout_s = limits.body_timeout_s
        # Checked by the guard's sweep; math.inf while nothing is awaited.
        self.read_deadline = math.inf  # the head or the body must arrive by then
        self.send_deadline = math.inf  # a paused write must drain by then
        self._reading = _READING_HEAD
        self._head_bytes = 0
        self._head_fields = 0
        self._tail = b""  # the last bytes of the head so far, to find an end split over reads
        self._refused = False  # turned away at max_connections
        self._rejected = False  # answered by the guard and closing

    # Connection lifecycle

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._refused = self._rejected = True
            self.guard.rejected["max_connections"] += 1
            transport.write(self.guard.busy)
            transport.close()
            return
        super().connection_made(transport)
        self.read_deadline = self.loop.time() + self._head_timeout_s
        self.guard.opened(self, self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.closed(self)
        if self._refused:
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejected or self.parser is None:
            return
        if self._reading != _READING_BODY:  # a head, or (idle) the next request's head
            # Count the head's bytes (not a body after it) before the parser keeps any.
            tail = self._tail
            window = tail + data if tail else data
            end = window.find(_HEAD_END)
            if end < 0:
                self._head_bytes += len(data)
                self._tail = window[-3:]
            else:
                self._head_bytes += end + 4 - len(tail)
                self._tail = b""
            if self._head_bytes > self._max_header_bytes:
                self._reject(self.guard.too_large, "max_header_bytes")
                return
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if self._rejected:
                return  # answered and closing: the rest of `data` is not ours to read
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_fields = 0
        if self._reading != _READING_HEAD:  # a keep-alive connection's next request
            # Its bytes so far are counted already (data_received, from _IDLE), from the 0
            # that on_message_complete left.
            self._reading = _READING_HEAD
            self.read_deadline = self.loop.time() + self._head_timeout_s

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_fields += 1
        if self._head_fields > self._max_headers:
            return  # counted, not kept: on_headers_complete answers 431
        name = name.lower()
        # llhttp keeps trailing whitespace, which RFC 9110 5.5 excludes from the value.
        value = value.rstrip(b" \t")
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._head_fields > self._max_headers:
            self._reject(self.guard.too_large, "max_headers")
            raise _Rejected  # stops httptools; data_received knows it was answered
        self._reading = _READING_BODY
        self.read_deadline = self.loop.time() + self._body_timeout_s
        # uvicorn's own (0.55), with `OneWriteCycle` for its cycle (and no upgrade check:
        # ws="none" upgrades nothing).
        parser = self.parser
        http_version = parser.get_http_version()
        scope = self.scope
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        parsed_url = httptools.parse_url(self.url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        root_path = self.root_path
        scope["path"] = root_path + path
        scope["raw_path"] = root_path.encode("ascii") + raw_path if root_path else raw_path
        scope["query_string"] = parsed_url.query or b""
        app = self.app
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        existing_cycle = self.cycle
        cycle = self.cycle = OneWriteCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        cycle.loop = self.loop
        # Weakly: the cycle holds the scope, and a scope holding the cycle would leave a
        # reference cycle per request for the garbage collector (about 7% of a request).
        scope[BODY_WRITER] = weakref.proxy(cycle)  # type: ignore[literal-required]
        if existing_cycle is None or existing_cycle.response_complete:
            self._start_asgi_task(cycle, app)
        else:
            # Pipelined HTTP requests need to be queued up.
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle.response_complete:
            return
        self.read_deadline = self.loop.time() + self._body_timeout_s
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_message_complete(self) -> None:
        self._reading = _IDLE
        self._head_bytes = 0
        self.read_deadline = math.inf  # between requests, uvicorn's keep-alive timeout rules
        cycle = self.cycle
        if cycle.response_complete:
            return
        cycle.more_body = False
        cycle.message_event.set()

    # Flow control: a client that stops reading its answer

    def pause_writing(self) -> None:
        self.send_deadline = self.loop.time() + self.limits.send_timeout_s
        super().pause_writing()

    def resume_writing(self) -> None:
        self.send_deadline = math.inf
        super().resume_writing()

    # Deadlines

    def deadline_passed(self, now: float) -> None:
        if self.transport.is_closing():
            return
        if self.send_deadline <= now:
            log.info(
                "closed a connection: its client read nothing for %gs", self.limits.send_timeout_s
            )
            self._disconnect()
        elif self._reading == _READING_HEAD:
            self._reject(self.guard.head_timeout, "head_timeout")
        else:
            if self.cycle is not None:
                self.cycle.scope[BODY_TIMED_OUT] = True  # type: ignore[literal-required]
            self._reject(self.guard.body_timeout, "body_timeout")

    def _reject(self, answer: bytes, reason: str) -> None:
        """Answer `answer` if the request it is about has no answer yet, and close.

        A request whose answer has started (say a 401 sent before the body was read) gets no
        second one: the connection just closes.
        """
        cycle = self.cycle
        self.guard.rejected[reason] += 1
        reading_head = self._reading != _READING_BODY  # _IDLE: the next head has begun
        if cycle is None or (
            cycle.response_complete if reading_head else not cycle.response_started
        ):
            self.transport.write(answer)
        self._disconnect()

    def _disconnect(self) -> None:
        self._rejected = True
        self.read_deadline = self.send_deadline = math.inf
        self.guard.closed(self)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = (
                True  # the app's receive() says http.disconnect: upstream cancelled
            )
            cycle.message_event.set()
        self.flow.resume_writing()
        self.transport.close()


class OneWriteCycle(RequestResponseCycle):
    """uvicorn's request/response cycle (0.55, pinned), with a `send` that costs less.

    uvicorn writes a response's head as soon as the application sends it, then each body
    piece: two writes, two system calls (on loopback, each delivers to the peer) for every
    whole answer, and a stream's head apart from its first event. Here the head waits for
    the body piece that follows it, in the same turn of the event loop, and both go out in
    one write; should no piece follow in that turn (an application that starts a response
    and then waits), a callback writes the head alone at the end of the turn. The header
    checks are uvicorn's, run once over all names and once over all values rather than
    once per field.
    """

    loop: asyncio.AbstractEventLoop
    _head: bytes | None = None  # a response head not yet written
    _head_request = False

    async def send(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.start', but got '{message['type']}'."
                )
            self._start(message)
        elif not self.response_complete:
            if message["type"] != "http.response.body":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.body', but got '{message['type']}'."
                )
            self._body(message.get("body", b""), message.get("more_body", False))
        else:
            raise RuntimeError(
                f"Unexpected ASGI message '{message['type']}' sent, after response already "
                "completed."
            )

    def _start(self, message: Any) -> None:
        self.response_started = True
        self.waiting_for_100_continue = False
        status_code = message["status"]
        headers = self.default_headers + list(message.get("headers", []))
        if self.access_log:
            scope = self.scope
            self.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(scope),
                scope["method"],
                get_path_with_query_string(scope),
                scope["http_version"],
                status_code,
            )
        if HEADER_RE.search(b"".join([name for name, _ in headers])):
            raise RuntimeError("Invalid HTTP header name.")
        if HEADER_VALUE_RE.search(b"".join([value for _, value in headers])):
            raise RuntimeError("Invalid HTTP header value.")
        content = [STATUS_LINE[status_code]]
        has_connection_close = False
        for name, value in headers:
            name = name.lower()
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection":
                connection = [token.lower().strip() for token in value.split(b",")]
                if b"close" in connection:
                    self.keep_alive = False
                    has_connection_close = True
            content.extend((name, b": ", value, b"\r\n"))
        if not self.keep_alive and not has_connection_close:
            content.append(b"connection: close\r\n")
        self._head_request = self.scope["method"] == "HEAD"
        if (
            self.chunked_encoding is None
            and not self._head_request
            and status_code not in (204, 304)
        ):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        self._head = b"".join(content)
        self.loop.call_soon(self._write_head)

    def _body(self, body: bytes, more_body: bool) -> None:
        head, self._head = self._head, None
        if self._head_request:
            self.expected_content_length = 0
            data = b""
        elif self.chunked_encoding:
            if body:
                data = b"%x\r\n%b\r\n" % (len(body), body)
                if not more_body:
                    data += b"0\r\n\r\n"
            else:
                data = b"" if more_body else b"0\r\n\r\n"
        else:
            num_bytes = len(body)
            if num_bytes > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= num_bytes
            data = body
        if head is not None:
            data = head + data if data else head
        self.transport.write(data)  # an empty write writes nothing, as uvicorn's
        if not more_body:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()

    # gateway.asgi.BodyWriter: a stream's events written from the upstream's read callback.

    def writes_chunks(self) -> bool:
        return bool(
            self.chunked_encoding
            and not self._head_request
            and self.response_started
            and not self.response_complete
            and self._head is None
        )

    def write_chunk(self, body: bytes) -> bool:
        if self.disconnected:
            return False  # as `send` does: dropped; the disconnect cancels the request
        if body:  # an empty chunk would end the body
            self.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        return self.flow.write_paused

    async def drain(self) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()

    def _write_head(self) -> None:
        head, self._head = self._head, None
        if head is not None and not self.transport.is_closing():
            self.transport.write(head)


def raise_descriptor_limit(limits: ConnectionLimits, upstream_connections: int) -> str | None:
    """Raise the soft open-files limit towards what the config can use; a warning if short.

    Every client connection is a descriptor, and so is every pooled upstream connection.
    """
    needed = limits.max_connections + upstream_connections + 64  # logs, Redis, listeners
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        return (
            f"the open-files limit ({soft}) is below what server.max_connections "
            f"({limits.max_connections}) and the upstream pools ({upstream_connections}) can "
            f"use; lower server.max_connections or raise the limit (ulimit -n)"
        )
    return None
