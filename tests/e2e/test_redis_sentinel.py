"""Redis through Sentinel, against real processes: a primary, a replica and three sentinels
(tests/redis_sentinel.py). The primary is killed under load; nothing hangs, the gateways
follow the failover to the new primary, and the limits are exact again between them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.config import BreakerConfig, RedisConfig, load_config
from gateway.edge.auth import hash_key
from gateway.errors import ConfigError
from policies.breaker import BackendBreaker
from policies.breaker_sync import BreakerSync
from policies.redis_state import REDIS_ERRORS, RedisHealth, create_client
from tests.policies.test_breaker import fail
from tests.redis_sentinel import SentinelDeployment, start_sentinel_deployment
from tests.servers import (
    KEYS_FILE,
    Gateway,
    Process,
    backend,
    gateway_config,
    iter_stop,
    poll_until,
    start_gateway,
    start_sim,
)

MESSAGES = [{"role": "user", "content": "hello there"}]
LOAD_KEY = "vg-test-sentinel-load-0123456789abcd"
EXACT_RPM = 5
EXACT_KEY = "vg-test-sentinel-exact-0123456789abc"
# Every request ends within this, Redis or not: the gateway bounds each Redis call by
# socket_timeout_s (a new connection asks the sentinels first, each bounded the same way).
REQUEST_BOUND_S = 8.0
CLIENTS = 4


@pytest.fixture
def deployment(logs: Path) -> Iterator[SentinelDeployment]:
    started = start_sentinel_deployment(logs)
    yield started
    started.stop()


def sentinel_section(deployment: SentinelDeployment) -> dict[str, Any]:
    return {"service_name": deployment.service, "sentinels": deployment.addresses}


async def _set_get_across_failover(deployment: SentinelDeployment) -> list[float]:
    config = RedisConfig(sentinel=sentinel_section(deployment), socket_timeout_s=0.5)
    client = create_client(config)
    took: list[float] = []
    try:
        await client.set("before", "1")
        # Replication is asynchronous: what the old primary had not passed on is lost.
        assert await client.wait(1, 5000) == 1
        deployment.primary.kill()
        deadline = time.monotonic() + 30
        while True:  # each call bounded; the client finds the new primary by itself
            started = time.monotonic()
            try:
                await client.set("after", "1")
                took.append(time.monotonic() - started)
                break
            except REDIS_ERRORS:
                took.append(time.monotonic() - started)
            assert time.monotonic() < deadline, "the client never reached the new primary"
            await asyncio.sleep(0.05)
        assert await client.get("before") == b"1"  # replicated before the kill
    finally:
        await client.aclose()
    return took


def test_the_client_follows_a_failover_with_every_call_bounded(
    deployment: SentinelDeployment,
) -> None:
    assert deployment.primary_port() == deployment.primary.port
    took = asyncio.run(_set_get_across_failover(deployment))
    assert deployment.primary_port() == deployment.replica_port
    # A call tries at most twice (a connection error is retried once), each try bounded by
    # socket_timeout_s for the sentinels' answer and again for the primary's.
    assert max(took) < 4 * 3 * 0.5, took


class BreakerView:
    """One gateway process's breaker, shared through Sentinel (its own client and sync)."""

    def __init__(self, deployment: SentinelDeployment) -> None:
        config = BreakerConfig(consecutive_failures=2, open_s=30, min_requests=1000)
        self.breaker = BackendBreaker("w1", config, route="tiny-llama")
        self.changes: list[bool] = []  # Redis reachable or not, as the sync saw it
        self.redis = create_client(
            RedisConfig(sentinel=sentinel_section(deployment), socket_timeout_s=0.5)
        )
        self.sync = BreakerSync(
            self.redis,
            [self.breaker],
            key_prefix="e2e-sentinel-breaker",
            timeout_s=0.5,
            health=RedisHealth("breaker", lambda _, up: self.changes.append(up)),
            check_interval_s=0.2,
            backoff_initial_s=0.02,
            backoff_max_s=0.2,
        )

    def lost_and_back(self) -> bool:
        return False in self.changes and self.changes[-1] is True

    async def aclose(self) -> None:
        await self.sync.aclose()
        await self.redis.aclose()


