"""Retries within a route: which backend gets what, in which order, and when it stops."""

from __future__ import annotations

import asyncio
import re

import pytest

from gateway.config import BreakerConfig, RetryConfig
from gateway.errors import UpstreamError, UpstreamRejected, UpstreamTimeout
from gateway.router import Call, Outcome, RouterHooks
from providers.fake import (
    Break,
    CannotConnect,
    Events,
    FakeAdapters,
    Hang,
    Refuse,
    chat_chunk,
    chat_completion,
    chat_events,
)
from tests.router.conftest import backend, chat, complete, make_router, route, stream, timeouts

# Every stream here is read both ways: through rest() and pumped (tests/router/conftest.py).
pytestmark = pytest.mark.usefixtures("stream_reading")

RETRY_AFTER_HONOURED = RetryConfig(
    max_retries=1, backoff_initial_s=0.001, backoff_max_s=0.001, retry_after_max_s=20
)


async def test_a_503_is_retried_at_once_on_the_other_backend_which_it_sends_away(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].add(Refuse(503, retry_after="30"))  # and nothing more: it must not be asked
    fakes["w2"].then = chat_completion("hi")
    retried: list[tuple[str, float]] = []
    router = make_router(
        fakes,
        route("m", "w1", "w2", retries=RETRY_AFTER_HONOURED, non_stream="passthrough"),
        hooks=RouterHooks(on_retry=lambda name, delay: retried.append((name, delay))),
    )
    outcomes = [Outcome() for _ in range(4)]
    for outcome in outcomes:
        completion = await complete(router, chat(), outcome)
        assert (completion.route, completion.backend) == ("m", "w2")
    first = outcomes[0]
    assert (first.attempts, first.backend) == (2, "w2")
    # Not the 20 s the Retry-After would have cost had the retry waited for it.
    assert first.waited_s < 1.0
    assert [name for name, _ in retried] == ["m"]
    # The Retry-After kept w1 out of rotation for the requests after it.
    assert [o.attempts for o in outcomes[1:]] == [1, 1, 1]
    assert len(fakes["w1"].requests) == 1 and len(fakes["w2"].requests) == 4
    w1 = router.routes[0].backends[0]
    assert w1.ejected_until > asyncio.get_running_loop().time() + 15


async def test_a_retry_after_with_no_other_backend_is_waited_out_up_to_its_cap(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].add(Refuse(503, retry_after="30"), chat_completion("hi"))
    retries = RetryConfig(max_retries=1, retry_after_max_s=0.05)
    router = make_router(fakes, route("m", "w1", retries=retries, non_stream="passthrough"))
    outcome = Outcome()
    completion = await complete(router, chat(), outcome)
    assert completion.backend == "w1" and outcome.attempts == 2
    assert outcome.waited_s == pytest.approx(0.05)  # the cap, not the upstream's 30 s


async def test_a_400_ends_the_request_as_the_upstream_answered_it(fakes: FakeAdapters) -> None:
    error = {
        "error": {
            "message": "logit_bias is not supported by this model",
            "type": "invalid_request_error",
            "param": "logit_bias",
            "code": "unsupported",
        }
    }
    fakes["w1"].then = fakes["w2"].then = Refuse(400, error)
    # The fallback has no script: asking it would fail the test.
    router = make_router(
        fakes,
        route("m", "w1", "w2", fallbacks=("backup",), non_stream="passthrough"),
        route("backup", "b1"),
    )
    for request in (chat(), chat(stream=True)):
        outcome = Outcome()
        with pytest.raises(UpstreamRejected) as caught:
            if request.stream:
                await stream(router, request, outcome)
            else:
                await complete(router, request, outcome)
        assert caught.value.status == 400
        assert caught.value.payload() == error
        assert (outcome.attempts, outcome.route, outcome.fallback_from) == (1, "m", None)
    # One request each, the weights taking turns: neither was retried on the other.
    assert len(fakes["w1"].requests) == len(fakes["w2"].requests) == 1
    assert not fakes["b1"].requests


