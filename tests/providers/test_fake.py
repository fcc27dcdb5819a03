"""The scripted fake adapter: replies in order, what it records, and how it fails."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway.config import BackendConfig, Timeouts, UpstreamConfig
from gateway.errors import UpstreamBroken, UpstreamConnectError
from providers import Adapter, AdapterFactory
from providers.base import RequestContext
from providers.fake import (
    DONE,
    Break,
    CannotConnect,
    Events,
    FakeAdapter,
    FakeAdapters,
    FakeRequest,
    Hang,
    Json,
    Pause,
    Refuse,
    Scripted,
    ScriptExhausted,
    chat_chunk,
    chat_completion,
    chat_events,
)
from providers.http1 import ByteBudget

BODY = orjson.dumps({"model": "m", "messages": []})


async def test_replies_come_in_order_and_every_request_is_recorded() -> None:
    fake = FakeAdapter("w1", Refuse(503, retry_after="2"), chat_completion("hi"))
    refused = await fake.post("/v1/chat/completions", BODY, RequestContext("req-1", b"00-trace"))
    answered = await fake.post("/v1/completions", b'{"n": 1}', RequestContext("req-2"))
    assert (refused.status, refused.retry_after) == (503, "2")
    assert orjson.loads(await refused.read(1024))["error"]["code"] == 503
    assert answered.status == 200 and answered.content_type == "application/json"
    message = orjson.loads(await answered.read(1024))["choices"][0]["message"]
    assert message["content"] == "hi"
    assert fake.requests == [
        FakeRequest("/v1/chat/completions", {"model": "m", "messages": []}, "req-1", b"00-trace"),
        FakeRequest("/v1/completions", {"n": 1}, "req-2", None),
    ]
    assert fake.pending == 0


async def test_a_request_beyond_the_script_fails_the_test_unless_then_answers() -> None:
    strict = FakeAdapter("w1")
    with pytest.raises(ScriptExhausted, match="'w1' got request 1"):
        await strict.post("/v1/chat/completions", BODY, RequestContext("req-1"))
    lenient = FakeAdapter("w2", Refuse(500), then=Json(b"{}"))
    statuses = [(await lenient.post("/p", BODY, RequestContext("r"))).status for _ in range(3)]
    assert statuses == [500, 200, 200]


async def test_a_callable_reply_answers_from_the_request() -> None:
    def echo(request: FakeRequest) -> Scripted:
        return Json({"model": request.body["model"], "id": request.request_id})

    fake = FakeAdapter("w1", then=echo)
    response = await fake.post("/v1/chat/completions", BODY, RequestContext("req-9"))
    assert orjson.loads(await response.read(1024)) == {"model": "m", "id": "req-9"}


async def test_a_stream_is_one_read_per_item_and_pauses_until_the_test_says() -> None:
    go_on = asyncio.Event()
    fake = FakeAdapter("w1", Events([chat_chunk("a"), Pause(go_on), b"data: [DO", b"NE]\n\n"]))
    response = await fake.post("/v1/chat/completions", BODY, RequestContext("req-1"))
    chunks = response.chunks()
    assert await anext(chunks) == b"data: " + orjson.dumps(chat_chunk("a")) + b"\n\n"
    paused = asyncio.ensure_future(anext(chunks))
    await asyncio.sleep(0)
    assert not paused.done()
    go_on.set()
    assert await paused == b"data: [DO"
    assert await anext(chunks) == b"NE]\n\n"
    with pytest.raises(StopAsyncIteration):
        await anext(chunks)


async def test_failures_are_the_transport_errors_the_router_handles() -> None:
    fake = FakeAdapter(
        "w1", CannotConnect(), CannotConnect(timed_out=True), Events([chat_chunk("a"), Break()])
    )
    with pytest.raises(UpstreamConnectError) as refused:
        await fake.post("/p", BODY, RequestContext("r"))
    assert not refused.value.timed_out
    with pytest.raises(UpstreamConnectError) as timed_out:
        await fake.post("/p", BODY, RequestContext("r"))
    assert timed_out.value.timed_out
    response = await fake.post("/p", BODY, RequestContext("r"))
    with pytest.raises(UpstreamBroken, match="reset"):
        await response.read(1 << 20)


async def test_a_hang_ends_only_when_the_caller_gives_up() -> None:
    fake = FakeAdapter("w1", Hang(), Events([chat_chunk("a"), Hang()]))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await fake.post("/p", BODY, RequestContext("r"))
    response = await fake.post("/p", BODY, RequestContext("r"))
    chunks = response.chunks()
    await anext(chunks)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await anext(chunks)
    assert len(fake.requests) == 2 and len(fake.responses) == 1  # a hung post has none


async def test_read_refuses_more_than_its_limit_as_a_broken_upstream_would() -> None:
    fake = FakeAdapter("w1", Json(b"x" * 100))
    response = await fake.post("/p", BODY, RequestContext("r"))
    with pytest.raises(UpstreamBroken, match="exceeds 99 bytes"):
        await response.read(99)
    response.close()
    assert response.closed


def test_chat_events_are_a_whole_stream() -> None:
    role, a, b, usage, done = chat_events("a", "b", prompt_tokens=3)
    assert role == chat_chunk(role=True) and done == DONE
    assert isinstance(a, dict) and isinstance(b, dict) and isinstance(usage, dict)
    assert [c["choices"][0]["finish_reason"] for c in (a, b)] == [None, "stop"]
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


async def test_the_factory_gives_each_backend_its_own_fake() -> None:
    fakes = FakeAdapters()
    factory: AdapterFactory = fakes
    one = BackendConfig(name="w1", provider="vllm", url="http://w1.invalid")
    adapter: Adapter = factory(one, Timeouts(), UpstreamConfig(), ByteBudget(1 << 20))
    assert adapter is fakes["w1"] is factory(one, Timeouts(), UpstreamConfig(), ByteBudget(1))
    assert fakes["w2"] is not adapter
    assert await adapter.health(1.0) and await adapter.metrics() is None
    fakes["w1"].healthy = False
    assert not await adapter.health(1.0)
