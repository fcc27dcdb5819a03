"""Redis Cluster, against real processes: three primaries (tests/redis_cluster.py). Every
component that shares state through Redis works on it: per-key limits stay exact across
processes, a shared breaker opened in one process is seen open in another, the response
cache keeps, finds, counts and clears entries on every node, and a gateway configured
with `redis.cluster` serves requests with exact limits. A primary killed (no replica to
take over) makes nothing hang: requests are served within the bound, fail-open."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from redis.asyncio import RedisCluster

from gateway.config import BreakerConfig, RedisConfig, load_config
from gateway.edge.auth import hash_key
from gateway.errors import ConfigError
from gateway.wire.cachekey import cache_key, tag
from policies.breaker import BackendBreaker
from policies.breaker_sync import BreakerSync
from policies.cache_redis import RedisStore
from policies.limits_redis import RedisLimits
from policies.redis_state import REDIS_ERRORS, RedisClient, RedisHealth, create_client
from tests.policies.test_breaker import fail
from tests.redis_cluster import RedisCluster as ClusterProcesses
from tests.redis_cluster import start_cluster
from tests.servers import (
    KEYS_FILE,
    Process,
    RedisServer,
    backend,
    free_port,
    gateway_config,
    iter_stop,
    poll_until,
    start_gateway,
    start_sim,
)

MESSAGES = [{"role": "user", "content": "hello there"}]
EXACT_RPM = 5
EXACT_KEY = "vg-test-cluster-exact-01234567890abc"
LOAD_KEY = "vg-test-cluster-load-012345678901abc"
REQUEST_BOUND_S = 8.0


@pytest.fixture(scope="module")
def cluster(logs: Path) -> Iterator[ClusterProcesses]:
    started = start_cluster(logs)
    yield started
    started.stop()


def cluster_config(cluster: ClusterProcesses, **extra: Any) -> RedisConfig:
    return RedisConfig(cluster={"nodes": cluster.addresses[:2]}, socket_timeout_s=0.5, **extra)


@pytest.fixture
async def client(cluster: ClusterProcesses) -> AsyncIterator[RedisClient]:
    shared = create_client(cluster_config(cluster))
    assert isinstance(shared, RedisCluster)
    await shared.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield shared
    await shared.aclose()


# Configuration.


@pytest.mark.parametrize(
    ("redis", "field"),
    [
        ({"url": "redis://x:6379", "cluster": {"nodes": ["h:1"]}}, "redis"),
        (
            {
                "sentinel": {"service_name": "m", "sentinels": ["h:1"]},
                "cluster": {"nodes": ["h:1"]},
            },
            "redis",
        ),
        ({"cluster": {"nodes": []}}, "redis.cluster.nodes"),
        ({"cluster": {"nodes": ["no-port"]}}, "redis.cluster.nodes"),
        ({"cluster": {"nodes": ["h:1", "h:1"]}}, "redis.cluster.nodes"),
        ({"cluster": {"nodes": ["h:99999"]}}, "redis.cluster.nodes"),
        ({"cluster": {}}, "redis.cluster.nodes"),
        ({"cluster": True}, "redis.cluster"),
        ({"cluster": {"nodes": ["h:1"], "pasword_env": "X"}}, "redis.cluster.pasword_env"),
    ],
)
def test_a_wrong_cluster_section_fails_at_start_up_naming_the_field(
    tmp_path: Path, redis: dict[str, Any], field: str
) -> None:
    raw = {
        "keys": {"file": str(KEYS_FILE)},
        "redis": redis,
        "models": [{"name": "m", "backends": [backend("b", "http://127.0.0.1:1")]}],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.field == field


def test_a_cluster_section_makes_a_cluster_client_with_the_same_bounds() -> None:
    config = RedisConfig(
        cluster={"nodes": ["10.0.0.1:7000", "[::1]:7001"]}, socket_timeout_s=0.2, max_connections=8
    )
    assert config.enabled and config.url is None and config.sentinel is None
    assert config.cluster is not None
    assert config.cluster.addresses() == [("10.0.0.1", 7000), ("::1", 7001)]
    client = create_client(config)  # nothing is connected yet: an unreachable node is fine
    assert isinstance(client, RedisCluster)
    assert client.connection_kwargs["socket_timeout"] == 0.2
    assert client.connection_kwargs["socket_connect_timeout"] == 0.2
    assert client.retry.get_retries() == 1


def test_a_missing_cluster_password_variable_names_the_field() -> None:
    config = RedisConfig(cluster={"nodes": ["127.0.0.1:1"], "password_env": "NO_SUCH_VAR"})
    with pytest.raises(ConfigError) as caught:
        create_client(config, "gateway.yaml")
    assert caught.value.field == "redis.cluster.password_env"


# Limits.


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    tokens_per_day: int | None = None
    max_concurrent: int | None = None


def key_ids_on_every_primary(cluster: ClusterProcesses, prefix: str) -> list[str]:
    """Key ids whose limits live on different primaries: one per primary at least."""
    by_owner: dict[int, str] = {}
    for n in range(200):
        key_id = f"key-{n}"
        by_owner.setdefault(cluster.owner_of(f"{prefix}:rl:{{{key_id}}}"), key_id)
        if len(by_owner) == 3:
            return list(by_owner.values())
    raise AssertionError(f"key ids on {len(by_owner)} primaries only")


def flush_scripts(cluster: ClusterProcesses) -> None:
    """Every primary forgets its scripts, as a restarted one has."""
    for port in cluster.primary_ports():
        with redis.Redis(port=port, socket_timeout=1.0) as node:
            node.script_flush()


async def test_limits_stay_exact_across_two_stores_on_every_primary(
    cluster: ClusterProcesses, client: RedisClient
) -> None:
    other = create_client(cluster_config(cluster))
    stores = [
        RedisLimits(shared, key_prefix="lim", timeout_s=2.0, max_calls=8)
        for shared in (client, other)
    ]
    try:
        key_ids = key_ids_on_every_primary(cluster, "lim")
        limits = Limits(rpm=7, max_concurrent=5)
        # 30 concurrent admits per key, half through each store: exactly the limit admitted.
        verdicts = await asyncio.gather(
            *(stores[n % 2].admit(key_id, limits, 1) for key_id in key_ids for n in range(30))
        )
        for index, key_id in enumerate(key_ids):
            mine = verdicts[index * 30 : (index + 1) * 30]
            assert sum(v.allowed for v in mine) == 5, key_id  # max_concurrent is the tighter
        # Settled in one pipeline across the primaries; then the scripts are gone (a node
        # restarted, say): NOSCRIPT is handled, and the freed slots admit again, exactly.
        tickets = [v.ticket for v in verdicts if v.ticket is not None]
        assert await stores[0].settle_many([(ticket, 1, False) for ticket in tickets]) == [
            True
        ] * len(tickets)
        flush_scripts(cluster)
        again = await asyncio.gather(
            *(stores[n % 2].admit(key_id, limits, 1) for key_id in key_ids for n in range(4))
        )
        # rpm 7: 5 spent, 2 left for each key.
        for index, key_id in enumerate(key_ids):
            assert sum(v.allowed for v in again[index * 4 : (index + 1) * 4]) == 2, key_id
        flush_scripts(cluster)
        tickets = [v.ticket for v in again if v.ticket is not None]
        assert all(await stores[1].settle_many([(t, None, True) for t in tickets]))
        usage = await stores[0].usage(key_ids[0], limits)
        assert usage is not None
    finally:
        await other.aclose()


# Shared breakers.


class BreakerView:
    """One gateway process's breaker, shared through the cluster (its own client and sync)."""

    def __init__(self, cluster: ClusterProcesses, prefix: str) -> None:
        config = BreakerConfig(consecutive_failures=2, open_s=30, min_requests=1000)
        self.breaker = BackendBreaker("w1", config, route="tiny-llama")
        self.changes: list[bool] = []
        self.redis = create_client(cluster_config(cluster))
        self.sync = BreakerSync(
            self.redis,
            [self.breaker],
            key_prefix=prefix,
            timeout_s=0.5,
            health=RedisHealth("breaker", lambda _, up: self.changes.append(up)),
            check_interval_s=0.2,
            backoff_initial_s=0.02,
            backoff_max_s=0.2,
        )

    async def aclose(self) -> None:
        await self.sync.aclose()
        await self.redis.aclose()


