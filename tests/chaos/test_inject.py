"""Fault injection at the adapter seam: each fault as the router's side sees it, who it hits,
how many and when, and the real router reacting to it as to the real thing.

The upstreams are fakes (providers.fake); the router is the real one, built in process.
Nothing sleeps to wait: delays are milliseconds and checked as lower bounds, windows run on
a clock the test sets, and what never answers is ended by a timeout the test chooses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from chaos.experiments import Experiment, Share
from chaos.inject import Chaos, ChaosAdapter, FaultyAnswer, backend_routes
from gateway.config import (
    MAX_CHAOS_EXPERIMENTS,
    BreakerConfig,
    ChaosConfig,
    ChaosExperiment,
    ChaosFault,
    ModelRoute,
    RetryConfig,
    UpstreamConfig,
)
from gateway.errors import (
    ChaosDisabled,
    ContextTooLong,
    InvalidRequest,
    TooManyExperiments,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRejected,
)
from gateway.router import Call, Outcome, Router
from gateway.router.build import build_router
from providers.base import RequestContext
from providers.fake import (
    DONE,
    Events,
    FakeAdapters,
    Json,
    Refuse,
    chat_chunk,
    chat_completion,
    chat_events,
)
from providers.http1 import ByteBudget
from tests.router.conftest import (
    FAST,
    backend,
    chat,
    complete,
    gateway_config,
    route,
    stream,
    timeouts,
)

BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
ONE = b'data: {"n":1}\n\n'
TWO = b'data: {"n":2}\n\n'
THREE = b'data: {"n":3}\n\n'
# Three events and [DONE] as an upstream might read them: two events in one read, one
# split across two, [DONE] alone.
SPLIT_READS = [ONE + TWO[:5], TWO[5:] + THREE, DONE]


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Injections(list[tuple[str, str]]):
    """on_injected's calls: (experiment, fault)."""

    def __call__(self, experiment: str, fault: str) -> None:
        self.append((experiment, fault))


def experiment(name: str = "x", kind: str = "error", **fields: Any) -> ChaosExperiment:
    """An experiment of `kind`; its fault's fields and its own are told apart by name."""
    fault_fields = {k: fields.pop(k) for k in list(fields) if k in ChaosFault.model_fields}
    if kind == "error":
        fault_fields.setdefault("status", 503)
    if kind in ("latency", "slow_first_token", "slow_tokens"):
        fault_fields.setdefault("latency_ms", 1)
    return ChaosExperiment(name=name, fault=ChaosFault(kind=kind, **fault_fields), **fields)


def chaos_of(
    *experiments: ChaosExperiment,
    enabled: bool = True,
    on_injected: Injections | None = None,
    clock: Clock | None = None,
) -> Chaos:
    config = ChaosConfig(enabled=enabled, experiments=experiments)
    listener = Injections() if on_injected is None else on_injected
    return Chaos(config, on_injected=listener, clock=clock or Clock())


def adapter_of(
    chaos: Chaos,
    fakes: FakeAdapters,
    name: str = "w1",
    route_of: dict[str, str] | None = None,
) -> ChaosAdapter:
    """The chaos adapter of backend `name`, around `fakes[name]`."""
    factory = chaos.wrap(fakes, route_of or {"w1": "m", "w2": "m", "e1": "e"})
    adapter = factory(backend(name), FAST, UpstreamConfig(), ByteBudget(1 << 20))
    assert isinstance(adapter, ChaosAdapter)
    return adapter


def context(caller: str | None = None, asked: str | None = None) -> RequestContext:
    return RequestContext("req-1", None, caller, asked)


async def read_all(response: Any) -> list[bytes]:
    """Every chunk of a response's body, then the response closed."""
    try:
        return [chunk async for chunk in response.chunks()]
    finally:
        response.close()


def router_of(chaos: Chaos, fakes: FakeAdapters, *routes: ModelRoute) -> Router:
    config = gateway_config(*routes)
    return build_router(config, adapters=chaos.wrap(fakes, backend_routes(config)))


