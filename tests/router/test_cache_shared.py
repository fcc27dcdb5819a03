"""Coalescing across processes through a real redis-server: two routers, each with its own
store and client, stand for two gateway processes. A miss's lookup claims the key's lease
in the same call; only the holder leads; a stream is relayed to the other process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from gateway.config import CacheConfig, RedisConfig, RouteCacheConfig
from gateway.router import Call, Outcome, Router
from gateway.router.build import build_router
from policies.cache import Lookup, ResponseCache
from policies.cache_redis import RedisStore, redis_cache
from policies.redis_pipelined import request_path_client
from policies.redis_state import RedisClient, create_client
from providers.fake import DONE, Events, FakeAdapters, Pause, StreamItem, chat_chunk, usage_chunk
from tests.router.conftest import chat, complete, gateway_config, route, stream
from tests.servers import RedisServer, start_redis

ALICE = Call("req-a", caller="alice")
DETERMINISTIC: dict[str, Any] = {"temperature": 0}
GLOBAL = RouteCacheConfig(scope="global")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("cache-shared"))
    yield server
    server.stop()


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[RedisClient]:
    client = create_client(RedisConfig(url=redis_server.url, socket_timeout_s=1.0))
    await client.flushall()
    yield client
    await client.aclose()


class Process:
    """One gateway process's router and cache, on the shared Redis; its leases counted."""

    def __init__(self, url: str, fakes: FakeAdapters) -> None:
        settings = RedisConfig(url=url, socket_timeout_s=1.0, key_prefix="p")
        self.redis = create_client(settings)
        self.fast = request_path_client(settings)
        self.cache: ResponseCache = redis_cache(
            CacheConfig(enabled=True, backend="redis", redis_timeout_s=1.0),
            settings,
            self.redis,
            fast=self.fast,
        )
        store = self.cache.shared
        assert isinstance(store, RedisStore)
        self.store = store
        self.leases = 0
        looked_up = store.look_up

        async def counted(key: str, lease_s: float, *, streaming: bool = False) -> Lookup:
            found = await looked_up(key, lease_s, streaming=streaming)
            self.leases += bool(found.lease)
            return found

        store.look_up = counted  # type: ignore[method-assign]
        self.router: Router = build_router(
            gateway_config(route("m", "a", cache=GLOBAL)), adapters=fakes, cache=self.cache
        )

    async def aclose(self) -> None:
        await self.store.aclose()
        await self.redis.aclose()
        if self.fast is not None:
            await self.fast.aclose()


def held_answer(release: asyncio.Event, *pieces: str) -> Events:
    """A stream that sends its role chunk and first piece, then waits for `release`."""
    first, *rest = pieces
    items: list[StreamItem] = [chat_chunk(role=True), chat_chunk(first), Pause(release)]
    for index, piece in enumerate(rest):
        items.append(chat_chunk(piece, finish="stop" if index == len(rest) - 1 else None))
    return Events([*items, usage_chunk(5, len(pieces)), DONE])