async def eventually(predicate: Callable[[], Any], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.01)


async def test_a_breaker_opened_in_one_process_is_seen_open_in_another(
    cluster: ClusterProcesses, client: RedisClient
) -> None:
    a, b = BreakerView(cluster, "brk"), BreakerView(cluster, "brk")
    try:
        await a.sync.start()
        await b.sync.start()
        assert a.changes == [True] and b.changes == [True]
        # Key and channel on one slot: the catch-up is one MGET, the script single-slot.
        assert a.sync.key(a.breaker) == "{brk:breaker}:tiny-llama:w1"
        while a.breaker.state != "open":
            fail(a.breaker)
        await eventually(lambda: b.breaker.state == "open")  # by the message
        assert b.breaker.opened_at == a.breaker.opened_at
        assert await client.get(a.sync.key(a.breaker)) is not None
    finally:
        await a.aclose()
        await b.aclose()
    # A process that starts late reads what is open from the key (its catch-up).
    late = BreakerView(cluster, "brk")
    try:
        await late.sync.start()
        assert late.breaker.state == "open"
    finally:
        await late.aclose()


# The response cache.


def cache_store(redis: RedisClient) -> RedisStore:
    return RedisStore(
        redis, key_prefix="c", timeout_s=1.0, probe_interval_s=1.0, health=RedisHealth("cache")
    )