@pytest.fixture
def fakes() -> Iterator[FakeAdapters]:
    """The upstreams; after the test, every answer they gave was closed."""
    fakes = FakeAdapters()
    yield fakes
    for fake in fakes.fakes.values():
        assert all(response.closed for response in fake.responses), fake.name


# -- Each fault, at the adapter ----------------------------------------------------------


async def test_latency_waits_before_the_upstream_is_asked(fakes: FakeAdapters) -> None:
    fakes["w1"].add(chat_completion("hi"))
    chaos = chaos_of(experiment(kind="latency", latency_ms=30))
    adapter = adapter_of(chaos, fakes)
    loop = asyncio.get_running_loop()
    started = loop.time()
    posted = asyncio.create_task(adapter.post("/v1/chat/completions", BODY, context()))
    for _ in range(5):
        await asyncio.sleep(0)
    assert fakes["w1"].requests == []  # still waiting: the upstream has not been asked
    response = await posted
    assert loop.time() - started >= 0.029
    assert response is fakes["w1"].responses[0]  # then the real answer, as it is
    response.close()


def test_jitter_is_seeded_and_within_its_range() -> None:
    config = experiment(kind="latency", latency_ms=10, jitter_ms=5, seed=7)
    first, again = Experiment(config, 0.0), Experiment(config, 0.0)
    delays = [first.delay_s() for _ in range(50)]
    assert delays == [again.delay_s() for _ in range(50)]  # the same seed, the same delays
    assert all(0.010 <= delay < 0.015 for delay in delays)
    assert len(set(delays)) == 50
    other = Experiment(experiment(kind="latency", latency_ms=10, jitter_ms=5, seed=8), 0.0)
    assert [other.delay_s() for _ in range(50)] != delays


