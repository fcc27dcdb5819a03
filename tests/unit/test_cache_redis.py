"""The response cache's Redis store against a real redis-server: entries, TTL, clearing,
counting, and a Redis that fails or stalls being a bypass, never an error."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from gateway.config import RedisConfig
from gateway.wire.cachekey import cache_key, tag
from policies.cache import CacheUnavailable
from policies.cache_redis import RedisStore
from policies.redis_pipelined import PipelinedRedis, request_path_client
from policies.redis_state import RedisClient, RedisHealth, create_client
from tests.servers import RedisServer, start_redis


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("cache-redis"))
    yield server
    server.stop()


@pytest.fixture(params=["pipelined", "redis-py"])
def kind(request: pytest.FixtureRequest) -> str:
    """The request path's client: the gateway's pipelined one on a `redis.url`, redis-py's
    behind Sentinel or a Cluster (the admin's walks are redis-py's either way)."""
    return str(request.param)


def fast_client(kind: str, url: str, timeout_s: float = 1.0) -> PipelinedRedis | None:
    return (
        request_path_client(RedisConfig(url=url, socket_timeout_s=timeout_s))
        if kind == "pipelined"
        else None
    )


@pytest.fixture
async def fast(redis_server: RedisServer, kind: str) -> AsyncIterator[PipelinedRedis | None]:
    client = fast_client(kind, redis_server.url)
    yield client
    if client is not None:
        await client.aclose()


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[RedisClient]:
    redis = create_client(RedisConfig(url=redis_server.url, socket_timeout_s=1.0))
    await redis.flushall()
    yield redis
    await redis.aclose()


def store(
    redis: RedisClient,
    clock: Clock | None = None,
    timeout_s: float = 0.5,
    fast: PipelinedRedis | None = None,
) -> RedisStore:
    return RedisStore(
        redis,
        key_prefix="t",
        timeout_s=timeout_s,
        probe_interval_s=1.0,
        health=RedisHealth("cache"),
        clock=clock or Clock(),
        fast=fast,
    )


def key(route: str, scope: str, text: str) -> str:
    return cache_key("/v1/chat/completions", route, scope, {"prompt": text})


async def settled(shared: RedisStore) -> None:
    await shared.aclose()  # the fills in flight have landed


async def test_an_entry_round_trips_with_its_ttl_and_no_prompt_in_its_name(
    client: Redis, fast: PipelinedRedis | None
) -> None:
    shared = store(client, fast=fast)
    name = key("m", "key:alice", "a secret prompt")
    assert await shared.get(name) is None
    shared.put(name, b'{"answer": 1}', 30)
    await settled(shared)
    entry = await shared.get(name)
    assert entry is not None and entry.body == b'{"answer": 1}' and entry.created > 0
    (stored,) = await client.keys("t:cache:*")
    assert b"secret" not in stored and b"alice" not in stored
    assert 29_000 < await client.pttl(stored) <= 30_000


async def test_clear_by_route_or_scope_and_count(
    client: Redis, fast: PipelinedRedis | None
) -> None:
    shared = store(client, fast=fast)
    for route, scope in (("m", "key:a"), ("m", "key:b"), ("n", "key:a"), ("n", "global")):
        shared.put(key(route, scope, "x"), b"12345", 60)
    await settled(shared)
    assert await shared.stats() == {"entries": 4, "bytes": 4 * (len(b"12345") + 15)}
    assert await shared.clear(route_tag=tag("m")) == 2
    assert await shared.clear(scope_tag=tag("key:a")) == 1
    assert await shared.clear() == 1
    assert (await shared.stats())["entries"] == 0


async def test_a_redis_that_is_gone_is_a_bypass_probed_once_per_interval(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, kind: str
) -> None:
    server = start_redis(tmp_path_factory.mktemp("cache-redis-gone"))
    redis = create_client(RedisConfig(url=server.url, socket_timeout_s=0.5))
    clock = Clock()
    shared = store(redis, clock, fast=fast_client(kind, server.url, 0.5))
    try:
        assert await shared.get("r:s:k") is None
        server.kill()
        with pytest.raises(CacheUnavailable):
            await shared.get("r:s:k")
        assert shared.health.up is False
        calls = 0
        original = shared.calls.get

        async def counted(name: str) -> object:
            nonlocal calls
            calls += 1
            return await original(name)

        shared.calls.get = counted  # type: ignore[method-assign,assignment]
        for _ in range(5):  # within the probe interval: nobody waits on Redis
            with pytest.raises(CacheUnavailable):
                await shared.get("r:s:k")
        assert calls == 0
        shared.put("r:s:k", b"x", 10)  # fills wait for Redis to be back
        assert not shared._pending
        revived = start_redis(tmp_path_factory.mktemp("cache-redis-back"), port=server.port)
        try:
            clock.now += 1.0  # the next probe is due
            assert await shared.get("r:s:k") is None
            assert shared.health.up is True and calls == 1
        finally:
            revived.stop()
    finally:
        server.stop()
        await redis.aclose()
        await shared.calls.aclose()


async def test_a_stalled_redis_is_a_bypass_after_the_lookup_timeout(
    tmp_path_factory: pytest.TempPathFactory, kind: str
) -> None:
    server = start_redis(tmp_path_factory.mktemp("cache-redis-stalled"))
    redis = create_client(RedisConfig(url=server.url, socket_timeout_s=5.0))
    shared = store(redis, timeout_s=0.05, fast=fast_client(kind, server.url, 5.0))
    try:
        assert await shared.get("r:s:k") is None  # connected
        os.kill(server.popen.pid, signal.SIGSTOP)  # alive, answering nothing
        try:
            with pytest.raises(CacheUnavailable):
                await shared.get("r:s:k")  # bounded by the lookup's 50 ms, not the socket's 5 s
            assert shared.health.up is False
        finally:
            os.kill(server.popen.pid, signal.SIGCONT)
    finally:
        await redis.aclose()
        await shared.calls.aclose()
        server.stop()


async def test_one_process_at_a_time_leads_a_keys_call(
    client: Redis, fast: PipelinedRedis | None
) -> None:
    first, second = store(client, fast=fast), store(client)
    name = key("m", "global", "shared")
    lease = await first.claim(name, 5.0)
    assert lease
    assert await second.claim(name, 5.0) is None  # the other process waits
    waiting = asyncio.create_task(second.await_entry(name, 5.0))
    first.put(name, b'{"whole": 1}', 30, lease)  # kept, then the lease given back
    entry = await waiting
    assert entry is not None and entry.body == b'{"whole": 1}'
    await settled(first)
    assert await client.exists(f"t:cache:lease:{name}") == 0
    assert await second.claim(name, 5.0)  # free again


async def test_a_failed_leader_lets_the_others_go_on_at_once(
    client: Redis, fast: PipelinedRedis | None
) -> None:
    first, second = store(client, fast=fast), store(client)
    name = key("m", "global", "failed")
    lease = await first.claim(name, 30.0)
    assert lease and await second.claim(name, 30.0) is None
    waiting = asyncio.create_task(second.await_entry(name, 30.0))
    first.release(name, "not-its-token")  # only the holder gives it back
    await settled(first)
    assert not waiting.done()
    first.release(name, lease)
    assert await waiting is None  # well before the lease's 30 s


async def test_many_entries_in_one_lookup(client: Redis, fast: PipelinedRedis | None) -> None:
    shared = store(client, fast=fast)
    names = [key("e", "key:a", text) for text in ("one", "two", "three")]
    shared.put(names[0], b"1", 30)
    shared.put(names[2], b"3", 30)
    await settled(shared)
    found = await shared.get_many(names)
    assert [None if entry is None else entry.body for entry in found] == [b"1", None, b"3"]


async def test_a_miss_looks_up_and_claims_in_one_call_and_a_hit_claims_nothing(
    client: Redis, fast: PipelinedRedis | None
) -> None:
    first, second = store(client, fast=fast), store(client)
    name = key("m", "global", "one call")
    lease_key = f"t:cache:lease:{name}"
    taken = await first.look_up(name, 5.0, streaming=True)
    assert taken.entry is None and taken.lease.startswith("s") and taken.holder is None
    assert await client.get(lease_key) == taken.lease.encode()
    assert 4_000 < await client.pttl(lease_key) <= 5_000
    held = await second.look_up(name, 5.0)
    assert held.entry is None and held.lease == "" and held.holder == taken.lease
    assert not await first.watched(name)  # a follower of the whole answer: nothing to relay
    watching = await second.look_up(name, 5.0, streaming=True)
    assert watching.holder == taken.lease and await first.watched(name)  # a stream's does
    first.put(name, b'{"whole": 1}', 30, taken.lease)  # kept and given back in one call
    await settled(first)
    assert await client.exists(lease_key) == 0
    hit = await second.look_up(name, 5.0)
    assert hit.entry is not None and hit.entry.body == b'{"whole": 1}' and hit.lease == ""
    assert await client.exists(lease_key) == 0  # a hit takes no lease


async def test_a_flight_stream_is_read_from_its_start_then_as_it_comes(
    client: Redis, fast: PipelinedRedis | None
) -> None:
    leader, follower = store(client, fast=fast), store(client)
    name = key("m", "global", "relayed")
    await leader.append(name, [("h", b"{}"), ("abort", b"{}")], 5.0, first=True, last=True)
    # A later flight of the key starts its stream afresh: the earlier one's is gone.
    await leader.append(name, [("h", b"{}"), ("e", b"data: 1\n\n")], 5.0, first=True)
    so_far = await follower.read_flight(name, "0", 0.05)
    assert [fields for _, fields in so_far] == [{"h": b"{}", "e": b"data: 1\n\n"}]
    assert 4_000 < await client.pttl(f"t:cache:flight:{name}") <= 5_000
    waiting = asyncio.create_task(follower.read_flight(name, so_far[-1][0], 0.25))
    await asyncio.sleep(0.02)  # blocked on the server by then, most likely: either way it reads
    await client.set(f"t:cache:watch:{name}", 1)  # a follower watches
    await leader.append(name, [("e", b"data: 2\n\n"), ("end", b"null")], 1.0, last=True)
    rest = await waiting
    assert [fields for _, fields in rest] == [{"e": b"data: 2\n\n", "end": b"null"}]
    assert not await leader.watched(name)  # the last entry dropped the mark
    assert await follower.read_flight(name, rest[-1][0], 0.01) == []  # nothing more


async def test_the_admin_counts_and_clears_entries_not_what_lies_beside_them(
    client: Redis, fast: PipelinedRedis | None
) -> None:
    shared = store(client, fast=fast)
    name = key("m", "global", "beside")
    found = await shared.look_up(name, 5.0, streaming=True)  # a lease
    await shared.append(name, [("h", b"{}")], 5.0, first=True)  # a flight stream
    await store(client).look_up(name, 5.0, streaming=True)  # a watch mark
    shared.put(key("m", "global", "kept"), b"12345", 30)
    await settled(shared)
    assert len(await client.keys("t:cache:*")) == 4
    assert await shared.stats() == {"entries": 1, "bytes": len(b"12345") + 15}
    assert await shared.clear() == 1
    assert found.lease and await client.get(f"t:cache:lease:{name}") == found.lease.encode()
