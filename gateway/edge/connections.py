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
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import orjson
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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
        super().on_headers_complete()

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
