"""The response cache in the router: what is looked up, what is kept, what never is."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.config import CacheConfig, RouteCacheConfig
from gateway.errors import UpstreamRejected
from gateway.router import Call, Outcome, Router
from gateway.router.build import build_router
from policies.cache import ResponseCache, memory_cache
from providers.fake import (
    Break,
    Events,
    FakeAdapters,
    Json,
    Refuse,
    chat_chunk,
    chat_completion,
    chat_events,
)
from tests.router.conftest import backend, chat, complete, gateway_config, route, stream

ALICE = Call("req-a", caller="alice")
BOB = Call("req-b", caller="bob")
DETERMINISTIC: dict[str, Any] = {"temperature": 0}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def cached_router(
    fakes: FakeAdapters, *routes: Any, clock: Clock | None = None, **settings: Any
) -> tuple[Router, ResponseCache]:
    cache = memory_cache(CacheConfig(enabled=True, **settings), clock=clock or Clock())
    router = build_router(gateway_config(*routes), adapters=fakes, cache=cache)
    return router, cache


def no_cache(call: Call, value: bytes) -> Call:
    return Call(call.request_id, caller=call.caller, headers=[(b"cache-control", value)])


async def test_a_deterministic_answer_is_served_from_the_cache(fakes: FakeAdapters) -> None:
    fakes["a"].add(chat_completion("four", prompt_tokens=7, completion_tokens=3))
    router, cache = cached_router(fakes, route("m", "a", non_stream="passthrough"))
    first = Outcome()
    miss = await complete(router, chat(**DETERMINISTIC), first, ALICE)
    assert first.cache == "miss"
    second = Outcome()
    hit = await complete(router, chat(**DETERMINISTIC, user="x"), second, ALICE)
    assert (second.cache, second.attempts, hit.backend) == ("hit", 0, "cache")
    assert hit.body == miss.body
    assert (second.prompt_tokens, second.completion_tokens) == (7, 3)  # the original usage
    assert len(fakes["a"].requests) == 1
    assert cache.total("hit") == 1 and cache.total("miss") == 1


async def test_sampled_requests_bypass_unless_the_route_caches_all(fakes: FakeAdapters) -> None:
    fakes["a"].then = chat_completion("random")
    fakes["b"].then = chat_completion("random")
    router, cache = cached_router(
        fakes,
        route("m", "a", non_stream="passthrough"),
        route("n", "b", non_stream="passthrough", cache=RouteCacheConfig(cache_all=True)),
    )
    for _ in range(2):
        outcome = Outcome()
        await complete(router, chat(temperature=0.8), outcome, ALICE)
        assert outcome.cache == "bypass"
    assert len(fakes["a"].requests) == 2
    assert cache.bypasses["not_deterministic"] == 2
    outcomes = [Outcome(), Outcome()]
    for outcome in outcomes:
        await complete(router, chat("n", temperature=0.8), outcome, ALICE)
    assert [o.cache for o in outcomes] == ["miss", "hit"]
    assert len(fakes["b"].requests) == 1


async def test_seeded_requests_are_cached(fakes: FakeAdapters) -> None:
    fakes["a"].add(chat_completion("seeded"))
    router, _ = cached_router(fakes, route("m", "a", non_stream="passthrough"))
    await complete(router, chat(seed=3, temperature=1.0), Outcome(), ALICE)
    outcome = Outcome()
    await complete(router, chat(seed=3, temperature=1.0), outcome, ALICE)
    assert outcome.cache == "hit"


async def test_keys_never_see_each_others_answers(fakes: FakeAdapters) -> None:
    fakes["a"].add(chat_completion("for alice"), chat_completion("for bob"))
    router, _ = cached_router(fakes, route("m", "a", non_stream="passthrough"))
    await complete(router, chat(**DETERMINISTIC), Outcome(), ALICE)
    outcome = Outcome()
    answer = await complete(router, chat(**DETERMINISTIC), outcome, BOB)
    assert outcome.cache == "miss"
    assert orjson.loads(answer.body)["choices"][0]["message"]["content"] == "for bob"


async def test_a_global_route_shares_answers_between_keys(fakes: FakeAdapters) -> None:
    fakes["a"].add(chat_completion("shared"))
    shared = RouteCacheConfig(scope="global")
    router, _ = cached_router(fakes, route("m", "a", non_stream="passthrough", cache=shared))
    await complete(router, chat(**DETERMINISTIC), Outcome(), ALICE)
    outcome = Outcome()
    await complete(router, chat(**DETERMINISTIC), outcome, BOB)
    assert outcome.cache == "hit"


async def test_a_key_that_opted_out_is_never_read_kept_or_shared(fakes: FakeAdapters) -> None:
    fakes["a"].then = chat_completion("private")
    shared = RouteCacheConfig(scope="global")  # even where every key shares answers
    router, cache = cached_router(fakes, route("m", "a", non_stream="passthrough", cache=shared))
    private = Call("req-p", caller="private", cache=False)
    for _ in range(2):
        outcome = Outcome()
        await complete(router, chat(**DETERMINISTIC), outcome, private)
        assert outcome.cache is None  # not in play: no header, not counted
    assert len(fakes["a"].requests) == 2
    outcome = Outcome()
    await complete(router, chat(**DETERMINISTIC), outcome, ALICE)
    assert outcome.cache == "miss"  # nothing of the private key's was kept
    assert cache.total("hit") == 0


async def test_a_route_may_turn_the_cache_off(fakes: FakeAdapters) -> None:
    fakes["a"].then = chat_completion("x")
    off = RouteCacheConfig(enabled=False)
    router, _ = cached_router(fakes, route("m", "a", non_stream="passthrough", cache=off))
    for _ in range(2):
        outcome = Outcome()
        await complete(router, chat(**DETERMINISTIC), outcome, ALICE)
        assert outcome.cache is None
    assert len(fakes["a"].requests) == 2


async def test_entries_expire_with_the_route_ttl(fakes: FakeAdapters) -> None:
    fakes["a"].then = chat_completion("x")
    clock = Clock()
    ttl = RouteCacheConfig(ttl_s=10)
    router, _ = cached_router(
        fakes, route("m", "a", non_stream="passthrough", cache=ttl), clock=clock
    )
    await complete(router, chat(**DETERMINISTIC), Outcome(), ALICE)
    clock.now += 9.5
    outcome = Outcome()
    await complete(router, chat(**DETERMINISTIC), outcome, ALICE)
    assert outcome.cache == "hit"
    clock.now += 1
    outcome = Outcome()
    await complete(router, chat(**DETERMINISTIC), outcome, ALICE)
    assert outcome.cache == "miss"
    assert len(fakes["a"].requests) == 2


async def test_no_cache_refreshes_and_no_store_neither_reads_nor_keeps(
    fakes: FakeAdapters,
) -> None:
    fakes["a"].add(chat_completion("old"), chat_completion("new"), chat_completion("other"))
    router, _ = cached_router(fakes, route("m", "a", non_stream="passthrough"))
    await complete(router, chat(**DETERMINISTIC), Outcome(), ALICE)
    refreshed = Outcome()
    await complete(router, chat(**DETERMINISTIC), refreshed, no_cache(ALICE, b"no-cache"))
    assert refreshed.cache == "miss"
    outcome = Outcome()
    answer = await complete(router, chat(**DETERMINISTIC), outcome, ALICE)
    assert outcome.cache == "hit"
    assert orjson.loads(answer.body)["choices"][0]["message"]["content"] == "new"
    bypassed = Outcome()
    other = chat(**DETERMINISTIC, max_tokens=3)
    await complete(router, other, bypassed, no_cache(ALICE, b"no-store"))
    assert bypassed.cache == "bypass"
    outcome = Outcome()
    fakes["a"].add(chat_completion("again"))
    await complete(router, other, outcome, ALICE)
    assert outcome.cache == "miss"  # no-store kept nothing


async def test_failures_and_unfinished_answers_are_never_kept(fakes: FakeAdapters) -> None:
    unfinished = chat_completion("cut").body
    assert isinstance(unfinished, dict)
    unfinished = {**unfinished, "choices": [{**unfinished["choices"][0], "finish_reason": None}]}
    no_usage = {k: v for k, v in unfinished.items() if k != "usage"}
    fakes["a"].add(Refuse(400))
    fakes["a"].then = chat_completion("whole")
    router, cache = cached_router(fakes, route("m", "a", non_stream="passthrough"))
    with pytest.raises(UpstreamRejected):  # the upstream's 400, as the client gets it
        await complete(router, chat(**DETERMINISTIC), Outcome(), ALICE)

    for body in (unfinished, no_usage):
        fakes["a"].add(Json(body))
        outcome = Outcome()
        await complete(router, chat(**DETERMINISTIC), outcome, ALICE)
        assert outcome.cache == "miss"
    assert cache.stored == 0
    await complete(router, chat(**DETERMINISTIC), Outcome(), ALICE)
    assert cache.stored == 1


async def test_a_stream_fills_the_cache_for_both_kinds(fakes: FakeAdapters) -> None:
    fakes["a"].add(Events(chat_events("Hel", "lo", prompt_tokens=9)))
    router, cache = cached_router(fakes, route("m", "a"))
    streamed = await stream(router, chat(stream=True, **DETERMINISTIC), Outcome(), ALICE)
    assert streamed.done and streamed.text == "Hello"
    assert cache.stored == 1
    outcome = Outcome()
    answer = await complete(router, chat(**DETERMINISTIC), outcome, ALICE)
    assert outcome.cache == "hit"
    body = orjson.loads(answer.body)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert body["usage"]["prompt_tokens"] == 9
    hit = Outcome()
    again = await stream(
        router,
        chat(stream=True, stream_options={"include_usage": True}, **DETERMINISTIC),
        hit,
        ALICE,
    )
    assert hit.cache == "hit" and again.backend == "cache"
    assert again.done and again.text == "Hello"
    assert again.chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert again.chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert again.chunks[-1]["usage"]["prompt_tokens"] == 9  # asked for: sent
    plain = await stream(router, chat(stream=True, **DETERMINISTIC), Outcome(), ALICE)
    assert all("usage" not in chunk for chunk in plain.chunks)  # not asked for
    assert len(fakes["a"].requests) == 1


async def test_a_whole_answer_serves_a_later_stream(fakes: FakeAdapters) -> None:
    fakes["a"].add(chat_completion("whole", prompt_tokens=4, completion_tokens=2))
    router, _ = cached_router(fakes, route("m", "a", non_stream="passthrough"))
    await complete(router, chat(**DETERMINISTIC), Outcome(), ALICE)
    outcome = Outcome()
    streamed = await stream(router, chat(stream=True, **DETERMINISTIC), outcome, ALICE)
    assert outcome.cache == "hit" and streamed.text == "whole" and streamed.done
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (4, 2)


async def test_broken_streams_are_never_kept(fakes: FakeAdapters) -> None:
    no_resume = {"resume": {"enabled": False}}
    fakes["a"].add(
        Events([chat_chunk(role=True), chat_chunk("Hel"), Break()]),
        Events([chat_chunk(role=True), chat_chunk("Hel"), b"data: [DONE]\n\n"]),
    )
    router, cache = cached_router(fakes, route("m", "a", **no_resume))
    broken = await stream(router, chat(stream=True, **DETERMINISTIC), Outcome(), ALICE)
    assert broken.interrupted is not None
    unfinished = await stream(router, chat(stream=True, **DETERMINISTIC), Outcome(), ALICE)
    assert unfinished.interrupted is None  # [DONE] without a finish_reason
    assert cache.stored == 0


async def test_a_stream_resumed_elsewhere_is_not_kept(fakes: FakeAdapters) -> None:
    fakes["a"].add(Events([chat_chunk(role=True), chat_chunk("Hel"), Break()]))
    fakes["b"].add(Events(chat_events("lo")))  # continues the prefill "Hel"
    first = backend("a", weight=1000)  # picked first: the one whose stream breaks
    router, cache = cached_router(fakes, route("m", first, "b"))
    outcome = Outcome()
    streamed = await stream(router, chat(stream=True, **DETERMINISTIC), outcome, ALICE)
    assert outcome.resumptions == 1
    assert streamed.done and streamed.text == "Hello"
    assert cache.stored == 0
