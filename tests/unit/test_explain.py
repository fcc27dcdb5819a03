"""Routing decisions are logged with their inputs and replay to the same backend."""

from __future__ import annotations

import io
import random
from typing import Any

import orjson
import pytest

from gateway.cli.explain import explain, replay
from gateway.config import GatewayConfig
from gateway.errors import NoLiveBackend
from gateway.router import Backend, Decision, Route
from gateway.runtime.app import Gateway
from tests.servers import KEYS_FILE

STRATEGIES = ["weighted", "least_inflight", "p2c_latency", "affinity"]


def config(strategy: str, **route: Any) -> GatewayConfig:
    backends = [
        {"name": f"b{i}", "provider": "vllm", "url": f"http://127.0.0.1:{9000 + i}", "weight": w}
        for i, w in enumerate([3, 1, 2, 1])
    ]
    return GatewayConfig.model_validate(
        {
            "keys": {"file": str(KEYS_FILE)},
            "models": [
                {"name": "m", "strategy": strategy, "seed": 7, "backends": backends, **route}
            ],
        }
    )


def shuffle_state(route: Route, rng: random.Random) -> None:
    """Loads, latencies and health as traffic would leave them."""
    backend: Backend
    for backend in route.backends:
        backend.in_flight = rng.randrange(0, 5)
        backend.latency_ewma_s = rng.random() / 10
        backend.health.healthy = rng.random() > 0.2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_decision_replays_to_the_same_backend(strategy: str) -> None:
    settings = config(strategy)
    route = Gateway.from_config(settings).router.routes[0]
    rng = random.Random(1)
    decisions: list[Decision] = []
    for number in range(300):
        shuffle_state(route, rng)
        avoid = [route.backends[rng.randrange(4)]] if number % 3 == 0 else []
        key = f"user-{rng.randrange(20)}" if number % 2 else None
        try:
            route.choose(1.0, avoid, key, None, decisions)
        except NoLiveBackend:  # that decision is logged too
            continue
    assert len(decisions) > 250
    for decision in decisions:
        logged = orjson.loads(orjson.dumps(decision.to_json()))  # as the access log holds it
        result = replay(settings, logged)
        assert result.same, (logged, result)


def test_a_pinned_decision_names_its_pin() -> None:
    settings = config("weighted")
    route = Gateway.from_config(settings).router.routes[0]
    decisions: list[Decision] = []
    assert route.choose(1.0, (), None, route.backends[3], decisions).name == "b3"
    logged = decisions[0].to_json()
    assert (logged["reason"], logged["pin"], logged["choice"]) == ("pin", "b3", "b3")
    assert replay(settings, logged).same


def test_a_changed_config_is_reported_not_replayed() -> None:
    route = Gateway.from_config(config("weighted")).router.routes[0]
    decisions: list[Decision] = []
    route.choose(1.0, (), None, None, decisions)
    result = replay(config("least_inflight"), decisions[0].to_json())
    assert not result.same and "strategy" in (result.problem or "")


def test_explain_prints_each_decision_and_finds_the_request() -> None:
    settings = config("p2c_latency")
    route = Gateway.from_config(settings).router.routes[0]
    decisions: list[Decision] = []
    first = route.choose(1.0, (), None, None, decisions)
    route.choose(1.0, [first], None, None, decisions)
    entry = {
        "request_id": "abc",
        "method": "POST",
        "path": "/v1/chat/completions",
        "model": "m",
        "status": 200,
        "attempts": 2,
        "decisions": [d.to_json() for d in decisions],
    }
    log = [b"INFO some other log line", orjson.dumps(entry), orjson.dumps({"request_id": "x"})]
    out = io.StringIO()
    assert explain(settings, log, "abc", out) == 0
    text = out.getvalue()
    assert text.count("-> same") == 2
    assert "p2c_latency, avoiding backends tried" in text
    assert explain(settings, log, "missing", io.StringIO()) == 1


@pytest.mark.parametrize(
    "broken",
    [
        "not a decision",
        {"route": "m"},  # cut off
        {"route": "m", "strategy": "weighted", "seed": 7, "candidates": [{"name": "b0"}]},
        {"route": "m", "strategy": "weighted", "seed": 7, "candidates": "b0", "state": [1]},
        {"route": ["m"], "choice": "b0"},
    ],
    ids=["string", "cut-off", "candidate-fields-missing", "candidates-not-a-list", "route-a-list"],
)
def test_a_malformed_decision_is_reported_not_a_traceback(broken: Any) -> None:
    settings = config("weighted")
    route = Gateway.from_config(settings).router.routes[0]
    decisions: list[Decision] = []
    route.choose(1.0, (), None, None, decisions)
    entry = {"request_id": "abc", "decisions": [broken, decisions[0].to_json()]}
    out = io.StringIO()
    assert explain(settings, [orjson.dumps(entry)], "abc", out) == 3
    text = out.getvalue()
    assert "decision 1: malformed in the log, not replayed" in text
    assert "decision 2: route m" in text and "-> same" in text  # the others still replayed
    # A line whose "decisions" is not a list is not an access-log entry at all.
    odd = orjson.dumps({"request_id": "abc", "decisions": "weighted"})
    assert explain(settings, [odd], "abc", io.StringIO()) == 1
