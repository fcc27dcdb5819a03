"""Single flight: identical cacheable requests in flight at once share one upstream call."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from gateway.config import CacheConfig, RetryConfig
from gateway.errors import StreamInterrupted, UpstreamError
from gateway.router import Call, Outcome, Router
from gateway.router.build import build_router
from policies.cache import ResponseCache, memory_cache
from providers.fake import (
    DONE,
    Break,
    Events,
    FakeAdapters,
    Pause,
    Refuse,
    StreamItem,
    chat_chunk,
    usage_chunk,
)
from tests.router.conftest import chat, complete, gateway_config, route, stream

ALICE = Call("req-a", caller="alice")
DETERMINISTIC: dict[str, Any] = {"temperature": 0}


def cached_router(fakes: FakeAdapters, **fields: object) -> tuple[Router, ResponseCache]:
    cache = memory_cache(CacheConfig(enabled=True))
    router = build_router(gateway_config(route("m", "a", **fields)), adapters=fakes, cache=cache)
    return router, cache


def held_answer(release: asyncio.Event, *pieces: str) -> Events:
    """A stream that sends its role chunk and first piece, then waits for `release`."""
    first, *rest = pieces
    items: list[StreamItem] = [chat_chunk(role=True), chat_chunk(first), Pause(release)]
    for index, piece in enumerate(rest):
        items.append(chat_chunk(piece, finish="stop" if index == len(rest) - 1 else None))
    return Events([*items, usage_chunk(5, len(pieces)), DONE])


async def until(condition: object, *, what: str) -> None:
    """Let the other tasks run until `condition()` holds (no wall-clock wait)."""
    for _ in range(10_000):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never: {what}")


async def test_identical_requests_share_one_upstream_call(fakes: FakeAdapters) -> None:
    release = asyncio.Event()
    fakes["a"].add(held_answer(release, "Hel", "lo"))
    router, cache = cached_router(fakes)
    outcomes = [Outcome() for _ in range(100)]
    calls = [
        asyncio.create_task(complete(router, chat(**DETERMINISTIC), outcome, ALICE))
        for outcome in outcomes
    ]
    await until(lambda: len(fakes["a"].requests) == 1 and router.flights, what="a flight")
    await asyncio.sleep(0)
    release.set()
    answers = await asyncio.gather(*calls)
    assert len(fakes["a"].requests) == 1
    assert len({answer.body for answer in answers}) == 1
    assert orjson.loads(answers[0].body)["choices"][0]["message"]["content"] == "Hello"
    assert sorted(o.cache or "" for o in outcomes) == ["coalesced"] * 99 + ["miss"]
    assert all(o.completion_tokens == 2 for o in outcomes)  # each reports the usage
    assert cache.total("coalesced") == 99
    assert not router.flights


async def test_stream_followers_get_the_events_so_far_then_the_rest(fakes: FakeAdapters) -> None:
    release = asyncio.Event()
    fakes["a"].add(held_answer(release, "Hel", "lo", "!"))
    router, _ = cached_router(fakes)
    request = chat(stream=True, **DETERMINISTIC)
    leader = asyncio.create_task(stream(router, request, Outcome(), ALICE))
    await until(lambda: router.flights, what="the leader's flight")
    await until(lambda: next(iter(router.flights.values())).opened, what="the stream opened")
    follower_outcome = Outcome()
    follower = asyncio.create_task(stream(router, request, follower_outcome, ALICE))
    whole_outcome = Outcome()
    whole = asyncio.create_task(complete(router, chat(**DETERMINISTIC), whole_outcome, ALICE))
    await until(lambda: next(iter(router.flights.values())).readers.__len__() == 2, what="join")
    release.set()
    led, followed, answer = await asyncio.gather(leader, follower, whole)
    assert led.text == followed.text == "Hello!"
    assert led.done and followed.done
    assert follower_outcome.cache == whole_outcome.cache == "coalesced"
    assert follower_outcome.completion_tokens == 3
    assert orjson.loads(answer.body)["choices"][0]["message"]["content"] == "Hello!"
    assert len(fakes["a"].requests) == 1


async def test_the_leader_leaving_does_not_cancel_the_call_followers_wait_for(
    fakes: FakeAdapters,
) -> None:
    release = asyncio.Event()
    fakes["a"].add(held_answer(release, "Hel", "lo"))
    router, _ = cached_router(fakes)
    leader = asyncio.create_task(complete(router, chat(**DETERMINISTIC), Outcome(), ALICE))
    await until(lambda: len(fakes["a"].requests) == 1, what="the leader's call")
    outcome = Outcome()
    follower = asyncio.create_task(complete(router, chat(**DETERMINISTIC), outcome, ALICE))
    await until(lambda: next(iter(router.flights.values())).waiting == 1, what="a follower")
    leader.cancel()  # its client went away
    with pytest.raises(asyncio.CancelledError):
        await leader
    release.set()
    answer = await follower
    assert outcome.cache == "coalesced"
    assert orjson.loads(answer.body)["choices"][0]["message"]["content"] == "Hello"
    assert len(fakes["a"].requests) == 1


async def test_a_stream_nobody_reads_any_more_is_cancelled(fakes: FakeAdapters) -> None:
    release = asyncio.Event()
    fakes["a"].add(held_answer(release, "Hel", "lo"))
    router, _ = cached_router(fakes)
    opened = await router.open_stream(
        router.plan(chat(stream=True, **DETERMINISTIC), ALICE), Outcome()
    )
    flight = next(iter(router.flights.values()))
    opened.close()  # the only reader leaves before the end
    await until(lambda: flight.done and not router.flights, what="the call cancelled")
    assert fakes["a"].responses[0].closed
    assert router.admission.in_flight == 0


async def test_a_failed_leaders_followers_try_once_on_their_own(fakes: FakeAdapters) -> None:
    release = asyncio.Event()

    fakes["a"].add(
        Events([chat_chunk(role=True), Pause(release), b"data: not json\n\n"]),
    )
    fakes["a"].then = Refuse(503)
    router, _ = cached_router(fakes, retries=RetryConfig(max_retries=0))
    calls = [
        asyncio.create_task(complete(router, chat(**DETERMINISTIC), Outcome(), ALICE))
        for _ in range(5)
    ]
    await until(lambda: router.flights and len(fakes["a"].requests) == 1, what="the leader")
    await until(lambda: next(iter(router.flights.values())).waiting == 4, what="followers")
    release.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(result, UpstreamError) for result in results)
    # The leader's one call, then each follower's one, never a second round of flights.
    assert len(fakes["a"].requests) == 5


async def test_a_broken_shared_stream_ends_every_reader_with_its_error(
    fakes: FakeAdapters,
) -> None:
    release = asyncio.Event()
    fakes["a"].add(Events([chat_chunk(role=True), chat_chunk("Hel"), Pause(release), Break()]))
    router, cache = cached_router(fakes, resume={"enabled": False})
    request = chat(stream=True, **DETERMINISTIC)
    leader = asyncio.create_task(stream(router, request, Outcome(), ALICE))
    await until(lambda: router.flights, what="the flight")
    await until(lambda: next(iter(router.flights.values())).opened, what="opened")
    follower = asyncio.create_task(stream(router, request, Outcome(), ALICE))
    await until(lambda: len(next(iter(router.flights.values())).readers) == 2, what="join")
    release.set()
    led, followed = await asyncio.gather(leader, follower)
    assert isinstance(led.interrupted, StreamInterrupted)
    assert isinstance(followed.interrupted, StreamInterrupted)
    assert cache.stored == 0


async def test_stream_followers_get_the_usage_they_asked_for(fakes: FakeAdapters) -> None:
    release = asyncio.Event()
    fakes["a"].add(held_answer(release, "Hel", "lo"))
    router, _ = cached_router(fakes)
    plain = chat(stream=True, **DETERMINISTIC)
    with_usage = chat(stream=True, stream_options={"include_usage": True}, **DETERMINISTIC)
    leader = asyncio.create_task(stream(router, plain, Outcome(), ALICE))
    await until(lambda: router.flights, what="the flight")
    await until(lambda: next(iter(router.flights.values())).opened, what="opened")
    outcome = Outcome()
    follower = asyncio.create_task(stream(router, with_usage, outcome, ALICE))
    same = asyncio.create_task(stream(router, plain, Outcome(), ALICE))
    await until(lambda: next(iter(router.flights.values())).waiting == 1, what="a follower")
    release.set()
    led, followed, alike = await asyncio.gather(leader, follower, same)
    assert led.text == followed.text == alike.text == "Hello"
    assert not any("usage" in chunk for chunk in led.chunks + alike.chunks)
    assert followed.chunks[-1]["usage"]["completion_tokens"] == 2  # asked for: sent
    assert outcome.cache == "coalesced"
    assert len(fakes["a"].requests) == 1


async def test_a_reader_too_far_behind_is_cut_off(
    fakes: FakeAdapters,
) -> None:
    release = asyncio.Event()
    big = "x" * 600
    fakes["a"].add(held_answer(release, big, big, big))
    cache = memory_cache(CacheConfig(enabled=True, max_entry_bytes=1024))
    router = build_router(gateway_config(route("m", "a")), adapters=fakes, cache=cache)
    request = chat(stream=True, **DETERMINISTIC)
    slow = await router.open_stream(router.plan(request, ALICE), Outcome())  # reads nothing yet
    flight = next(iter(router.flights.values()))
    follower = asyncio.create_task(stream(router, request, Outcome(), ALICE))
    await until(lambda: len(flight.readers) == 2, what="the follower joined")
    release.set()
    followed = await follower
    assert followed.done and followed.text == big * 3  # it kept up
    assert not flight.joinable  # the log outgrew max_entry_bytes
    try:
        with pytest.raises(StreamInterrupted) as cut:
            async for _ in slow.rest():
                pass
        assert cut.value.code == "coalesced_reader_too_slow"
    finally:
        slow.close()
    assert len(fakes["a"].requests) == 1