async def test_retries_stop_at_their_attempts_and_the_last_answer_reaches_the_client(
    fakes: FakeAdapters,
) -> None:
    busy = {"error": {"message": "busy", "type": "rate_limit", "code": 429}}
    fakes["w1"].then = Refuse(429, busy, retry_after="7")
    retries = RetryConfig(max_retries=2, retry_after_max_s=0.001)
    router = make_router(fakes, route("m", "w1", retries=retries, non_stream="passthrough"))
    outcome = Outcome()
    with pytest.raises(UpstreamRejected) as caught:
        await complete(router, chat(), outcome)
    assert caught.value.status == 429
    assert caught.value.headers["Retry-After"] == "7"  # the client is told the upstream's wait
    assert len(fakes["w1"].requests) == 3 == outcome.attempts  # every attempt, none more


async def test_a_connection_refused_is_retried_elsewhere_and_the_backend_sits_out(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].add(CannotConnect())
    fakes["w2"].then = Events(chat_events("hi"))
    router = make_router(fakes, route("m", "w1", "w2"))
    outcome = Outcome()
    assert (await stream(router, chat(stream=True), outcome)).text == "hi"
    assert (outcome.attempts, outcome.backend) == (2, "w2")
    again = Outcome()
    await stream(router, chat(stream=True), again)
    assert again.attempts == 1 and len(fakes["w1"].requests) == 1


async def test_a_connection_refused_everywhere_is_a_502_naming_the_backend(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].add(CannotConnect(), CannotConnect(timed_out=True))
    router = make_router(fakes, route("m", "w1", retries=RetryConfig(max_retries=1)))
    outcome = Outcome()
    # The second attempt found the backend ejected: the first failure is what is told.
    with pytest.raises(UpstreamError) as caught:
        await complete(router, chat(), outcome)
    assert caught.value.status == 502 and caught.value.code == "upstream_unreachable"
    assert "'w1'" in caught.value.message
    assert outcome.attempts == 1 and fakes["w1"].pending == 1


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("silence", [Hang(), Events([Hang()])], ids=["no-answer", "no-event"])
async def test_no_first_token_in_time_is_retried_on_the_other_backend(
    fakes: FakeAdapters, streaming: bool, silence: Hang | Events
) -> None:
    fakes["w1"].add(silence)
    fakes["w2"].add(Events(chat_events("hi")))
    limits = timeouts(first_token_s=0.1, idle_s=5, total_s=10)
    router = make_router(fakes, route("m", "w1", "w2", timeouts=limits))
    outcome = Outcome()
    if streaming:
        assert (await stream(router, chat(stream=True), outcome)).backend == "w2"
    else:
        assert (await complete(router, chat(), outcome)).backend == "w2"
    assert (outcome.attempts, outcome.backend) == (2, "w2")
    assert len(fakes["w1"].requests) == 1


async def test_one_deadline_covers_every_attempt(fakes: FakeAdapters) -> None:
    # The first attempt ends at first_token_s; the second has only what is left of total_s.
    fakes["w1"].then = Hang()
    fakes["w2"].then = Hang()
    limits = timeouts(first_token_s=0.3, idle_s=0.5, total_s=0.5)
    retries = RetryConfig(max_retries=4, backoff_initial_s=0.001, backoff_max_s=0.001)
    router = make_router(fakes, route("m", "w1", "w2", timeouts=limits, retries=retries))
    loop = asyncio.get_running_loop()
    started = loop.time()
    outcome = Outcome()
    with pytest.raises(UpstreamTimeout) as caught:
        async with asyncio.timeout(5):  # a guard: without the deadline this would hang
            await stream(router, chat(stream=True), outcome)
    assert caught.value.status == 504
    # The second attempt had what was left of total_s, not a first_token_s of its own.
    said = re.search(
        r"no first token within ([0-9.e-]+)s \(timeouts.total_s\)", caught.value.message
    )
    assert said is not None and float(said[1]) < 0.25, caught.value.message
    assert outcome.attempts == 2  # of 5 allowed: the deadline, not the attempts, ended it
    assert loop.time() - started >= 0.5 - 0.01


