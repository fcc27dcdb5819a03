"""Small pure-ASGI helpers shared by the edge and the simulated worker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from gateway.errors import BodyTooLarge, ClientDisconnected

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Where the server puts a `BodyWriter` in a request's scope (vgate's own protocol under
# uvicorn, gateway.edge.connections); absent under any other server.
BODY_WRITER = "vgate.body_writer"


class BodyWriter(Protocol):
    """The server's writer for the pieces of a response body already started with `send`:
    a stream's events written as they are read, with no ASGI message and no coroutine per
    event (gateway.router.streams, `pump`). The response still ends with `send`."""

    def writes_chunks(self) -> bool:
        """Whether the response is a started chunked body that pieces may be added to."""
        ...

    def write_chunk(self, body: bytes) -> bool:
        """Write one piece now; whether the client's writes are paused (then `drain`)."""
        ...

    async def drain(self) -> None:
        """Until the client's writes may go on (at once if it has gone)."""
        ...


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header; `name` must be lower-case."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """Read the whole request body, refusing more than `limit` bytes.

    A declared Content-Length over the limit is refused before reading anything, so a
    large upload costs neither memory nor bandwidth.
    """
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise BodyTooLarge(limit)
        return body  # type: ignore[no-any-return]
    parts = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("client disconnected while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        parts.append(chunk)
    return b"".join(parts)


class DisconnectWatch:
    """Cancel the current task as soon as the client disconnects.

    uvicorn silently drops writes to a closed connection, so without this a request
    whose client went away would keep its upstream slot busy until the upstream ends
    on its own. Use as an async context manager after the body has been read; inside
    it, an `asyncio.CancelledError` with `watch.disconnected` set means the client left.

    Watching costs a task, so it starts only once the request has run `grace_s`: most
    non-streaming requests finish sooner and never pay for it, and a client that left
    earlier is noticed the moment the watch starts.
    """

    __slots__ = ("_grace_s", "_receive", "_start_handle", "_task", "_watcher", "disconnected")

    def __init__(self, receive: Receive, *, grace_s: float = 0.05) -> None:
        self._receive = receive
        self._grace_s = grace_s
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._start_handle: asyncio.TimerHandle | None = None
        self.disconnected = False

    async def __aenter__(self) -> DisconnectWatch:
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if self._grace_s > 0:
            self._start_handle = loop.call_later(self._grace_s, self._start)
        else:
            self._start()
        return self

    async def __aexit__(self, *exc_info: object) -> bool:
        if self._start_handle is not None:
            self._start_handle.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        if self.disconnected and exc_info[0] is asyncio.CancelledError:
            # Our own cancellation: swallow it so the caller can record the outcome.
            assert self._task is not None
            self._task.uncancel()
            return True
        return False

    def _start(self) -> None:
        self._start_handle = None
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                assert self._task is not None
                self._task.cancel()
                return
