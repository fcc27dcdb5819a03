"""Two `vgate serve` processes sharing circuit breaker state through a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import (
    DEMO_KEY,
    Gateway,
    Process,
    RedisServer,
    backend,
    gateway_config,
    poll_until,
    start_gateway,
    start_redis,
    start_sim,
)

FAST = {"connect_s": 1, "first_token_s": 2, "idle_s": 2, "total_s": 5}
BODY = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def redis(logs: Path) -> Iterator[RedisServer]:
    server = start_redis(logs)
    yield server
    server.stop()


def chat(gateway: Gateway) -> httpx.Response:
    headers = {"Authorization": f"Bearer {DEMO_KEY}"}
    return httpx.post(gateway.url + "/v1/chat/completions", json=BODY, headers=headers, timeout=10)


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    """A sample's value, 0 when absent; labels in any order."""
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    for line in httpx.get(gateway.url + "/metrics", timeout=5).text.splitlines():
        series, _, value = line.rpartition(" ")
        metric_name, _, label_text = series.partition("{")
        if metric_name == name and set(label_text.removesuffix("}").split(",")) == wanted:
            return float(value)
    return 0.0


def sim_requests(sim: Process) -> int:
    return int(httpx.get(sim.url + "/sim/stats", timeout=5).json()["requests"])


def test_a_breaker_opened_through_one_gateway_is_open_in_another(
    logs: Path, redis: RedisServer
) -> None:
    sim = start_sim(logs)
    route = {
        "name": "tiny-llama",
        "timeouts": FAST,
        "retries": {"max_retries": 0},
        # Open for 5 s: long enough for the checks of the open state below, on a slow machine.
        "breaker": {"consecutive_failures": 2, "open_s": 5},
        "backends": [backend("w1", sim.url)],
    }
    config = {
        **gateway_config([route]),
        "redis": {"url": redis.url, "key_prefix": "e2e-shared", "socket_timeout_s": 2.0},
    }
    first = start_gateway(logs, config)
    second = start_gateway(logs, config)
    try:
        assert chat(second).status_code == 200  # both healthy to begin with
        httpx.put(sim.url + "/sim/faults", json={"error_status": 500}).raise_for_status()

        # Failures through the first gateway open its breaker...
        for _ in range(2):
            assert chat(first).status_code == 502
        assert metric(first, "vgate_breaker_open", backend="w1") == 1
        # ...and the second one takes it on, with no failure of its own.
        poll_until(lambda: metric(second, "vgate_breaker_open", backend="w1") == 1)
        assert metric(second, "vgate_breaker_shared_updates_total", backend="w1", state="open")
        assert metric(second, "vgate_redis_up", component="breaker") == 1

        sent = sim_requests(sim)
        for gateway in (second, first):
            response = chat(gateway)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "no_live_backend"
            assert int(response.headers["retry-after"]) >= 1
        assert sim_requests(sim) == sent  # not one request reached the backend

        # The backend recovers; after the shared cool-down the second gateway's probe
        # closes the breaker, and the first gateway takes that on too.
        httpx.delete(sim.url + "/sim/faults").raise_for_status()
        poll_until(lambda: chat(second).status_code == 200, interval_s=0.1)
        poll_until(lambda: metric(first, "vgate_breaker_open", backend="w1") == 0)
        assert metric(first, "vgate_breaker_shared_updates_total", backend="w1", state="closed")
        assert chat(first).status_code == 200
        assert "(as another gateway process saw)" in second.log()
    finally:
        first.stop()
        second.stop()
        sim.stop()
