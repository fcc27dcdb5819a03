"""`OneWriteCycle`: a response's head goes out with its first body piece, in one write.

A real uvicorn server in-process with the gateway's protocol, a raw client socket, and the
server's transport wrapped to count its writes.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from typing import Any

import pytest
import uvicorn

from gateway.asgi import BODY_WRITER, Receive, Scope, Send
from gateway.edge.connections import ConnectionGuard, ConnectionLimits

PATIENCE_S = 30.0


class CountingTransport:
    """The server's transport, with each write noted."""

    def __init__(self, transport: Any, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        if data:
            self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def serve(app: Any, writes: list[bytes]) -> tuple[uvicorn.Server, asyncio.Future[None], int]:
    base = ConnectionGuard(ConnectionLimits()).protocol_class()

    class Counted(base):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(CountingTransport(transport, writes))

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=Counted, lifespan="off", log_level="warning", ws="none")
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    deadline = time.monotonic() + PATIENCE_S
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.01)
    return server, serving, sock.getsockname()[1]


async def request(port: int, raw: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    return reader, writer


async def stop(server: uvicorn.Server, serving: asyncio.Future[None]) -> None:
    server.should_exit = True
    await asyncio.wait_for(serving, PATIENCE_S)


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_a_whole_answer_is_one_write() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")],
            }
        )
        await send({"type": "http.response.body", "body": b"{}"})

    writes: list[bytes] = []
    server, serving, port = await serve(app, writes)
    try:
        reader, writer = await request(port, GET)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PATIENCE_S)
        body = await asyncio.wait_for(reader.readexactly(2), PATIENCE_S)
        writer.close()
    finally:
        await stop(server, serving)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 2\r\n" in head and body == b"{}"
    assert writes == [head + body]


async def test_a_stream_sends_its_head_with_its_first_event_then_one_write_per_event() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for event in (b"data: 1\n\n", b"data: 2\n\n"):
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    writes: list[bytes] = []
    server, serving, port = await serve(app, writes)
    try:
        reader, writer = await request(port, GET)
        data = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), PATIENCE_S)
        writer.close()
    finally:
        await stop(server, serving)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head
    assert body == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n"
    assert len(writes) == 3  # head + first event, second event, the last chunk
    assert writes[0].endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n")


async def test_a_head_with_no_body_yet_is_not_held_back() -> None:
    """An application that starts its answer and then waits: the client gets the head."""
    go_on = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await go_on.wait()
        await send({"type": "http.response.body", "body": b"late"})

    writes: list[bytes] = []
    server, serving, port = await serve(app, writes)
    try:
        reader, writer = await request(port, GET)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PATIENCE_S)
        go_on.set()
        rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), PATIENCE_S)
        writer.close()
    finally:
        await stop(server, serving)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert rest == b"4\r\nlate\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    ("header", "error"),
    [
        ((b"bad name", b"v"), "Invalid HTTP header name."),
        ((b"x-ok", b"a\nb"), "Invalid HTTP header value."),
    ],
)
async def test_a_bad_header_is_refused_as_uvicorn_refuses_it(
    header: tuple[bytes, bytes], error: str
) -> None:
    raised: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [header]})
        except RuntimeError as exc:
            raised.append(exc)
            raise

    writes: list[bytes] = []
    server, serving, port = await serve(app, writes)
    try:
        reader, writer = await request(port, GET)
        await asyncio.wait_for(reader.read(), PATIENCE_S)  # uvicorn closes: a 500 or nothing
        writer.close()
    finally:
        await stop(server, serving)
    assert [str(exc) for exc in raised] == [error]
    assert not any(header[0] in write for write in writes)


async def test_a_served_request_leaves_nothing_for_the_garbage_collector() -> None:
    """Each request's objects are freed as it ends, by reference counting. A reference
    cycle per request (the scope once held its cycle, which holds the scope) costs the
    garbage collector about 7% of a request's CPU, and nothing else shows it."""
    writers: list[object] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        writers.append(type(scope[BODY_WRITER]))
        body = b"{}"
        headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    server, serving, port = await serve(app, [])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    requests = 200
    gc.collect()
    gc.disable()
    try:
        for _ in range(requests):
            writer.write(GET)
            await reader.readuntil(b"\r\n\r\n{}")
        await asyncio.sleep(0)  # the last request's task finishes
        found = gc.collect()
    finally:
        gc.enable()
        writer.close()
        await stop(server, serving)
    assert len(writers) == requests
    assert found < requests // 4, f"{found} objects in reference cycles after {requests} requests"