def entry(route: str, scope: str, text: str) -> str:
    return cache_key("/v1/chat/completions", route, scope, {"prompt": text})


async def test_cache_entries_across_slots_are_kept_found_counted_and_cleared(
    cluster: ClusterProcesses, client: RedisClient
) -> None:
    shared = cache_store(client)
    names = [
        entry(route, scope, str(n))
        for route, scope in (("m", "key:a"), ("m", "key:b"), ("n", "global"))
        for n in range(20)
    ]
    for name in names:
        shared.put(name, b"12345", 60)
    await shared.aclose()
    # Spread over the three primaries.
    owners = {cluster.owner_of(f"c:cache:{{{name}}}") for name in names}
    assert len(owners) == 3
    found = await shared.get_many([*names, entry("m", "key:a", "absent")])
    assert [e is not None and e.body == b"12345" for e in found] == [True] * 60 + [False]
    one = await shared.get(names[0])
    assert one is not None and one.body == b"12345"
    # A lease and its entry share a slot: waiting reads both in one call.
    token = await shared.claim(names[0] + "x", 5.0)
    assert token is not None and await shared.claim(names[0] + "x", 5.0) is None
    shared.put(names[0] + "x", b"late", 60, lease=token)
    await shared.aclose()
    waited = await shared.await_entry(names[0] + "x", 1.0)
    assert waited is not None and waited.body == b"late"
    assert await client.exists(f"c:cache:lease:{{{names[0]}x}}") == 0
    # Counting and clearing walk every primary; leases are not entries.
    assert await shared.stats() == {"entries": 61, "bytes": 60 * (5 + 15) + 4 + 15}
    assert await shared.clear(route_tag=tag("m"), scope_tag=tag("key:b")) == 20
    assert await shared.clear(route_tag=tag("n")) == 20
    assert await shared.clear() == 21
    assert (await shared.stats())["entries"] == 0


# A gateway on the cluster.


def write_keys(path: Path) -> Path:
    keys = {"load": (LOAD_KEY, 100_000), "exact": (EXACT_KEY, EXACT_RPM)}
    entries = [
        {"id": f"key-{name}", "name": name, "sha256": hash_key(secret), "limits": {"rpm": rpm}}
        for name, (secret, rpm) in keys.items()
    ]
    path.write_text(yaml.safe_dump({"keys": entries}, sort_keys=False))
    return path


def chat(client: httpx.Client, url: str, key: str, **extra: Any) -> httpx.Response:
    return client.post(
        url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 4, **extra},
        timeout=REQUEST_BOUND_S + 5,
    )


def redis_up(url: str, component: str) -> bool:
    metrics = httpx.get(url + "/metrics", timeout=5).text
    return f'vgate_redis_up{{component="{component}"}} 1.0' in metrics


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def gateway_on(cluster: ClusterProcesses, logs: Path, sim: Process, prefix: str) -> dict[str, Any]:
    config = gateway_config([{"name": "tiny-llama", "backends": [backend("w1", sim.url)]}])
    config["keys"] = {"file": str(write_keys(logs / f"{prefix}-keys.yaml"))}
    config["redis"] = {
        "cluster": {"nodes": cluster.addresses},
        "key_prefix": prefix,
        "socket_timeout_s": 0.5,
    }
    config["cache"] = {"enabled": True, "backend": "redis"}
    config["limits"] = {"probe_interval_s": 0.1}
    return config


