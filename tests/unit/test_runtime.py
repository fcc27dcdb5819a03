"""The gateway's start-up and shutdown, and the adapter factory it is built with.

Real parts where they run in process (a real Redis for the breaker sync and the client
pool, the real health checker, key watcher and load scraper); the adapters are fakes,
made by the factory `Gateway.from_config` takes, so that their start and close are seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.config import BackendConfig, GatewayConfig, Timeouts, UpstreamConfig
from gateway.errors import ConfigError, MissingCredential
from gateway.runtime.gateway import Gateway
from providers import Adapter, UpstreamResponse
from providers.http1 import ByteBudget
from tests.servers import KEYS_FILE, RedisServer, start_redis

Event = tuple[str, str, frozenset[str]]  # what happened, to which backend, vgate tasks running


def vgate_tasks() -> frozenset[str]:
    """The gateway's named background tasks now running (key watcher, breaker sync)."""
    return frozenset(
        task.get_name() for task in asyncio.all_tasks() if task.get_name().startswith("vgate-")
    )


class RecordingFakeAdapter:
    """A fake adapter: records its start and close in a journal shared by every adapter;
    healthy, without load metrics, and never asked to forward (no request is sent)."""

    def __init__(self, name: str, journal: list[Event], *, fail_start: bool = False) -> None:
        self.name = name
        self.journal = journal
        self.fail_start = fail_start

    async def start(self) -> None:
        self.journal.append(("start", self.name, vgate_tasks()))
        if self.fail_start:
            raise OSError(f"{self.name}: cannot start")

    async def aclose(self) -> None:
        self.journal.append(("aclose", self.name, vgate_tasks()))

    async def post(
        self, path: str, body: bytes, request_id: str, traceparent: bytes | None = None
    ) -> UpstreamResponse:
        raise AssertionError("these tests send no request")

    async def health(self, timeout_s: float) -> bool:
        return True

    async def metrics(self) -> bytes | None:
        return None


@dataclass
class RecordingFakeFactory:
    """An adapter factory making `RecordingFakeAdapter`s, and remembering what it was given."""

    failing: str | None = None  # the backend whose adapter fails to start
    journal: list[Event] = field(default_factory=list)
    calls: dict[str, tuple[BackendConfig, Timeouts, UpstreamConfig, ByteBudget]] = field(
        default_factory=dict
    )
    made: dict[str, RecordingFakeAdapter] = field(default_factory=dict)

    def __call__(
        self,
        backend: BackendConfig,
        timeouts: Timeouts,
        upstream: UpstreamConfig,
        budget: ByteBudget,
    ) -> Adapter:
        self.calls[backend.name] = (backend, timeouts, upstream, budget)
        adapter = RecordingFakeAdapter(
            backend.name, self.journal, fail_start=backend.name == self.failing
        )
        self.made[backend.name] = adapter
        return adapter


def vllm(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "provider": "vllm", "url": "http://127.0.0.1:9", **extra}


def three_backends(**sections: Any) -> GatewayConfig:
    """Two routes, three backends: a and b serve m1 (whose connect timeout is its own), c m2."""
    return GatewayConfig.model_validate(
        {
            "keys": {"file": str(KEYS_FILE)},
            "models": [
                {
                    "name": "m1",
                    "timeouts": {"connect_s": 0.25},
                    "backends": [vllm("a"), vllm("b")],
                },
                {"name": "m2", "backends": [vllm("c")]},
            ],
            **sections,
        }
    )


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


async def no_gateway_connections(url: str) -> None:
    """Every connection the gateway's Redis client opened (it names them "vgate") is closed.
    The server hears of a close a moment after it is made: asked again until it has."""
    probe = Redis.from_url(url)
    try:
        for _ in range(500):
            clients = await probe.client_list()
            if not any(client["name"] == "vgate" for client in clients):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the gateway's connections are still open: {clients}")
    finally:
        await probe.aclose()


