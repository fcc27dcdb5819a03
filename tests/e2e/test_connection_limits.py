"""What a client connection may take before any key is checked: a real `vgate serve`, raw sockets.

Each test is an attack from the hardening audit that took the gateway down without a key:
a huge or endless request head, a head or body trickled forever, more connections than the
process has descriptors for, a client that never reads its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from gateway.edge.connections import ConnectionGuard, ConnectionLimits
from tests.e2e.conftest import new_request_id, wait_for_line
from tests.servers import (
    DEMO_KEY,
    Gateway,
    Process,
    backend,
    gateway_config,
    poll_until,
    start_gateway,
    start_sim,
)

PATIENCE_S = 30.0  # far beyond every timeout under test: only a missing bound reaches it


@pytest.fixture(scope="module")
def sim(logs: Path) -> Iterator[Process]:
    process = start_sim(logs)
    yield process
    process.stop()


def _config(sim: Process, **server: Any) -> dict[str, Any]:
    return gateway_config([{"name": "tiny-llama", "backends": [backend("w1", sim.url)]}], **server)


@pytest.fixture(scope="module")
def gateway(logs: Path, sim: Process) -> Iterator[Gateway]:
    """Short head and body timeouts, so that trickling peers are cut off within the test."""
    process = start_gateway(
        logs, _config(sim, head_timeout_s=1, body_timeout_s=1, max_header_bytes=16384)
    )
    yield process
    process.stop()


def connect(gateway: Gateway) -> socket.socket:
    port = int(gateway.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S)
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, Any], bytes]:
    """The one answer on `sock` up to the server's close: status, JSON body, the head."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, orjson.loads(body), head


def assert_error(answer: tuple[int, dict[str, Any], bytes], status: int, code: str) -> None:
    got, body, head = answer
    assert got == status, head
    assert body["error"]["code"] == code
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert b"connection: close" in head.lower()


def test_a_head_past_the_cap_is_431_and_the_connection_closed(gateway: Gateway) -> None:
    with connect(gateway) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        sock.sendall(b"".join(b"X-%d: %s\r\n" % (i, b"v" * 40) for i in range(400)))  # ~18 KB
        assert_error(read_answer(sock), 431, "request_header_fields_too_large")


def test_the_head_cap_holds_for_a_keep_alive_connections_later_requests(
    gateway: Gateway,
) -> None:
    """A proxy's pooled connection (nginx's upstream keep-alive) carries many requests: the
    cap counts each one's head, not only the connection's first."""
    with connect(gateway) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"\r\n\r\n" not in first:
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 4000) for i in range(5))  # 20 KB
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + padding + b"\r\n")
        rest = b""  # the first answer's body (if not read yet), then the second answer
        while chunk := sock.recv(65536):
            rest += chunk
        _, found, second = rest.partition(b"HTTP/1.1 ")
        assert found and second.startswith(b"431"), rest[:300]
        body = second.partition(b"\r\n\r\n")[2]
        assert orjson.loads(body)["error"]["code"] == "request_header_fields_too_large"


def test_too_many_header_fields_is_431(gateway: Gateway) -> None:
    with connect(gateway) as sock:
        fields = b"".join(b"X-%d: v\r\n" % i for i in range(150))  # small, but 150 of them
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        assert_error(read_answer(sock), 431, "request_header_fields_too_large")


def test_an_endless_header_value_is_cut_off_before_it_is_kept(gateway: Gateway) -> None:
    """64 MB of one header value: the server closes after its cap, long before the end.

    (Before the bound it kept all of it, growing the value quadratically, and stalled.)
    """
    piece = b"v" * 65536
    sent = 0
    with connect(gateway) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nX-Big: ")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 64 * 1024 * 1024:
                sock.sendall(piece)
                sent += len(piece)
        # What the kernel's buffers took before the close reached us is all that was sent.
        assert sent < 16 * 1024 * 1024
    assert httpx.get(gateway.url + "/health", timeout=PATIENCE_S).status_code == 200