def test_gateways_on_a_cluster_serve_with_exact_limits_and_a_shared_cache(
    logs: Path, cluster: ClusterProcesses
) -> None:
    sim = start_sim(logs)
    config = gateway_on(cluster, logs, sim, "e2e-cluster")
    processes: list[Process] = [sim]
    try:
        gateways = [start_gateway(logs, config), start_gateway(logs, config)]
        processes += gateways
        with httpx.Client() as client:
            for gateway in gateways:
                assert chat(client, gateway.url, LOAD_KEY).status_code == 200
                assert redis_up(gateway.url, "limits")
            statuses = [
                chat(client, gateways[i % 2].url, EXACT_KEY).status_code
                for i in range(EXACT_RPM + 3)
            ]
            assert statuses == [200] * EXACT_RPM + [429] * 3
            # A deterministic answer kept by one gateway is a hit in the other.
            first = chat(client, gateways[0].url, LOAD_KEY, temperature=0)
            assert first.status_code == 200
            hit = poll_until(
                lambda: (
                    (r := chat(client, gateways[1].url, LOAD_KEY, temperature=0)).headers.get(
                        "x-vgate-cache"
                    )
                    == "hit"
                    and r
                )
            )
            assert hit.json()["choices"] == first.json()["choices"]
    finally:
        iter_stop(iter(processes))


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_lost_primary_without_replica_never_hangs_a_request(logs: Path, how: str) -> None:
    """Its slots are gone: killed, its port refuses at once; frozen (SIGSTOP), it accepts
    and never answers, so each call waits its socket_timeout_s. Either way the limits fail
    open and every request is answered within the bound."""
    own = start_cluster(logs / f"lost-primary-{how}")
    sim = start_sim(logs)
    processes: list[Process] = [sim]
    victim: RedisServer | None = None
    try:
        config = gateway_on(own, logs, sim, "e2e-cluster-lost")
        gateway = start_gateway(logs, config)
        processes.append(gateway)
        with httpx.Client() as client:
            assert chat(client, gateway.url, LOAD_KEY).status_code == 200
            victim = own.node(own.owner_of("e2e-cluster-lost:rl:{key-load}"))
            if how == "killed":
                victim.kill()
            else:
                victim.popen.send_signal(signal.SIGSTOP)
            took: list[float] = []
            for _ in range(10):
                started = time.monotonic()
                response = chat(client, gateway.url, LOAD_KEY)
                took.append(time.monotonic() - started)
                assert response.status_code == 200, response.text
            print(f"primary {how}, no replica: slowest request {max(took):.2f}s")
            assert max(took) < REQUEST_BOUND_S
            # Served on the gateway's own limits: the outage was seen, and is still on.
            assert not redis_up(gateway.url, "limits")
            assert metric(gateway.url, 'vgate_redis_outages_total{component="limits"}') >= 1
    finally:
        if victim is not None and victim.popen.poll() is None:
            victim.popen.send_signal(signal.SIGCONT)
        iter_stop(iter(processes))
        own.stop()


async def test_with_replicas_breakers_and_limits_follow_a_failover(logs: Path) -> None:
    """The primary holding the breakers' slot and a key's limits is killed; its replica
    takes over: both syncs lose their subscription and take it up on the new primary, a
    breaker opened in one is seen open in the other, and the limits are exact there."""
    own = await asyncio.to_thread(start_cluster, logs / "failover", replicas=1)
    a, b = BreakerView(own, "fo"), BreakerView(own, "fo")
    clients = [create_client(cluster_config(own)) for _ in range(2)]
    stores = [RedisLimits(c, key_prefix="fo", timeout_s=2.0, max_calls=8) for c in clients]
    try:
        await a.sync.start()
        await b.sync.start()
        victim = own.owner_of("{fo:breaker}")
        key_id = next(
            f"key-{n}" for n in range(500) if own.owner_of(f"fo:rl:{{key-{n}}}") == victim
        )
        limits = Limits(rpm=6)
        assert (await stores[0].admit(key_id, limits, 1)).allowed
        # Replication is asynchronous: wait until the replica has the charge.
        for client in clients[:1]:
            assert isinstance(client, RedisCluster)
            node = client.get_node_from_key(f"fo:rl:{{{key_id}}}")
            assert node is not None
            await client.execute_command("WAIT", 1, 5000, target_nodes=node)
        own.node(victim).kill()
        killed = time.monotonic()
        await asyncio.to_thread(
            poll_until, lambda: own.owner_of("{fo:breaker}") != victim, 30.0, 0.1
        )
        promoted_s = time.monotonic() - killed
        await eventually(lambda: all(False in v.changes and v.changes[-1] is True for v in (a, b)))
        followed_s = time.monotonic() - killed
        while a.breaker.state != "open":
            fail(a.breaker)
        await eventually(lambda: b.breaker.state == "open")
        # Exact on the new primary: 5 of the 6 per minute left, between two stores.
        deadline = time.monotonic() + 30
        for store in stores:  # each client finds the new primary by itself, bounded
            while True:
                try:
                    await store.usage(key_id, limits)  # read-only: charges nothing
                    break
                except REDIS_ERRORS:
                    assert time.monotonic() < deadline, "never reached the new primary"
                    await asyncio.sleep(0.1)
        verdicts = await asyncio.gather(
            *(stores[n % 2].admit(key_id, limits, 1) for n in range(12))
        )
        assert sum(v.allowed for v in verdicts) == 5, [(v.code, v.message) for v in verdicts]
        print(f"cluster failover: promoted after {promoted_s:.1f}s, syncs back {followed_s:.1f}s")
    finally:
        await a.aclose()
        await b.aclose()
        for client in clients:
            await client.aclose()
        own.stop()


