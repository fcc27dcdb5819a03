"""What a misbehaving upstream sends, through a real `vgate serve`: raw socket upstreams
that answer out of step, speak while idle, send endless heads or more than fits.

Each case is one the gateway once got wrong (issue 9): an interim `100 Continue` taken as
the answer handed that answer to the next caller; bytes sent to an idle pooled connection
hung the next request; a 64 MB head was parsed whole; answers were held without an overall
bound; an upstream's Retry-After reached the client verbatim.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import BackendConfig, UpstreamConfig
from gateway.errors import UpstreamBroken
from gateway.wire.headers import RETRY_AFTER_MAX_S, retry_after_seconds
from providers.base import RequestContext
from providers.http1 import ByteBudget
from providers.vllm import VLLMAdapter
from tests.fake_upstream import (
    FakeUpstream,
    ScriptedUpstream,
    chat_answer,
    content_event,
    read_request,
    role_event,
    usage_event,
)
from tests.servers import DEMO_KEY, Gateway, backend, gateway_config, start_gateway

UNCHECKED = {"enabled": False}  # no health probes: each connection's requests are the test's
ONCE = {"max_retries": 0}  # each failure reaches the client as it is
TIMEOUTS = {"connect_s": 2, "first_token_s": 8, "idle_s": 8, "total_s": 8}
CLIENT_TIMEOUT_S = 30
# The head of an answer nobody asked for: on a reused connection the next answer would be
# read as its body, 100,000 bytes that never come.
UNASKED = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n"


def text_of(request_body: bytes) -> str:
    return str(orjson.loads(request_body)["messages"][-1]["content"])


async def interim_first(
    upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """`100 Continue` first, then the answer after a while (an LLM generating). A gateway
    that took the 100 for the answer sends its next request on this connection meanwhile:
    it is read, and answered after the first one, in order, as HTTP/1.1 requires."""
    pending = [(await read_request(reader))[2]]
    while pending:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            pending.append((await asyncio.wait_for(read_request(reader), 0.5))[2])
        for index, body in enumerate(pending):
            if index:  # apart, so that a gateway out of step reads each as one answer
                await asyncio.sleep(0.3)
            writer.write(chat_answer(body, text_of(body)))
            await writer.drain()
        pending = [(await read_request(reader))[2]]


async def switch_protocols(
    upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n")
    await writer.drain()
    await asyncio.Event().wait()


async def speak_while_idle(
    upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Each answer is followed, once the test says the gateway has it (the connection
    idles in the pool), by the head of an answer nobody asked for."""
    while True:
        _, _, body = await read_request(reader)
        writer.write(chat_answer(body, text_of(body)))
        await writer.drain()
        await upstream.released("speak")
        writer.write(UNASKED)
        await writer.drain()
        upstream.tell("spoken")


