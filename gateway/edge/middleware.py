"""The one middleware on the hot path: request id, timing headers, access log, metrics.

Pure ASGI, one `send` wrapper, no per-request objects beyond the record, and a
last-resort guard so that no exception ever reaches a client as a traceback.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Awaitable

from gateway.asgi import ASGIApp, Message, Receive, Scope, Send
from gateway.edge.accesslog import AccessLog
from gateway.edge.metrics import GatewayMetrics
from gateway.edge.record import RequestRecord
from gateway.edge.tracing import Tracer
from gateway.edge.usage import KeyUsage
from gateway.errors import MAX_ECHO_CHARS, GatewayError, clip

logger = logging.getLogger("vgate")

# Probes and scrapes are neither logged nor counted: they would drown the requests.
_QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})
# A client's X-Request-ID is kept only if it is short and plain: letters, digits and the
# punctuation ids are made of (UUIDs, ULIDs, "req_...", "Root=1-...;Parent=..."), nothing
# that quotes, escapes or marks up (no quotes, backslashes, brackets, spaces or controls),
# since it is echoed, logged, traced and sent upstream.
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:;=/+@|~-]{1,128}")


def request_id_from(scope: Scope) -> str:
    """The client's X-Request-ID if it is sane (plain ASCII, bounded), else a new one."""
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            if _SANE_REQUEST_ID.fullmatch(value):
                return str(value.decode("ascii"))
            break
    return os.urandom(16).hex()


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: GatewayMetrics,
        access_log: AccessLog | None,
        tracer: Tracer | None = None,
        usage: KeyUsage | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self.tracer = tracer
        self.usage = usage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _QUIET_PATHS:
            if scope["type"] == "lifespan" and self.access_log is not None:
                await self._lifespan(scope, receive, send, self.access_log)
                return
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path, method = scope["path"], scope["method"]
        if len(path) > MAX_ECHO_CHARS or len(method) > 20:  # what logs and traces repeat
            path, method = clip(path), clip(method, 20)
        record = RequestRecord(request_id_from(scope), start, method, path)
        scope["vgate.record"] = record
        request_id = record.request_id.encode("ascii")
        tracer = self.tracer
        if tracer is not None:
            tracer.begin(scope, record)

        # Not a coroutine: it hands back the server's own send's, so that each event of a
        # stream passes through one coroutine rather than two.
        def send_with_context(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                now = time.perf_counter()
                record.status = message["status"]
                record.response_started = now
                upstream = record.upstream_s
                timing = f"gateway;dur={record.own_s(now) * 1000:.3f}"
                if upstream is not None:
                    timing += f", upstream;dur={upstream * 1000:.3f}"
                if record.waited_s:
                    timing += f", wait;dur={record.waited_s * 1000:.3f}"
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-request-id", request_id),
                    (b"server-timing", timing.encode("ascii")),
                ]
            return send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_context)
        except Exception as exc:
            logger.exception("unhandled error in request %s", record.request_id)
            record.error = "internal_error"
            if record.response_started is None:
                error = GatewayError(
                    f"The gateway failed to handle this request (request id {record.request_id})."
                )
                await send_error(send_with_context, error)
            elif not isinstance(exc, OSError):
                raise
        finally:
            self.metrics.in_flight.dec()
            end = time.perf_counter()
            if tracer is not None:
                # First: a trace kept at the end gets its id logged, and its exemplars.
                tracer.end(record, end)
            self.metrics.observe(record, end)
            if self.access_log is not None:
                self.access_log.write(record, end)
            if record.key_id is not None and self.usage is not None:
                self.usage.observe(record.key_id, record)

    async def _lifespan(
        self, scope: Scope, receive: Receive, send: Send, access_log: AccessLog
    ) -> None:
        """The app's lifespan, with the access log flushed once it has shut down: uvicorn
        runs the lifespan's shutdown after the last connection drained, so every request's
        line is written before the server reports it stopped (AccessLog batches lines)."""

        async def send_flushed(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                access_log.flush()
            await send(message)

        try:
            await self.app(scope, receive, send_flushed)
        finally:
            access_log.flush()


async def send_error(send: Send, error: GatewayError) -> None:
    """`error` as the whole answer: its status, its `body()` as JSON, its own headers.
    (Starlette's handler, gateway.edge.dispatch, answers with the same three.)"""
    body = error.body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    headers.extend((name.lower().encode(), value.encode()) for name, value in error.headers.items())
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
