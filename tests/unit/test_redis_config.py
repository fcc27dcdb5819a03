"""The `redis:` section, and how the gateway wires shared breakers from it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError
from gateway.runtime.gateway import Gateway
from tests.servers import KEYS_FILE, RedisServer, free_port, start_redis

MINIMAL = {
    "keys": {"file": str(KEYS_FILE)},
    "models": [
        {"name": "m", "backends": [{"name": "b", "provider": "vllm", "url": "http://127.0.0.1:1"}]}
    ],
}


def write(tmp_path: Path, raw: object) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_without_a_url_state_stays_in_process(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), environ={})
    assert config.redis.url is None
    assert config.redis.key_prefix == "vgate"
    assert config.models[0].breaker.shared is True


def test_the_environment_sets_the_redis_section(tmp_path: Path) -> None:
    env = {"VGATE_REDIS__URL": "redis://10.0.0.5:6379/2", "VGATE_REDIS__SOCKET_TIMEOUT_S": "0.1"}
    config = load_config(write(tmp_path, MINIMAL), environ=env)
    assert config.redis.url == "redis://10.0.0.5:6379/2"
    assert config.redis.socket_timeout_s == 0.1


@pytest.mark.parametrize(
    ("redis", "field"),
    [
        ({"url": "http://localhost:6379"}, "redis.url"),
        ({"key_prefix": "has space"}, "redis.key_prefix"),
        ({"socket_timeout_s": 0}, "redis.socket_timeout_s"),
        ({"urls": "redis://x"}, "redis.urls"),
    ],
)
def test_a_wrong_redis_section_is_rejected(
    tmp_path: Path, redis: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, {**MINIMAL, "redis": redis}), environ={})
    assert caught.value.field == field


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def two_routes(redis: dict[str, Any]) -> GatewayConfig:
    dead = f"http://127.0.0.1:{free_port()}"
    return GatewayConfig.model_validate(
        {
            "keys": {"file": str(KEYS_FILE)},
            "redis": redis,
            "models": [
                {
                    "name": "shared",
                    "health": {"enabled": False},
                    "backends": [{"name": "a", "provider": "vllm", "url": dead}],
                },
                {
                    "name": "local",
                    "health": {"enabled": False},
                    "breaker": {"shared": False},
                    "backends": [{"name": "b", "provider": "vllm", "url": dead}],
                },
            ],
        }
    )


async def test_the_gateway_shares_only_breakers_marked_shared(redis_server: RedisServer) -> None:
    gateway = Gateway.from_config(two_routes({"url": redis_server.url, "key_prefix": "wiring"}))
    await gateway.start()
    try:
        sync = gateway.breaker_sync
        assert sync is not None and gateway.redis is not None
        shared, local = (route.backends[0].breaker for route in gateway.router.routes)
        assert sync.key(shared) == "wiring:breaker:shared:a"
        with pytest.raises(KeyError):
            sync.key(local)
        assert shared.on_local_change is not None and local.on_local_change is None
        assert b"vgate_redis_up" in gateway.metrics.render()
    finally:
        await gateway.aclose()
    assert shared.on_local_change is None


async def test_an_unreachable_redis_does_not_stop_the_gateway_starting() -> None:
    url = f"redis://127.0.0.1:{free_port()}"
    gateway = Gateway.from_config(two_routes({"url": url, "socket_timeout_s": 0.2}))
    await gateway.start()
    try:
        assert gateway.breaker_sync is not None
        assert gateway.breaker_sync.health.up is False
        assert b'vgate_redis_outages_total{component="breaker"} 1.0' in gateway.metrics.render()
    finally:
        await gateway.aclose()


def test_the_redis_cache_backend_needs_redis_by_url_or_sentinel(tmp_path: Path) -> None:
    cache = {"enabled": True, "backend": "redis"}
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, {**MINIMAL, "cache": cache}), environ={})
    needs = "cache.backend: redis needs redis.url, redis.sentinel or redis.cluster"
    assert needs in str(caught.value)
    sentinel = {"service_name": "mymaster", "sentinels": ["127.0.0.1:26379"]}
    config = load_config(
        write(tmp_path, {**MINIMAL, "cache": cache, "redis": {"sentinel": sentinel}}), environ={}
    )
    assert config.redis.enabled and config.cache.backend == "redis"