async def test_a_passthrough_answer_is_bounded_by_total_s_and_not_retried(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].add(Hang())
    router = make_router(
        fakes,
        route(
            "m",
            "w1",
            "w2",
            timeouts=timeouts(first_token_s=0.1, idle_s=0.1, total_s=0.1),
            non_stream="passthrough",
        ),
    )
    outcome = Outcome()
    with pytest.raises(UpstreamTimeout, match="total time"):
        async with asyncio.timeout(5):
            await complete(router, chat(), outcome)
    assert outcome.attempts == 1 and not fakes["w2"].requests


async def test_an_error_event_first_is_retried_elsewhere(fakes: FakeAdapters) -> None:
    fakes["w1"].add(Events([{"error": {"message": "engine dead", "code": 500}}]))
    fakes["w2"].add(Events(chat_events("fine")))
    router = make_router(fakes, route("m", "w1", "w2"))
    outcome = Outcome()
    streamed = await stream(router, chat(stream=True), outcome)
    assert streamed.text == "fine" and streamed.backend == "w2" and outcome.attempts == 2


async def test_a_stream_that_breaks_before_its_first_event_is_retried_not_resumed(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].add(Events([Break()]))
    fakes["w2"].add(Events(chat_events("fine")))
    router = make_router(fakes, route("m", "w1", "w2"))
    outcome = Outcome()
    streamed = await stream(router, chat(stream=True), outcome)
    assert streamed.text == "fine"
    assert (outcome.attempts, outcome.resumptions) == (2, 0)
    assert streamed.chunks[0]["choices"][0]["delta"]["role"] == "assistant"


async def test_the_breaker_opens_after_its_failures_and_no_request_reaches_the_backend(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].then = Refuse(500)
    fakes["w2"].then = chat_completion("hi")
    breaker = BreakerConfig(consecutive_failures=2, min_requests=1000, open_s=30)
    router = make_router(fakes, route("m", "w1", "w2", breaker=breaker, non_stream="passthrough"))
    for _ in range(10):
        assert (await complete(router, chat(), Outcome())).backend == "w2"
    w1 = router.routes[0].backends[0]
    assert w1.breaker.state == "open"
    assert len(fakes["w1"].requests) == 2
    for _ in range(10):
        outcome = Outcome()
        await complete(router, chat(), outcome)
        assert outcome.attempts == 1
    assert len(fakes["w1"].requests) == 2  # open: not one more request reached it


async def test_a_client_error_does_not_count_against_the_breaker(fakes: FakeAdapters) -> None:
    fakes["w1"].then = Refuse(400)
    breaker = BreakerConfig(consecutive_failures=2, min_requests=1000, open_s=30)
    router = make_router(fakes, route("m", "w1", breaker=breaker, non_stream="passthrough"))
    for _ in range(5):
        with pytest.raises(UpstreamRejected):
            await complete(router, chat(), Outcome())
    assert router.routes[0].backends[0].breaker.state == "closed"
    assert len(fakes["w1"].requests) == 5


async def test_the_upstream_is_sent_what_the_client_sent_with_its_own_model_name(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].add(Refuse(503))
    fakes["w2"].add(Events([chat_chunk("a", finish="stop"), b"data: [DONE]\n\n"]))
    router = make_router(
        fakes,
        route("m", backend("w1", model="served-1"), backend("w2", model="served-2")),
    )
    request = chat(stream=True, max_tokens=7)
    before = {**request.payload, "messages": [dict(m) for m in request.payload["messages"]]}
    call = Call("req-42", traceparent=b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    await stream(router, request, Outcome(), call)
    assert request.payload == before  # the client's payload is never changed
    sent = fakes["w1"].requests + fakes["w2"].requests
    assert [r.body["model"] for r in sent] == ["served-1", "served-2"]
    assert all(r.body["max_tokens"] == 7 and r.body["stream"] for r in sent)
    # Usage is asked for on the client's behalf, upstream only.
    assert all(r.body["stream_options"] == {"include_usage": True} for r in sent)
    assert "stream_options" not in request.payload
    assert {(r.request_id, r.traceparent) for r in sent} == {(call.request_id, call.traceparent)}