async def endless_head(
    upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-big: ")
    piece = b"a" * (1024 * 1024)
    upstream.state["sent"] = 0
    while upstream.state["sent"] < 64 * 1024 * 1024:
        writer.write(piece)
        await writer.drain()  # raises once the gateway has hung up
        upstream.state["sent"] += len(piece)
    writer.write(b"\r\ncontent-length: 2\r\n\r\n{}")
    await writer.drain()


def embeddings_body(size: int) -> bytes:
    """An embeddings answer of exactly `size` bytes."""
    head = b'{"object":"list","model":"fake","data":[{"object":"embedding","index":0,"embedding":['
    tail = b']}],"usage":{"prompt_tokens":1,"total_tokens":1}}'
    numbers = b"0," * ((size - len(head) - len(tail)) // 2)
    body = head + numbers.rstrip(b",") + tail
    return body + b" " * (size - len(body))


def embeddings_head(size: int) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        + f"content-length: {size}\r\n\r\n".encode()
    )


async def half_then_wait(
    upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """600 KiB of a 900 KiB answer, then a pause until the gateway dropped one of the
    connections taking part (its buffer bound is 1 MiB: two halves do not fit), then the rest."""
    aborted = upstream.state.setdefault("aborted", asyncio.Event())
    await read_request(reader)
    body = embeddings_body(900 * 1024)
    writer.write(embeddings_head(len(body)) + body[: 600 * 1024])
    await writer.drain()
    hung_up = asyncio.ensure_future(reader.read(1))  # b"" or a reset: the gateway let go
    other = asyncio.ensure_future(aborted.wait())
    done, _ = await asyncio.wait({hung_up, other}, timeout=60, return_when="FIRST_COMPLETED")
    if hung_up in done:
        aborted.set()
        other.cancel()
        return
    hung_up.cancel()
    writer.write(body[600 * 1024 :])
    await writer.drain()


async def too_big(
    upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    while True:
        await read_request(reader)
        body = embeddings_body(2 * 1024 * 1024)
        writer.write(embeddings_head(len(body)) + body)
        await writer.drain()


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def sse_chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def stream_events(writer: asyncio.StreamWriter, size: int) -> None:
    """`size` bytes or so of a chat answer's content events, in 32 KiB pieces."""
    piece = content_event("x" * 32 * 1024)
    for _ in range(size // len(piece) + 1):
        writer.write(sse_chunk(piece))
        await writer.drain()


async def stream_ending(writer: asyncio.StreamWriter) -> None:
    end = content_event("", finish="stop") + usage_event(1, 1) + b"data: [DONE]\n\n"
    writer.write(sse_chunk(end) + b"0\r\n\r\n")
    await writer.drain()


async def streams_too_much(
    upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A whole, well-formed stream of 2 MiB of text: an assembled answer past the cap."""
    await read_request(reader)
    writer.write(SSE_HEAD + sse_chunk(role_event()))
    await stream_events(writer, 2 * 1024 * 1024)
    await stream_ending(writer)


async def streams_half_then_waits(
    upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """600 KiB of an answer's events, then a pause until the gateway let go of one of the
    two connections taking part (1 MiB holds one such answer, not two), then the end."""
    aborted = upstream.state.setdefault("aborted", asyncio.Event())
    await read_request(reader)
    writer.write(SSE_HEAD + sse_chunk(role_event()))
    await stream_events(writer, 600 * 1024)
    hung_up = asyncio.ensure_future(reader.read(1))
    other = asyncio.ensure_future(aborted.wait())
    done, _ = await asyncio.wait({hung_up, other}, timeout=60, return_when="FIRST_COMPLETED")
    if hung_up in done:
        aborted.set()
        other.cancel()
        return
    hung_up.cancel()
    await stream_ending(writer)


def route(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "timeouts": TIMEOUTS,
        "health": UNCHECKED,
        "retries": ONCE,
        "resume": {"enabled": False},
        "backends": [backend(f"b-{name}", url)],
        **extra,
    }


def config_of(models: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    # No /metrics scrapes either: every request an upstream sees is a test's.
    return {**gateway_config(models), "load_scrape": {"enabled": False}, **sections}


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Any]]:
    fakes: dict[str, Any] = {
        "interim": ScriptedUpstream(interim_first),
        "switch": ScriptedUpstream(switch_protocols),
        "idle": ScriptedUpstream(speak_while_idle),
        "bighead": ScriptedUpstream(endless_head),
        "retry-after": FakeUpstream("status", status=429, body=b'{"error": {"message": "later"}}'),
    }
    yield fakes
    for fake in fakes.values():
        fake.stop()


@pytest.fixture(scope="module")
def gateway(logs: Path, upstreams: dict[str, Any]) -> Iterator[Gateway]:
    """Default `upstream:` limits."""
    process = start_gateway(
        logs, config_of([route(name, fake.url) for name, fake in upstreams.items()])
    )
    yield process
    process.stop()


def chat(gateway: Gateway, model: str, text: str) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {DEMO_KEY}"},
        json={"model": model, "messages": [{"role": "user", "content": text}]},
        timeout=CLIENT_TIMEOUT_S,
    )


def content_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def said_by(response: httpx.Response) -> str:
    """The answer's text, or the status and error message that came instead."""
    if response.status_code == 200:
        return content_of(response)
    return f"{response.status_code}: {response.json()['error']['message']}"


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


def test_an_interim_answer_is_skipped_and_the_next_caller_gets_its_own(
    gateway: Gateway, upstreams: dict[str, Any]
) -> None:
    # Before: ["502: Backend 'b-interim' answered 100", "first caller"].
    said = [said_by(chat(gateway, "interim", text)) for text in ("first caller", "second caller")]
    assert said == ["first caller", "second caller"]
    assert upstreams["interim"].connections == 1  # and the connection was kept: it was clean


def test_switching_protocols_is_the_upstreams_fault(gateway: Gateway) -> None:
    error = error_of(chat(gateway, "switch", "hi"), 502)
    assert "switched protocols (101)" in error["message"]


def test_a_connection_that_speaks_while_idle_is_not_reused(
    gateway: Gateway, upstreams: dict[str, Any]
) -> None:
    # Before: the second request read the unasked head's body until first_token_s (504).
    idle = upstreams["idle"]
    for text in ("one", "two", "three"):
        assert content_of(chat(gateway, "idle", text)) == text
        idle.release("speak")
        assert idle.heard("spoken")  # written to the idle connection before the next request
    assert idle.connections == 3


def test_an_endless_upstream_head_is_cut_off_at_the_cap(
    gateway: Gateway, upstreams: dict[str, Any]
) -> None:
    error = error_of(chat(gateway, "bighead", "hi"), 502)
    assert "head passed 65536 bytes (upstream.max_header_bytes)" in error["message"]
    state = upstreams["bighead"].state
    assert state["sent"] < 64 * 1024 * 1024  # the gateway hung up; it never took the rest
    assert httpx.get(gateway.url + "/health", timeout=5).status_code == 200


@pytest.mark.parametrize(
    ("sent", "told"),
    [
        ("7", "7"),
        ("0.2", "1"),  # whole seconds, rounded up
        ("99999999999999999999", str(RETRY_AFTER_MAX_S)),
        ("Wed, 21 Oct 2015 07:28:00 GMT", "0"),  # a date past
        ("soon\xff", None),  # neither seconds nor a date: dropped, never passed on
        ("7, 7", None),
    ],
)
def test_an_upstreams_retry_after_reaches_the_client_as_whole_seconds(
    gateway: Gateway, upstreams: dict[str, Any], sent: str, told: str | None
) -> None:
    upstreams["retry-after"].retry_after = sent
    response = chat(gateway, "retry-after", "hi")
    assert response.status_code == 429
    assert response.headers.get("retry-after") == told


def test_an_http_date_retry_after_becomes_seconds_from_now(
    gateway: Gateway, upstreams: dict[str, Any]
) -> None:
    upstreams["retry-after"].retry_after = email.utils.formatdate(time.time() + 120, usegmt=True)
    response = chat(gateway, "retry-after", "hi")
    assert response.status_code == 429
    assert 100 <= int(response.headers["retry-after"]) <= 121


def test_retry_after_parsing() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds(" 30 ") == 30
    assert retry_after_seconds("-1") is None
    assert retry_after_seconds("1e3") is None
    assert retry_after_seconds("x" * 100) is None
    assert retry_after_seconds(email.utils.formatdate(now + 30.5, usegmt=True), now=now) == 30
    assert retry_after_seconds(email.utils.formatdate(now + 10**6, usegmt=True), now=now) == 3600
    minus_zero = email.utils.formatdate(now + 60).replace("+0000", "-0000")  # naive: UTC
    assert retry_after_seconds(minus_zero, now=now) == 60
    assert retry_after_seconds("30", cap=10) == 10


# Caps: a gateway whose `upstream:` limits are small enough to reach.

CAPS = {
    "max_body_bytes": 1024 * 1024,
    "max_embeddings_body_bytes": 1024 * 1024,
    "max_buffered_bytes": 1024 * 1024,
}


@pytest.fixture(scope="module")
def capped(logs: Path) -> Iterator[tuple[Gateway, dict[str, ScriptedUpstream]]]:
    fakes = {
        "halves": ScriptedUpstream(half_then_wait),
        "big": ScriptedUpstream(too_big),
        "stream-big": ScriptedUpstream(streams_too_much),
        "stream-halves": ScriptedUpstream(streams_half_then_waits),
    }
    process = start_gateway(
        logs,
        config_of([route(name, fake.url) for name, fake in fakes.items()], upstream=CAPS),
    )
    yield process, fakes
    process.stop()
    for fake in fakes.values():
        fake.stop()


def embed(gateway: Gateway, model: str) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/embeddings",
        headers={"Authorization": f"Bearer {DEMO_KEY}"},
        json={"model": model, "input": "hi"},
        timeout=CLIENT_TIMEOUT_S,
    )


def test_an_answer_over_the_per_request_cap_is_the_upstreams_fault(
    capped: tuple[Gateway, dict[str, ScriptedUpstream]],
) -> None:
    gateway, _ = capped
    error = error_of(embed(gateway, "big"), 502)
    assert "over 1048576 bytes (upstream.max_embeddings_body_bytes)" in error["message"]


def test_answers_held_at_once_are_bounded_and_the_overflow_is_a_503(
    capped: tuple[Gateway, dict[str, ScriptedUpstream]],
) -> None:
    """Two 900 KiB answers, each sent two thirds of the way and held there: together they
    pass the 1 MiB buffer, so one is refused (503, retry later) and the other completes."""
    gateway, _ = capped
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda _: embed(gateway, "halves"), range(2)))
    refused = [r for r in responses if r.status_code == 503]
    answered = [r for r in responses if r.status_code == 200]
    assert len(refused) == 1 and len(answered) == 1, [r.text[:200] for r in responses]
    error = error_of(refused[0], 503)
    assert error["code"] == "overloaded" and "upstream.max_buffered_bytes" in error["message"]
    assert refused[0].headers["retry-after"] == "1"
    assert len(answered[0].content) == 900 * 1024


def test_an_assembled_answer_over_the_cap_is_the_upstreams_fault(
    capped: tuple[Gateway, dict[str, ScriptedUpstream]],
) -> None:
    """A non-streaming request is asked upstream as a stream (non_stream: assemble): the
    events it is built from count against upstream.max_body_bytes as a whole body would."""
    gateway, _ = capped
    error = error_of(chat(gateway, "stream-big", "hi"), 502)
    assert "more than 1048576 bytes (upstream.max_body_bytes)" in error["message"]


def test_assembled_answers_held_at_once_are_bounded_and_the_overflow_is_a_503(
    capped: tuple[Gateway, dict[str, ScriptedUpstream]],
) -> None:
    gateway, _ = capped
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda _: chat(gateway, "stream-halves", "hi"), range(2)))
    refused = [r for r in responses if r.status_code == 503]
    answered = [r for r in responses if r.status_code == 200]
    assert len(refused) == 1 and len(answered) == 1, [r.text[:200] for r in responses]
    error = error_of(refused[0], 503)
    assert error["code"] == "overloaded" and "upstream.max_buffered_bytes" in error["message"]
    assert len(content_of(answered[0])) >= 600 * 1024