async def until(condition: Callable[[], object], *, what: str, timeout_s: float = 10.0) -> None:
    """Poll `condition()` (it may wait on Redis's answers), bounded."""
    for _ in range(round(timeout_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never: {what}")


async def test_a_refused_requests_prefetch_gives_its_lease_back(
    redis_server: RedisServer, admin: RedisClient
) -> None:
    fakes = FakeAdapters()
    process = Process(redis_server.url, fakes)
    try:
        router = process.router
        plan = router.plan(chat(**DETERMINISTIC), ALICE)
        router.prefetch(plan)  # the lookup that claims, sent with the limit check
        assert plan.prefetched is not None and plan.prefetched.read is not None
        plan.prefetched.drop()  # its limits refused it
        await asyncio.wait_for(asyncio.shield(plan.prefetched.read), 5)
        assert process.leases == 1
        leases: list[Any] = []

        async def count() -> None:
            leases[:] = await admin.keys("p:cache:lease:*")

        await count()
        for _ in range(200):  # given back in the background: bounded
            if not leases:
                break
            await asyncio.sleep(0.01)
            await count()
        assert leases == []
    finally:
        await process.aclose()


async def test_only_the_lease_holder_leads_and_followers_take_no_lease(
    redis_server: RedisServer, admin: RedisClient
) -> None:
    release = asyncio.Event()
    fakes_a, fakes_b = FakeAdapters(), FakeAdapters()
    fakes_a["a"].add(held_answer(release, "Hel", "lo"))
    fakes_b["a"].add(held_answer(release, "Hel", "lo"))
    one, two = Process(redis_server.url, fakes_a), Process(redis_server.url, fakes_b)
    try:
        outcomes = [Outcome() for _ in range(20)]
        calls = [
            asyncio.create_task(
                complete((one, two)[i % 2].router, chat(**DETERMINISTIC), outcome, ALICE)
            )
            for i, outcome in enumerate(outcomes)
        ]

        def requests() -> int:
            return len(fakes_a["a"].requests) + len(fakes_b["a"].requests)

        await until(lambda: requests() == 1, what="the holder's call")
        release.set()
        answers = await asyncio.gather(*calls)
        assert len({answer.body for answer in answers}) == 1
        assert requests() == 1
        assert sorted(o.cache or "" for o in outcomes) == ["coalesced"] * 19 + ["miss"]
        assert one.leases + two.leases == 1  # one holder; every other lookup took none
        hit = Outcome()
        await complete(two.router, chat(**DETERMINISTIC), hit, ALICE)
        assert hit.cache == "hit" and one.leases + two.leases == 1  # a hit takes none
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_stream_is_relayed_to_the_other_process_as_it_comes(
    redis_server: RedisServer, admin: RedisClient
) -> None:
    release = asyncio.Event()
    fakes_a, fakes_b = FakeAdapters(), FakeAdapters()
    fakes_a["a"].add(held_answer(release, "Hel", "lo", "!"))
    one, two = Process(redis_server.url, fakes_a), Process(redis_server.url, fakes_b)
    try:
        request = chat(stream=True, **DETERMINISTIC)
        leader = asyncio.create_task(stream(one.router, request, Outcome(), ALICE))
        await until(lambda: one.router.relays, what="the leader relays its stream")
        opened = await two.router.open_stream(two.router.plan(request, ALICE), Outcome())
        try:
            # The events so far, while the leader's upstream still holds the rest back.
            assert b'"Hel"' in opened.first and not release.is_set()
            assert opened.backend.name == "a"
            release.set()
            rest = [events async for events in opened.rest()]
        finally:
            opened.close()
        led = await leader
        followed = opened.first + b"".join(rest)
        assert followed == led.body and led.done
        assert len(fakes_a["a"].requests) == 1 and not fakes_b["a"].requests
        await until(lambda: not one.router.relays, what="the relay's end marker sent")
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_watched_stream_outlives_its_leaders_client(
    redis_server: RedisServer, admin: RedisClient
) -> None:
    """The leader's client leaving cancels a stream nobody reads; one that a follower in
    another process reads runs on to its end (and is kept)."""
    release = asyncio.Event()
    fakes_a, fakes_b = FakeAdapters(), FakeAdapters()
    fakes_a["a"].add(held_answer(release, "Hel", "lo", "!"))
    one, two = Process(redis_server.url, fakes_a), Process(redis_server.url, fakes_b)
    try:
        request = chat(stream=True, **DETERMINISTIC)
        leading = await one.router.open_stream(one.router.plan(request, ALICE), Outcome())
        following = await two.router.open_stream(two.router.plan(request, ALICE), Outcome())
        try:
            leading.close()  # its client went away, with the follower reading
            flight = next(iter(one.router.flights.values()))
            assert flight.wanted() and not flight.done
            release.set()
            rest = [events async for events in following.rest()]
        finally:
            following.close()
        body = following.first + b"".join(rest)
        assert b'"Hel"' in body and b'"!"' in body and body.endswith(b"data: [DONE]\n\n")
        await until(lambda: one.cache.stored == 1, what="the answer kept")
        assert len(fakes_a["a"].requests) == 1 and not fakes_b["a"].requests
        await until(lambda: not one.router.relays, what="the relay's end marker sent")
        assert await admin.keys("p:cache:watch:*") == []  # dropped with the last entry
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_relayed_streams_process_gives_its_own_followers_the_whole_answer(
    redis_server: RedisServer, admin: RedisClient
) -> None:
    """In the follower's process, requests that want the whole answer (not a stream, or
    other stream_options) join that process's flight, which reads the relayed stream: they
    get the leader's kept answer, never a call of their own."""
    release = asyncio.Event()
    fakes_a, fakes_b = FakeAdapters(), FakeAdapters()
    fakes_a["a"].add(held_answer(release, "Hel", "lo", "!"))
    fakes_b["a"].then = Events([chat_chunk(role=True), chat_chunk("other", finish="stop"), DONE])
    one, two = Process(redis_server.url, fakes_a), Process(redis_server.url, fakes_b)
    try:
        request = chat(stream=True, **DETERMINISTIC)
        leader = asyncio.create_task(stream(one.router, request, Outcome(), ALICE))
        await until(lambda: one.router.relays, what="the leader relays its stream")
        follower = asyncio.create_task(stream(two.router, request, Outcome(), ALICE))
        await until(lambda: two.router.flights, what="the other process's flight")
        whole_outcome, other_outcome = Outcome(), Outcome()
        whole = asyncio.create_task(
            complete(two.router, chat(**DETERMINISTIC), whole_outcome, ALICE)
        )
        usage = chat(stream=True, stream_options={"include_usage": True}, **DETERMINISTIC)
        other = asyncio.create_task(stream(two.router, usage, other_outcome, ALICE))
        await until(lambda: next(iter(two.router.flights.values())).waiting == 2, what="join")
        release.set()
        led, followed, answer, otherwise = await asyncio.gather(leader, follower, whole, other)
        assert led.text == followed.text == otherwise.text == "Hello!"
        assert b"Hello!" in answer.body
        assert whole_outcome.cache == other_outcome.cache == "coalesced"
        assert len(fakes_a["a"].requests) == 1 and not fakes_b["a"].requests
    finally:
        await one.aclose()
        await two.aclose()