async def test_an_error_is_answered_in_openais_shape_without_asking_the_upstream(
    fakes: FakeAdapters,
) -> None:
    chaos = chaos_of(experiment(kind="error", status=429, retry_after_s=1.5))
    response = await adapter_of(chaos, fakes).post("/v1/chat/completions", BODY, context())
    assert (response.status, response.content_type) == (429, "application/json")
    assert response.retry_after == "2"  # whole seconds, rounded up, as upstreams send it
    error = orjson.loads(await response.read(1 << 16))["error"]
    assert error == {
        "message": "Chaos experiment 'x' injected this 429.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert fakes["w1"].requests == []


async def test_an_errors_code_and_message_are_the_configs(fakes: FakeAdapters) -> None:
    fault = {"status": 400, "code": "context_length_exceeded", "message": "Too long."}
    chaos = chaos_of(experiment(kind="error", **fault))
    response = await adapter_of(chaos, fakes).post("/v1/chat/completions", BODY, context())
    assert response.retry_after is None
    error = orjson.loads(await response.read(1 << 16))["error"]
    assert error == {
        "message": "Too long.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }


async def test_refuse_and_reset_fail_as_the_transport_would(fakes: FakeAdapters) -> None:
    chaos = chaos_of(experiment("no", kind="refuse", backends=("w1",)))
    chaos.start(experiment("rst", kind="reset", backends=("w2",)))
    with pytest.raises(UpstreamConnectError, match="connection refused") as refused:
        await adapter_of(chaos, fakes, "w1").post("/v1/chat/completions", BODY, context())
    assert refused.value.timed_out is False
    with pytest.raises(UpstreamBroken, match="reset before the response's headers"):
        await adapter_of(chaos, fakes, "w2").post("/v1/chat/completions", BODY, context())
    assert fakes["w1"].requests == fakes["w2"].requests == []


async def test_hang_never_answers_until_its_caller_gives_up(fakes: FakeAdapters) -> None:
    chaos = chaos_of(experiment(kind="hang"))
    request = context()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await adapter_of(chaos, fakes).post("/v1/chat/completions", BODY, request)
    assert request.injected == ["x:hang"] and fakes["w1"].requests == []


async def test_slow_first_token_delays_the_first_read_only(fakes: FakeAdapters) -> None:
    fakes["w1"].add(Events(SPLIT_READS))
    chaos = chaos_of(experiment(kind="slow_first_token", latency_ms=30))
    loop = asyncio.get_running_loop()
    response = await adapter_of(chaos, fakes).post("/v1/chat/completions", BODY, context())
    started = loop.time()
    assert await read_all(response) == SPLIT_READS  # the reads as they were
    assert loop.time() - started >= 0.029


async def test_slow_tokens_delay_each_event_and_send_them_one_by_one(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].add(Events(SPLIT_READS))
    chaos = chaos_of(experiment(kind="slow_tokens", latency_ms=10))
    loop = asyncio.get_running_loop()
    request = context()
    response = await adapter_of(chaos, fakes).post("/v1/chat/completions", BODY, request)
    started = loop.time()
    assert await read_all(response) == [ONE, TWO, THREE, DONE]
    assert loop.time() - started >= 4 * 0.0099
    assert request.injected == ["x:slow_tokens"]  # one fault, however many events


@pytest.mark.parametrize("after", [0, 1, 2, 3])
async def test_cut_breaks_the_stream_after_exactly_n_whole_events(
    fakes: FakeAdapters, after: int
) -> None:
    fakes["w1"].add(Events(SPLIT_READS))
    chaos = chaos_of(experiment(kind="cut", after_events=after))
    response = await adapter_of(chaos, fakes).post("/v1/chat/completions", BODY, context())
    received = b""
    with pytest.raises(UpstreamBroken, match=f"broke off after {after} events"):
        async for chunk in response.chunks():
            received += chunk
    response.close()
    assert received == b"".join([ONE, TWO, THREE][:after])


async def test_a_cut_beyond_the_streams_end_never_happens(fakes: FakeAdapters) -> None:
    fakes["w1"].add(Events(SPLIT_READS))
    injections = Injections()
    chaos = chaos_of(experiment(kind="cut", after_events=5), on_injected=injections)
    request = context()
    response = await adapter_of(chaos, fakes).post("/v1/chat/completions", BODY, request)
    assert b"".join(await read_all(response)) == ONE + TWO + THREE + DONE
    assert request.injected is None and injections == []
    assert chaos.experiments()[0]["picked"] == 1 and chaos.experiments()[0]["injected"] == 0


async def test_events_ending_in_crlf_are_counted_too(fakes: FakeAdapters) -> None:
    crlf = [b'data: {"n":1}\r\n\r\ndata: {"n"', b":2}\r\n\r", b"\n", b"data: [DONE]\r\n\r\n"]
    fakes["w1"].add(Events(crlf))
    chaos = chaos_of(experiment(kind="cut", after_events=2))
    response = await adapter_of(chaos, fakes).post("/v1/chat/completions", BODY, context())
    received = b""
    with pytest.raises(UpstreamBroken):
        async for chunk in response.chunks():
            received += chunk
    response.close()
    assert received == b'data: {"n":1}\r\n\r\ndata: {"n":2}\r\n\r\n'


async def test_stall_sends_nothing_after_n_events(fakes: FakeAdapters) -> None:
    fakes["w1"].add(Events(SPLIT_READS))
    chaos = chaos_of(experiment(kind="stall", after_events=1))
    request = context()
    response = await adapter_of(chaos, fakes).post("/v1/chat/completions", BODY, request)
    chunks = response.chunks()
    assert await anext(chunks) == ONE
    assert request.injected is None  # not yet: the stall comes with the next read
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await anext(chunks)
    assert request.injected == ["x:stall"]
    response.close()


async def test_malformed_inserts_one_broken_event_after_n(fakes: FakeAdapters) -> None:
    fakes["w1"].add(Events(SPLIT_READS))
    chaos = chaos_of(experiment(kind="malformed", after_events=2))
    response = await adapter_of(chaos, fakes).post("/v1/chat/completions", BODY, context())
    body = b"".join(await read_all(response))
    assert body == ONE + TWO + b"data: {not json\n\n" + THREE + DONE


async def test_no_done_drops_the_done_event_only(fakes: FakeAdapters) -> None:
    fakes["w1"].add(Events(SPLIT_READS))
    chaos = chaos_of(experiment(kind="no_done"))
    request = context()
    response = await adapter_of(chaos, fakes).post("/v1/chat/completions", BODY, request)
    assert b"".join(await read_all(response)) == ONE + TWO + THREE
    assert request.injected == ["x:no_done"]


async def test_a_json_body_is_cut_as_a_body_that_breaks_off(fakes: FakeAdapters) -> None:
    fakes["w1"].add(chat_completion("hi"))
    chaos = chaos_of(experiment(kind="cut", after_events=1))
    request = context()
    response = await adapter_of(chaos, fakes).post("/v1/chat/completions", BODY, request)
    with pytest.raises(UpstreamBroken, match="the body broke off"):
        await response.read(1 << 16)
    response.close()
    assert request.injected == ["x:cut"]


@pytest.mark.parametrize(
    ("kind", "injected"),
    [
        ("slow_first_token", ["x:slow_first_token"]),
        ("slow_tokens", None),
        ("stall", None),
        ("malformed", None),
        ("no_done", None),
    ],
)
async def test_a_json_body_is_slowed_or_else_left_alone(
    fakes: FakeAdapters, kind: str, injected: list[str] | None
) -> None:
    fakes["w1"].add(chat_completion("hi"))
    chaos = chaos_of(experiment(kind=kind))
    request = context()
    response = await adapter_of(chaos, fakes).post("/v1/chat/completions", BODY, request)
    assert orjson.loads(await response.read(1 << 16)) == chat_completion("hi").body
    response.close()
    assert request.injected == injected


async def test_an_upstreams_own_refusal_is_not_spoiled_further(fakes: FakeAdapters) -> None:
    fakes["w1"].add(Refuse(503, retry_after="3"))
    chaos = chaos_of(experiment(kind="cut", after_events=0))
    request = context()
    response = await adapter_of(chaos, fakes).post("/v1/chat/completions", BODY, request)
    assert not isinstance(response, FaultyAnswer)
    assert (response.status, response.retry_after) == (503, "3")
    response.close()
    assert request.injected is None


async def test_health_metrics_start_and_close_reach_the_real_backend(
    fakes: FakeAdapters,
) -> None:
    chaos = chaos_of(experiment(kind="refuse"))
    adapter = adapter_of(chaos, fakes)
    fake = fakes["w1"]
    fake.healthy, fake.metrics_text = False, b"vllm:num_requests_running 3\n"
    await adapter.start()
    assert await adapter.health(1.0) is False  # its own state, not the injected refusal's
    fake.healthy = True
    assert await adapter.health(1.0) is True
    assert await adapter.metrics() == b"vllm:num_requests_running 3\n"
    await adapter.aclose()
    assert fake.started and fake.closed and adapter.name == "w1"


# -- Who is hit, how many, when ----------------------------------------------------------


async def hits(chaos: Chaos, fakes: FakeAdapters, name: str = "w1", **asked: str | None) -> bool:
    """Whether one request to backend `name` gets the fault (a refusal) or reaches it."""
    fakes[name].then = chat_completion("hi")
    try:
        response = await adapter_of(chaos, fakes, name).post("/v1/x", BODY, context(**asked))
    except UpstreamConnectError:
        return True
    response.close()
    return False


async def test_targets_by_route_backend_and_key(fakes: FakeAdapters) -> None:
    chaos = chaos_of(experiment("by-route", kind="refuse", routes=("e",)))
    assert await hits(chaos, fakes, "e1") and not await hits(chaos, fakes, "w1")
    chaos = chaos_of(experiment("by-backend", kind="refuse", backends=("w2",)))
    assert await hits(chaos, fakes, "w2") and not await hits(chaos, fakes, "w1")
    chaos = chaos_of(experiment("by-key", kind="refuse", keys=("alice",)))
    assert await hits(chaos, fakes, caller="alice")
    assert not await hits(chaos, fakes, caller="bob")
    assert not await hits(chaos, fakes)  # no key name: no key's experiment
    both = experiment("both", kind="refuse", routes=("m",), backends=("w1",), keys=("alice",))
    chaos = chaos_of(both)
    assert await hits(chaos, fakes, "w1", caller="alice")
    assert not await hits(chaos, fakes, "w2", caller="alice")


async def test_an_on_request_experiment_hits_only_requests_that_ask_for_it(
    fakes: FakeAdapters,
) -> None:
    chaos = chaos_of(experiment("drill", kind="refuse", on_request=True))
    assert not await hits(chaos, fakes)
    assert not await hits(chaos, fakes, asked="another")
    assert await hits(chaos, fakes, asked="drill")
    assert chaos.experiments()[0]["matched"] == 1  # the others were never its requests


async def test_the_experiment_asked_for_comes_before_one_that_hits_everyone(
    fakes: FakeAdapters,
) -> None:
    everyone = experiment("everyone", kind="error", rate=0.5)
    drill = experiment("drill", kind="refuse", on_request=True)
    chaos = chaos_of(everyone, drill)
    assert await hits(chaos, fakes, asked="drill")  # the drill's refusal, not the 503
    report = {e["name"]: e for e in chaos.experiments()}
    assert report["everyone"]["matched"] == 0 and report["drill"]["injected"] == 1


@pytest.mark.parametrize(("rate", "n"), [(0.29, 100), (0.5, 10), (1 / 3, 31), (0.0, 20)])
async def test_the_rate_hits_exactly_floor_n_times_rate(
    fakes: FakeAdapters, rate: float, n: int
) -> None:
    chaos = chaos_of(experiment(kind="refuse", rate=rate))
    hit = [await hits(chaos, fakes) for _ in range(n)]
    assert sum(hit) == int(n * rate + 1e-9)
    report = chaos.experiments()[0]
    assert (report["matched"], report["picked"], report["injected"]) == (n, sum(hit), sum(hit))


def test_the_share_spreads_its_picks_as_the_sims_rule_does() -> None:
    share = Share(0.5)
    assert [share.pick() for _ in range(6)] == [False, True, False, True, False, True]
    share = Share(0.25)
    assert [share.pick() for _ in range(8)] == [False, False, False, True] * 2


async def test_an_experiment_hits_only_within_its_window(fakes: FakeAdapters) -> None:
    clock = Clock()
    chaos = chaos_of(experiment(kind="refuse", start_after_s=10, duration_s=5), clock=clock)
    start = clock.now
    assert not await hits(chaos, fakes)
    assert chaos.experiments()[0]["active"] is False
    clock.now = start + 10
    assert await hits(chaos, fakes)
    assert chaos.experiments()[0]["active"] is True
    clock.now = start + 14.999
    assert await hits(chaos, fakes)
    clock.now = start + 15
    assert not await hits(chaos, fakes)
    report = chaos.experiments()[0]
    assert (report["active"], report["matched"], report["started_s_ago"]) == (False, 2, 15)


async def test_experiments_start_and_stop_at_run_time(fakes: FakeAdapters) -> None:
    clock = Clock()
    chaos = chaos_of(clock=clock)
    assert not await hits(chaos, fakes) and chaos.experiments() == []
    chaos.start(experiment("late", kind="refuse", duration_s=60))
    assert await hits(chaos, fakes)
    clock.now += 59
    chaos.start(experiment("late", kind="refuse", duration_s=60))  # again: from now
    clock.now += 30
    assert await hits(chaos, fakes)
    (report,) = chaos.experiments()
    assert (report["matched"], report["started_s_ago"]) == (1, 30)  # a new run
    assert chaos.stop("late") is True and chaos.stop("late") is False
    assert not await hits(chaos, fakes) and chaos.experiments() == []


def test_starting_beyond_the_most_experiments_or_at_nothing_is_refused() -> None:
    chaos = chaos_of()
    chaos.wrap(FakeAdapters(), {"w1": "m"})
    for index in range(MAX_CHAOS_EXPERIMENTS):
        chaos.start(experiment(f"e{index}"))
    chaos.start(experiment("e0", kind="refuse"))  # a restart is no new one
    with pytest.raises(TooManyExperiments) as full:
        chaos.start(experiment("one-more"))
    assert full.value.status == 409
    chaos.stop("e1")
    with pytest.raises(InvalidRequest, match="'nowhere'") as unknown:
        chaos.start(experiment("typo", routes=("nowhere",)))
    assert (unknown.value.param, unknown.value.code) == ("routes", "chaos_target_not_found")
    with pytest.raises(InvalidRequest, match="'w9'"):
        chaos.start(experiment("typo", backends=("w9",)))


async def test_the_master_switch_off_injects_nothing_and_refuses_starts(
    fakes: FakeAdapters,
) -> None:
    injections = Injections()
    chaos = chaos_of(experiment(kind="refuse"), enabled=False, on_injected=injections)
    assert chaos.enabled is False
    fakes["w1"].add(chat_completion("hi"))
    adapter = adapter_of(chaos, fakes)
    response = await adapter.post("/v1/x", BODY, context())
    assert response is fakes["w1"].responses[0]  # the inner adapter's own answer
    response.close()
    with pytest.raises(ChaosDisabled) as refused:
        chaos.start(experiment("y", kind="refuse"))
    error = refused.value
    assert (error.status, error.type, error.code) == (
        409,
        "invalid_request_error",
        "chaos_disabled",
    )
    assert "chaos.enabled: false" in error.message
    assert not await hits(chaos, fakes)
    assert injections == []
    (listed,) = chaos.experiments()  # the config's, listed as never started
    assert (listed["name"], listed["active"], listed["started_s_ago"]) == ("x", False, None)


def test_a_backend_outside_the_routes_given_cannot_be_wrapped() -> None:
    factory = chaos_of().wrap(FakeAdapters(), {"w1": "m"})
    with pytest.raises(LookupError, match="'w2'"):
        factory(backend("w2"), FAST, UpstreamConfig(), ByteBudget(1 << 20))


# -- The real router, reacting ------------------------------------------------------------


async def test_an_injected_503_is_retried_on_the_other_backend(fakes: FakeAdapters) -> None:
    fakes["w2"].then = chat_completion("hi")
    injections = Injections()
    chaos = chaos_of(
        experiment("outage", kind="error", status=503, backends=("w1",)), on_injected=injections
    )
    router = router_of(chaos, fakes, route("m", "w1", "w2", non_stream="passthrough"))
    outcome = Outcome()
    call = Call("req-1", caller="alice")
    plan = router.plan(chat(), call)
    completion = await router.complete(plan, outcome)
    assert (completion.backend, outcome.attempts) == ("w2", 2)
    assert plan.context.injected == ["outage:error"]
    assert injections == [("outage", "error")]
    assert fakes["w1"].requests == []  # w1 itself was never asked


async def test_an_injected_429s_retry_after_is_honoured_by_the_router(
    fakes: FakeAdapters,
) -> None:
    fakes["w2"].then = chat_completion("hi")
    chaos = chaos_of(experiment(kind="error", status=429, retry_after_s=30, backends=("w1",)))
    router = router_of(chaos, fakes, route("m", "w1", "w2", non_stream="passthrough"))
    for _ in range(3):
        assert (await complete(router, chat(), Outcome())).backend == "w2"
    # The Retry-After kept w1 out of rotation: asked once, never again.
    assert chaos.experiments()[0]["matched"] == 1


async def test_an_injected_context_length_error_is_the_clients_and_not_retried(
    fakes: FakeAdapters,
) -> None:
    chaos = chaos_of(experiment(kind="error", status=400, code="context_length_exceeded"))
    router = router_of(chaos, fakes, route("m", "w1", "w2", non_stream="passthrough"))
    outcome = Outcome()
    with pytest.raises(ContextTooLong) as too_long:
        await complete(router, chat(), outcome)
    assert isinstance(too_long.value, UpstreamRejected) and too_long.value.status == 400
    assert outcome.attempts == 1


async def test_injected_failures_open_the_breaker_as_real_ones_do(fakes: FakeAdapters) -> None:
    breaker = BreakerConfig(consecutive_failures=2, min_requests=1000, open_s=60)
    chaos = chaos_of(experiment(kind="error", status=500))
    router = router_of(
        chaos, fakes, route("m", "w1", breaker=breaker, retries=RetryConfig(max_retries=0))
    )
    for _ in range(2):
        with pytest.raises(UpstreamError):
            await complete(router, chat(), Outcome())
    assert router.routes[0].backends[0].breaker.state == "open"


async def test_a_hang_is_ended_by_the_routers_first_token_timeout(fakes: FakeAdapters) -> None:
    fakes["w2"].then = Events(chat_events("Hi"))
    chaos = chaos_of(experiment(kind="hang", backends=("w1",)))
    quick = timeouts(first_token_s=0.05)
    router = router_of(chaos, fakes, route("m", "w1", "w2", timeouts=quick))
    streamed = await stream(router, chat(stream=True), Outcome())
    assert (streamed.backend, streamed.text, streamed.done) == ("w2", "Hi", True)


async def test_a_cut_stream_is_resumed_elsewhere(fakes: FakeAdapters) -> None:
    fakes["w1"].add(Events(chat_events("Rivers ", "run ", "on")))
    fakes["w2"].add(Events([chat_chunk(role=True), chat_chunk("on", finish="stop"), DONE]))
    chaos = chaos_of(experiment(kind="cut", after_events=3, backends=("w1",)))
    router = router_of(chaos, fakes, route("m", backend("w1", weight=1000), "w2"))
    outcome = Outcome()
    call = Call("req-1")
    plan = router.plan(chat(stream=True), call)
    opened = await router.open_stream(plan, outcome)
    try:
        body = opened.first + b"".join([events async for events in opened.rest()])
    finally:
        opened.close()
    assert b"Rivers " in body and b"run " in body and body.endswith(DONE)
    assert (outcome.resumptions, outcome.backend) == (1, "w2")
    assert plan.context.injected == ["x:cut"]


async def test_a_malformed_event_is_dropped_and_a_missing_done_supplied(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].then = Events(chat_events("Hi", " there"))
    chaos = chaos_of(experiment("garbage", kind="malformed", after_events=1))
    chaos.start(experiment("nodone", kind="no_done", keys=("bob",)))
    router = router_of(chaos, fakes, route("m", "w1"))
    outcome = Outcome()
    streamed = await stream(router, chat(stream=True), outcome)
    assert (streamed.text, streamed.done, outcome.dropped_events) == ("Hi there", True, 1)
    assert b"not json" not in streamed.body
    streamed = await stream(router, chat(stream=True), Outcome(), Call("r2", caller="bob"))
    assert streamed.text == "Hi there" and streamed.done  # the router ended it with [DONE]


async def test_every_attempt_hit_is_listed_in_the_requests_context(
    fakes: FakeAdapters,
) -> None:
    injections = Injections()
    chaos = chaos_of(experiment("flaky", kind="refuse"), on_injected=injections)
    router = router_of(chaos, fakes, route("m", "w1", "w2"))
    plan = router.plan(chat(), Call("req-1"))
    with pytest.raises(UpstreamError):
        await router.complete(plan, Outcome())
    assert plan.context.injected == ["flaky:refuse", "flaky:refuse"]
    assert injections == [("flaky", "refuse")] * 2


async def test_a_json_answer_cut_is_retried_like_a_broken_body(fakes: FakeAdapters) -> None:
    fakes["w1"].then = fakes["w2"].then = Json(orjson.dumps(chat_completion("hi").body))
    chaos = chaos_of(experiment(kind="cut", backends=("w1",)))
    router = router_of(chaos, fakes, route("m", "w1", "w2", non_stream="passthrough"))
    outcome = Outcome()
    assert (await complete(router, chat(), outcome)).backend == "w2"
    assert outcome.attempts == 2