def test_gateways_under_load_follow_a_failover_with_nothing_hung(logs: Path) -> None:
    """Two gateways on a cluster with replicas, four clients sending; the primary holding
    the busy key's limits is killed. Every request is answered within the bound (fail
    open while the slot has no primary), both gateways are back on Redis after the
    replica takes over, and the limits are exact there."""
    own = start_cluster(logs / "gateway-failover", replicas=1)
    sim = start_sim(logs)
    processes: list[Process] = [sim]
    outcomes: list[tuple[int, float]] = []
    stop = threading.Event()

    def send(gateways: list[Any], index: int) -> None:
        with httpx.Client() as client:
            turn = index
            while not stop.is_set():
                started = time.monotonic()
                response = chat(client, gateways[turn % 2].url, LOAD_KEY)
                outcomes.append((response.status_code, time.monotonic() - started))
                turn += 1

    try:
        config = gateway_on(own, logs, sim, "e2e-cluster-fo")
        gateways = [start_gateway(logs, config), start_gateway(logs, config)]
        processes += gateways
        with httpx.Client() as client:
            for gateway in gateways:
                assert chat(client, gateway.url, LOAD_KEY).status_code == 200
        victim = own.owner_of("e2e-cluster-fo:rl:{key-load}")
        threads = [threading.Thread(target=send, args=(gateways, i)) for i in range(4)]
        for thread in threads:
            thread.start()
        try:
            poll_until(lambda: len(outcomes) >= 20)
            own.node(victim).kill()
            killed = time.monotonic()
            poll_until(lambda: own.owner_of("e2e-cluster-fo:rl:{key-load}") != victim)
            for gateway in gateways:
                poll_until(
                    lambda g=gateway: (
                        metric(g.url, 'vgate_redis_outages_total{component="limits"}') >= 1
                        and redis_up(g.url, "limits")
                    )
                )
            followed_s = time.monotonic() - killed
            served = len(outcomes)
            poll_until(lambda: len(outcomes) >= served + 20)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        statuses = {status for status, _ in outcomes}
        slowest = max(took for _, took in outcomes)
        print(
            f"cluster failover under load: {len(outcomes)} requests, statuses {statuses}, "
            f"slowest {slowest:.2f}s, both gateways back on Redis after {followed_s:.1f}s"
        )
        assert statuses == {200}
        assert slowest < REQUEST_BOUND_S
        with httpx.Client() as client:
            admitted = [
                chat(client, gateways[i % 2].url, EXACT_KEY).status_code
                for i in range(EXACT_RPM + 3)
            ]
        assert admitted == [200] * EXACT_RPM + [429] * 3
    finally:
        iter_stop(iter(processes))
        own.stop()


def test_a_gateway_whose_cluster_is_unreachable_starts_and_serves(logs: Path) -> None:
    """No node answers (nothing listens on the ports): the client cannot learn the slots,
    which is an outage like any other: the gateway starts, serves on its own limits, and
    says so in its metrics."""
    sim = start_sim(logs)
    processes: list[Process] = [sim]
    try:
        nowhere = ClusterProcesses([], logs)
        config = gateway_on(nowhere, logs, sim, "e2e-cluster-nowhere")
        config["redis"]["cluster"] = {"nodes": [f"127.0.0.1:{free_port()}" for _ in range(2)]}
        gateway = start_gateway(logs, config)
        processes.append(gateway)
        with httpx.Client() as client:
            for _ in range(3):
                started = time.monotonic()
                assert chat(client, gateway.url, LOAD_KEY).status_code == 200
                assert time.monotonic() - started < REQUEST_BOUND_S
        assert not redis_up(gateway.url, "limits")
        assert metric(gateway.url, 'vgate_redis_outages_total{component="limits"}') >= 1
    finally:
        iter_stop(iter(processes))
