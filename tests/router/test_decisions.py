"""Every backend choice is recorded with its inputs, and replays to the same choice."""

from __future__ import annotations

import orjson

from gateway.cli.explain import replay
from gateway.config import RetryConfig
from gateway.router import Call, Outcome
from policies.affinity import key_hash
from providers.fake import Events, FakeAdapters, Refuse, chat_completion, chat_events
from tests.router.conftest import (
    chat,
    complete,
    gateway_config,
    make_router,
    route,
    stream,
)


async def test_decisions_are_recorded_in_order_and_replay_to_the_same_choice(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].then = Refuse(500)
    fakes["w2"].then = chat_completion("hi")
    retries = RetryConfig(max_retries=2, backoff_initial_s=0.001, budget_ratio=1.0)
    routes = (
        route(
            "m",
            "w1",
            "w2",
            strategy="p2c_latency",
            seed=42,
            retries=retries,
            non_stream="passthrough",
        ),
    )
    router = make_router(fakes, *routes)
    outcomes = [Outcome() for _ in range(12)]
    for outcome in outcomes:
        await complete(router, chat(), outcome)
    for outcome in outcomes:
        assert len(outcome.decisions) == outcome.attempts
        assert outcome.decisions[-1].choice == outcome.backend == "w2"
    retried = next(o for o in outcomes if o.attempts == 2)
    assert [d.choice for d in retried.decisions] == ["w1", "w2"]
    assert retried.decisions[1].reason == "p2c_latency, avoiding backends tried"
    # As the access log holds them (JSON), each replays from the configuration alone.
    config = gateway_config(*routes)
    logged = [orjson.loads(orjson.dumps(d.to_json())) for o in outcomes for d in o.decisions]
    replays = [replay(config, decision) for decision in logged]
    assert all(r.same for r in replays), [r for r in replays if not r.same]
    # The logged inputs decide it: with the choice unusable, the replay differs.
    first = logged[0]
    candidates = [{**c, "usable": c["name"] != first["choice"]} for c in first["candidates"]]
    assert not replay(config, {**first, "candidates": candidates}).same


async def test_a_decision_says_what_it_saw(fakes: FakeAdapters) -> None:
    fakes["w1"].add(Refuse(503))
    fakes["w2"].add(Events(chat_events("hi")))
    router = make_router(fakes, route("m", "w1", "w2"))
    outcome = Outcome()
    await stream(router, chat(stream=True), outcome)
    first, second = (d.to_json() for d in outcome.decisions)
    assert (first["choice"], first["reason"]) == ("w1", "weighted")
    assert [c["tried"] for c in first["candidates"]] == [False, False]
    assert (second["choice"], second["reason"]) == ("w2", "weighted, avoiding backends tried")
    assert [c["tried"] for c in second["candidates"]] == [True, False]
    assert first["state"] == [0, 0] and first["pin"] is None and first["key_hash"] is None


async def test_an_affinity_decision_logs_the_keys_hash_never_the_key(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].then = fakes["w2"].then = chat_completion("hi")
    routes = (route("m", "w1", "w2", strategy="affinity", non_stream="passthrough"),)
    router = make_router(fakes, *routes)
    chosen = set()
    for _ in range(3):
        outcome = Outcome()
        await complete(router, chat(user="alice@example.com"), outcome)
        (decision,) = outcome.decisions
        logged = decision.to_json()
        assert logged["key_hash"] == key_hash("alice@example.com")
        assert b"alice" not in orjson.dumps(logged)
        assert replay(gateway_config(*routes), logged).same
        chosen.add(decision.choice)
    assert len(chosen) == 1  # one user, one backend


async def test_only_the_tried_backend_left_is_chosen_again_and_says_so(
    fakes: FakeAdapters,
) -> None:
    fakes["a1"].add(Refuse(502), chat_completion("hi"))
    router = make_router(fakes, route("alone", "a1", non_stream="passthrough"))
    outcome = Outcome()
    await complete(router, chat("alone"), outcome, Call("req-1"))
    assert [(d.choice, d.reason) for d in outcome.decisions] == [
        ("a1", "weighted"),
        ("a1", "weighted, only tried left"),
    ]