async def eventually(predicate: Callable[[], Any], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.01)


async def test_shared_breakers_follow_a_failover(deployment: SentinelDeployment) -> None:
    a, b = BreakerView(deployment), BreakerView(deployment)
    try:
        await a.sync.start()
        await b.sync.start()
        deployment.primary.kill()
        await asyncio.to_thread(
            poll_until, lambda: deployment.primary_port() == deployment.replica_port
        )
        # Both lose the subscription with the primary, and take it up again on the new one.
        await eventually(lambda: a.lost_and_back() and b.lost_and_back())
        while a.breaker.state != "open":
            fail(a.breaker)
        await eventually(lambda: b.breaker.state == "open")
    finally:
        await a.aclose()
        await b.aclose()


def test_a_missing_password_variable_names_the_field() -> None:
    config = RedisConfig(
        sentinel={"service_name": "m", "sentinels": ["127.0.0.1:1"], "password_env": "NO_SUCH_VAR"}
    )
    with pytest.raises(ConfigError) as caught:
        create_client(config, "gateway.yaml")
    assert caught.value.field == "redis.sentinel.password_env"


ONE_SENTINEL = {"service_name": "m", "sentinels": ["h:1"]}


@pytest.mark.parametrize(
    ("redis", "field"),
    [
        ({"url": "redis://x:6379", "sentinel": ONE_SENTINEL}, "redis"),
        ({"sentinel": {"service_name": "m", "sentinels": []}}, "redis.sentinel.sentinels"),
        ({"sentinel": {"service_name": "m", "sentinels": ["no-port"]}}, "redis.sentinel.sentinels"),
        ({"sentinel": {"service_name": "", "sentinels": ["h:1"]}}, "redis.sentinel.service_name"),
        ({"sentinel": {"sentinels": ["h:1"]}}, "redis.sentinel.service_name"),
        ({"sentinel": {"service_name": "m", "sentinels": ["h:1"], "pasword": "x"}}, None),
    ],
)
def test_a_wrong_sentinel_section_fails_at_start_up_naming_the_field(
    tmp_path: Path, redis: dict[str, Any], field: str | None
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
    assert caught.value.field == (field or "redis.sentinel.pasword")


def test_a_sentinel_section_is_read_with_the_same_bounds() -> None:
    config = RedisConfig(
        sentinel={"service_name": "m", "sentinels": ["10.0.0.1:26379", "[::1]:26380"]},
        socket_timeout_s=0.2,
        max_connections=8,
    )
    assert config.enabled and config.url is None
    assert config.sentinel is not None
    assert config.sentinel.addresses() == [("10.0.0.1", 26379), ("::1", 26380)]
    client = create_client(config)
    pool = client.connection_pool
    assert pool.max_connections == 8
    assert pool.connection_kwargs["socket_timeout"] == 0.2
    assert pool.connection_kwargs["socket_connect_timeout"] == 0.2
    assert not RedisConfig().enabled


def write_keys(path: Path) -> Path:
    keys = {"load": (LOAD_KEY, 100_000), "exact": (EXACT_KEY, EXACT_RPM)}
    entries = [
        {"id": f"key-{name}", "name": name, "sha256": hash_key(secret), "limits": {"rpm": rpm}}
        for name, (secret, rpm) in keys.items()
    ]
    path.write_text(yaml.safe_dump({"keys": entries}, sort_keys=False))
    return path


def chat(client: httpx.Client, url: str, key: str) -> httpx.Response:
    return client.post(
        url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 4},
        timeout=REQUEST_BOUND_S + 5,  # past the bound: a hang shows as a long request
    )


