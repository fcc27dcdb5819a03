"""Coalescing across processes on a real Redis Cluster (three primaries): the lookup that
claims, the fill that gives the lease back and a flight's stream each run as one script on
the entry's slot, for keys spread over every node."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import RedisCluster

from gateway.config import RedisConfig
from gateway.wire.cachekey import cache_key
from policies.cache_redis import RedisStore, flight_name, watch_name
from policies.redis_state import RedisClient, RedisHealth, create_client
from tests.redis_cluster import RedisCluster as ClusterProcesses
from tests.redis_cluster import start_cluster


@pytest.fixture(scope="module")
def cluster(logs: Path) -> Iterator[ClusterProcesses]:
    started = start_cluster(logs)
    yield started
    started.stop()


@pytest.fixture
async def client(cluster: ClusterProcesses) -> AsyncIterator[RedisClient]:
    config = RedisConfig(cluster={"nodes": cluster.addresses[:2]}, socket_timeout_s=0.5)
    shared = create_client(config)
    assert isinstance(shared, RedisCluster)
    await shared.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield shared
    await shared.aclose()


def store(redis: RedisClient) -> RedisStore:
    return RedisStore(
        redis, key_prefix="c", timeout_s=1.0, probe_interval_s=1.0, health=RedisHealth("cache")
    )


async def test_claims_fills_and_flight_streams_on_every_node(
    cluster: ClusterProcesses, client: RedisClient
) -> None:
    leader, follower = store(client), store(client)
    names = [cache_key("/v1/chat/completions", "m", "global", {"n": n}) for n in range(12)]
    owners = {cluster.owner_of(f"c:cache:{{{name}}}") for name in names}
    assert len(owners) == 3  # every primary has some
    for name in names:
        taken = await leader.look_up(name, 5.0, streaming=True)
        assert taken.lease.startswith("s")
        held = await follower.look_up(name, 5.0, streaming=True)  # marks it watched
        assert held.holder == taken.lease and await leader.watched(name)
        await leader.append(name, [("h", b"{}"), ("e", b"data: 1\n\n")], 5.0, first=True)
        relayed = await follower.read_flight(name, "0", 0.1)
        assert [fields for _, fields in relayed] == [{"h": b"{}", "e": b"data: 1\n\n"}]
        await leader.append(name, [("end", b"null")], 1.0, last=True)
        assert not await leader.watched(name)
        leader.put(name, b'{"whole": 1}', 30, taken.lease)
    await leader.aclose()
    for name in names:
        hit = await follower.look_up(name, 5.0)
        assert hit.entry is not None and hit.entry.body == b'{"whole": 1}' and not hit.lease
        assert await client.exists(f"c:cache:lease:{{{name}}}") == 0
    # The flight's names share the entry's slot.
    for name in names:
        owner = cluster.owner_of(f"c:cache:{{{name}}}")
        assert cluster.owner_of(flight_name("c:cache:", name, cluster=True)) == owner
        assert cluster.owner_of(watch_name("c:cache:", name, cluster=True)) == owner