# The adapter's caps by endpoint, against a raw socket server in this process.


def test_the_adapter_caps_answers_by_endpoint() -> None:
    async def main() -> None:
        body = embeddings_body(300 * 1024)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    await read_request(reader)
                    writer.write(embeddings_head(len(body)) + body)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        limits = UpstreamConfig(
            max_body_bytes=256 * 1024,
            max_embeddings_body_bytes=512 * 1024,
            max_buffered_bytes=1024 * 1024,
        )
        budget = ByteBudget(limits.max_buffered_bytes)
        adapter = VLLMAdapter(
            BackendConfig(name="b", provider="vllm", url=f"http://127.0.0.1:{port}"),
            connect_timeout_s=2,
            upstream=limits,
            budget=budget,
        )
        await adapter.start()
        response = await adapter.post("/v1/embeddings", b"{}", RequestContext("r1"))
        assert await response.read(64 * 1024 * 1024) == body
        response = await adapter.post("/v1/chat/completions", b"{}", RequestContext("r2"))
        with pytest.raises(UpstreamBroken, match=r"upstream\.max_body_bytes"):
            await response.read(64 * 1024 * 1024)
        assert budget.used == 0  # every reservation given back
        await adapter.aclose()
        server.close()

    asyncio.run(main())


def test_the_buffer_bound_must_hold_one_whole_answer() -> None:
    with pytest.raises(ValueError, match="max_embeddings_body_bytes is larger"):
        UpstreamConfig(max_body_bytes=1024 * 1024, max_buffered_bytes=8 * 1024 * 1024)