SYNC = frozenset({"vgate-breaker-sync-publisher", "vgate-breaker-sync-subscriber"})


async def test_a_failed_start_closes_what_had_started(redis_server: RedisServer) -> None:
    factory = RecordingFakeFactory(failing="c")
    config = three_backends(redis={"url": redis_server.url, "key_prefix": "failed-start"})
    gateway = Gateway.from_config(config, adapters=factory)
    shared = gateway.router.backends[0].breaker

    with pytest.raises(OSError, match="c: cannot start"):
        await gateway.start()

    # The adapters started before c are closed, last first, while the breaker sync (started
    # before them) still runs; c, which never started, is not closed.
    assert factory.journal == [
        ("start", "a", SYNC),
        ("start", "b", SYNC),
        ("start", "c", SYNC),
        ("aclose", "b", SYNC),
        ("aclose", "a", SYNC),
    ]
    assert vgate_tasks() == frozenset()  # the breaker sync stopped too
    assert shared.on_local_change is None
    await no_gateway_connections(redis_server.url)  # and the client's pool is closed
    await gateway.aclose()  # nothing left to close: closes nothing twice
    assert len(factory.journal) == 5


async def test_aclose_closes_everything_once_in_reverse(redis_server: RedisServer) -> None:
    factory = RecordingFakeFactory()
    config = three_backends(redis={"url": redis_server.url, "key_prefix": "clean-stop"})
    gateway = Gateway.from_config(config, adapters=factory)
    shared = gateway.router.backends[0].breaker

    await gateway.start()
    # One health round before serving: every backend is known healthy at once.
    assert all(backend.health.probed for backend in gateway.router.backends)
    assert vgate_tasks() == SYNC | {"vgate-keys-watch"}
    assert shared.on_local_change is not None
    await gateway.aclose()

    # The key watcher (started after the adapters) has stopped before they close; the
    # breaker sync (started before them) stops after.
    assert factory.journal == [
        ("start", "a", SYNC),
        ("start", "b", SYNC),
        ("start", "c", SYNC),
        ("aclose", "c", SYNC),
        ("aclose", "b", SYNC),
        ("aclose", "a", SYNC),
    ]
    assert vgate_tasks() == frozenset()
    assert shared.on_local_change is None
    await no_gateway_connections(redis_server.url)
    await gateway.aclose()
    assert len(factory.journal) == 6


async def test_a_gateway_starts_once() -> None:
    gateway = Gateway.from_config(three_backends(), adapters=RecordingFakeFactory())
    await gateway.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            await gateway.start()
    finally:
        await gateway.aclose()


def test_every_backend_gets_its_adapter_from_the_factory() -> None:
    factory = RecordingFakeFactory()
    config = three_backends()
    router = Gateway.from_config(config, adapters=factory).router

    assert [backend.adapter for backend in router.backends] == [
        factory.made["a"],
        factory.made["b"],
        factory.made["c"],
    ]
    for route in router.routes:
        for backend in route.backends:
            given, timeouts, upstream, budget = factory.calls[backend.name]
            assert given is backend.config
            assert timeouts is route.config.timeouts
            assert upstream is config.upstream
            # One bound on what every adapter holds, the router's assembled answers too.
            assert budget is router.answers.budget
    assert factory.calls["a"][1].connect_s == 0.25


def test_a_missing_credential_names_its_field() -> None:
    def without_credentials(
        backend: BackendConfig, timeouts: Timeouts, upstream: UpstreamConfig, budget: ByteBudget
    ) -> Adapter:
        if backend.name == "c":
            raise MissingCredential("environment variable C_KEY is not set")
        return RecordingFakeAdapter(backend.name, [])

    with pytest.raises(ConfigError) as caught:
        Gateway.from_config(three_backends(), adapters=without_credentials)
    assert caught.value.field == "models[1].backends[0].api_key_env"
    assert "C_KEY is not set" in str(caught.value)