def test_a_large_body_is_not_counted_as_head(gateway: Gateway) -> None:
    body = orjson.dumps(
        {"model": "no-such-model", "messages": [{"role": "user", "content": "x" * 500_000}]}
    )
    with connect(gateway) as sock:
        sock.sendall(  # one write: the head and the start of the body arrive together
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + DEMO_KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        status, answer, _ = read_answer(sock)
    assert status == 404 and answer["error"]["code"] == "model_not_found"  # read and parsed


def trickle_until_answered(sock: socket.socket, data: bytes) -> float:
    """Send `data` a byte every 0.1 s until the server answers; the seconds that took."""
    started = time.monotonic()
    for byte in data:
        readable, _, _ = select.select([sock], [], [], 0.1)
        if readable:
            return time.monotonic() - started
        sock.sendall(bytes([byte]))
    raise AssertionError(f"still not answered after trickling {len(data)} bytes")


def test_a_trickled_head_is_408_after_head_timeout(gateway: Gateway) -> None:
    with connect(gateway) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        trickle_until_answered(sock, b"X-Slow: " + b"a" * int(PATIENCE_S * 10))
        assert_error(read_answer(sock), 408, "request_timeout")


def test_a_connection_that_says_nothing_is_closed(gateway: Gateway) -> None:
    with connect(gateway) as sock:
        assert_error(read_answer(sock), 408, "request_timeout")


def test_a_body_shorter_than_its_content_length_is_408(gateway: Gateway) -> None:
    request_id = new_request_id()
    with connect(gateway) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + DEMO_KEY.encode()
            + b"\r\nX-Request-ID: "
            + request_id.encode()
            + b'\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model"'
        )
        assert_error(read_answer(sock), 408, "request_timeout")
    entry = wait_for_line(gateway, request_id)  # logged as what it was, not a 499
    assert (entry["status"], entry["error"]) == (408, "request_timeout")


def test_a_keep_alive_connection_serves_on_within_the_bounds(gateway: Gateway) -> None:
    """The bounds reset per request: several requests on one connection all succeed."""
    with httpx.Client(base_url=gateway.url, timeout=PATIENCE_S) as client:
        for _ in range(5):
            assert client.get("/health").status_code == 200


def test_beyond_max_connections_a_new_one_gets_503_and_the_rest_recover(
    logs: Path, sim: Process
) -> None:
    gateway = start_gateway(logs, _config(sim, max_connections=4, head_timeout_s=PATIENCE_S))
    try:
        idle = [connect(gateway) for _ in range(4)]  # say nothing, hold their slots
        try:
            with connect(gateway) as extra:  # accepted after the four: over the cap
                answer = read_answer(extra)
            assert_error(answer, 503, "too_many_connections")
            assert b"retry-after: 1" in answer[2].lower()
        finally:
            for sock in idle:
                sock.close()

        def ready() -> bool:
            try:
                return httpx.get(gateway.url + "/ready", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        poll_until(ready)  # their slots are free again once the server sees them closed
        metrics = httpx.get(gateway.url + "/metrics", timeout=PATIENCE_S).text
        assert 'vgate_connections_rejected_total{reason="max_connections"} 1.0' in metrics
        assert "vgate_connections_open " in metrics
    finally:
        gateway.stop()


async def test_a_client_that_stops_reading_is_disconnected() -> None:
    """A stream to a client that reads nothing ends at send_timeout_s, and the app hears of
    it (the disconnect is what cancels the upstream request in the gateway)."""
    disconnected = asyncio.Event()

    async def endless(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        assert (await receive())["type"] == "http.request"  # the request, no body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        watcher = asyncio.ensure_future(receive())  # the next message: the disconnect
        while not watcher.done():
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        if watcher.result()["type"] == "http.disconnect":
            disconnected.set()

    guard = ConnectionGuard(ConnectionLimits(send_timeout_s=1.0))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        endless, http=guard.protocol_class(), lifespan="off", log_level="warning", ws="none"
    )
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    try:
        await poll_started(server)
        await asyncio.get_running_loop().sock_connect(client, sock.getsockname())
        await asyncio.get_running_loop().sock_sendall(client, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        # Never read: the server's buffers fill, its writes pause, and send_timeout_s runs.
        await asyncio.wait_for(disconnected.wait(), PATIENCE_S)
    finally:
        client.close()
        server.should_exit = True
        await asyncio.wait_for(serving, PATIENCE_S)


async def poll_started(server: uvicorn.Server) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.01)