def limits_on_redis(gateway: Gateway) -> bool:
    metrics = httpx.get(gateway.url + "/metrics", timeout=5).text
    return 'vgate_redis_up{component="limits"} 1.0' in metrics


def outages(gateway: Gateway) -> float:
    for line in httpx.get(gateway.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith('vgate_redis_outages_total{component="limits"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Load:
    """CLIENTS threads sending requests to the gateways in turn until stopped; each outcome
    kept with how long it took."""

    def __init__(self, gateways: list[Gateway]) -> None:
        self.gateways = gateways
        self.outcomes: list[tuple[int, str, float]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CLIENTS)]

    def _run(self, index: int) -> None:
        with httpx.Client() as client:
            turn = index
            while not self._stop.is_set():
                gateway = self.gateways[turn % len(self.gateways)]
                turn += 1
                started = time.monotonic()
                response = chat(client, gateway.url, LOAD_KEY)
                code = ""
                if response.status_code != 200:
                    code = response.json()["error"]["code"]
                with self._lock:
                    self.outcomes.append((response.status_code, code, time.monotonic() - started))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_primary_killed_under_load_gateways_follow_and_limits_stay_exact(
    logs: Path, deployment: SentinelDeployment, mode: str
) -> None:
    sim = start_sim(logs)
    config = gateway_config([{"name": "tiny-llama", "backends": [backend("w1", sim.url)]}])
    config["keys"] = {"file": str(write_keys(logs / "sentinel-keys.yaml"))}
    config["redis"] = {
        "sentinel": sentinel_section(deployment),
        "key_prefix": "e2e-sentinel",
        "socket_timeout_s": 0.5,
    }
    # Closed: while Redis is away nothing is admitted, a clean 503 instead; open: admitted
    # on each process's own limits meanwhile. Either way back on Redis after the failover.
    config["limits"] = {"redis_failure": mode, "probe_interval_s": 0.1}
    processes: list[Process] = [sim]
    try:
        gateways = [start_gateway(logs, config), start_gateway(logs, config)]
        processes += gateways
        with httpx.Client() as client:
            for gateway in gateways:
                assert chat(client, gateway.url, LOAD_KEY).status_code == 200
                assert limits_on_redis(gateway)
        with Load(gateways) as load:
            poll_until(lambda: load.count() >= 20)
            deployment.primary.kill()
            killed = time.monotonic()
            poll_until(lambda: deployment.primary_port() == deployment.replica_port)
            promoted_s = time.monotonic() - killed
            # Both gateways saw Redis go (their requests failed on it) and come back.
            for gateway in gateways:
                poll_until(lambda g=gateway: outages(g) >= 1 and limits_on_redis(g))
            followed_s = time.monotonic() - killed
            served_after = load.count()
            poll_until(lambda: load.count() >= served_after + 20)
        statuses: dict[tuple[int, str], int] = {}
        for status, code, _ in load.outcomes:
            statuses[(status, code)] = statuses.get((status, code), 0) + 1
        slowest = max(took for _, _, took in load.outcomes)
        print(
            f"sentinel failover under load ({mode}): {statuses}, slowest {slowest:.2f}s, replica"
            f" promoted after {promoted_s:.1f}s, both gateways on it after {followed_s:.1f}s"
        )
        allowed = {(200, "")} if mode == "open" else {(200, ""), (503, "rate_limits_unavailable")}
        assert set(statuses) <= allowed, statuses
        assert slowest < REQUEST_BOUND_S
        # The last requests were served again, through the new primary.
        assert all(status == 200 for status, _, _ in load.outcomes[-CLIENTS:])
        # Exact between the two processes, on the new primary: EXACT_RPM of EXACT_RPM + 3.
        with httpx.Client() as client:
            admitted = [
                chat(client, gateways[i % 2].url, EXACT_KEY).status_code
                for i in range(EXACT_RPM + 3)
            ]
        assert admitted.count(200) == EXACT_RPM, admitted
        assert admitted.count(429) == 3, admitted
    finally:
        iter_stop(iter(processes))
