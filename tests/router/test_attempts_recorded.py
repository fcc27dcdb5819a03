"""Every attempt the router makes is noted in the request's outcome, for its trace span."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager

import pytest

from gateway.errors import BreakerOpen, UpstreamTimeout
from gateway.router import Outcome
from gateway.router.outcome import AttemptRecord
from providers.fake import (
    DONE,
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
from tests.router.conftest import backend, chat, complete, make_router, route, stream

# Every stream here is read both ways: through rest() and pumped (tests/router/conftest.py).
pytestmark = pytest.mark.usefixtures("stream_reading")

FIRST = {"weight": 1000}  # picked first


def facts(outcome: Outcome) -> list[tuple[str, str, int | None, str, str | None]]:
    return [(a.route, a.backend, a.status, a.result, a.resumption) for a in outcome.tried]


def assert_timed_in_order(attempts: list[AttemptRecord], began: float, ended: float) -> None:
    """Each attempt's times lie within the request's and follow one another."""
    previous = began
    for attempt in attempts:
        assert attempt.end is not None
        marks = [attempt.start, attempt.first_byte, attempt.first_token, attempt.end]
        taken = [mark for mark in marks if mark is not None]
        assert taken == sorted(taken)
        assert previous <= attempt.start and attempt.end <= ended
        previous = attempt.end


async def test_a_retried_request_notes_the_refusal_then_the_answer(fakes: FakeAdapters) -> None:
    fakes["w1"].add(Refuse(503))
    fakes["w2"].add(chat_completion("hi"))
    router = make_router(fakes, route("m", backend("w1", **FIRST), "w2", non_stream="passthrough"))
    outcome = Outcome()
    began = time.perf_counter()
    await complete(router, chat(max_tokens=7), outcome)
    ended = time.perf_counter()
    assert facts(outcome) == [
        ("m", "w1", 503, "upstream_error", None),
        ("m", "w2", 200, "ok", None),
    ]
    assert_timed_in_order(outcome.tried, began, ended)
    refused, answered = outcome.tried
    assert refused.first_byte is not None and answered.first_byte is not None
    assert answered.first_token is None  # a whole answer has no first token of its own
    assert outcome.request is not None and outcome.request.payload["max_tokens"] == 7


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_fallback_notes_the_route_it_went_on_to(
    fakes: FakeAdapters, streaming: bool
) -> None:
    fakes["gone"].then = CannotConnect()
    fakes["b1"].add(Events(chat_events("from backup")))
    router = make_router(
        fakes, route("primary", "gone", fallbacks=("backup",)), route("backup", "b1")
    )
    outcome = Outcome()
    began = time.perf_counter()
    if streaming:
        await stream(router, chat("primary", stream=True), outcome)
    else:
        await complete(router, chat("primary"), outcome)
    ended = time.perf_counter()
    # The primary's backend retried once (max_retries 1), then the fallback answered.
    assert facts(outcome) == [
        ("primary", "gone", None, "upstream_unreachable", None),
        ("backup", "b1", 200, "ok", None),
    ]
    assert_timed_in_order(outcome.tried, began, ended)
    assert outcome.tried[0].first_byte is None
    assert outcome.tried[1].first_token is not None  # streamed, or assembled from a stream


async def test_a_timeout_is_noted_with_no_first_byte(fakes: FakeAdapters) -> None:
    fakes["silent"].then = Hang()
    router = make_router(fakes, route("m", "silent"))
    outcome = Outcome()
    began = time.perf_counter()
    with pytest.raises(UpstreamTimeout):
        await stream(router, chat(stream=True), outcome)
    ended = time.perf_counter()
    assert facts(outcome) == [("m", "silent", None, "upstream_timeout", None)]
    [silent] = outcome.tried
    assert silent.first_byte is None and silent.first_token is None
    assert_timed_in_order(outcome.tried, began, ended)
    assert silent.end is not None and silent.end - silent.start >= 0.5  # first_token_s


async def test_a_resumption_is_an_attempt_of_its_own(fakes: FakeAdapters) -> None:
    fakes["w1"].add(
        Events([chat_chunk(role=True), chat_chunk("Rivers "), chat_chunk("run "), Break()])
    )
    fakes["w2"].add(Events([chat_chunk(role=True), chat_chunk("to the sea", finish="stop"), DONE]))
    router = make_router(fakes, route("m", backend("w1", **FIRST), "w2"))
    outcome = Outcome()
    began = time.perf_counter()
    streamed = await stream(router, chat(stream=True, max_tokens=60), outcome)
    ended = time.perf_counter()
    assert streamed.text == "Rivers run to the sea"
    assert facts(outcome) == [
        ("m", "w1", 200, "upstream_stream_broken", None),
        ("m", "w2", 200, "ok", "prefill"),
    ]
    assert_timed_in_order(outcome.tried, began, ended)
    assert all(attempt.first_token is not None for attempt in outcome.tried)


class OpenedMeanwhile:
    """A fake breaker: it lets its backend be chosen, then refuses the attempt, as a real
    one does when another request opened it in between."""

    def allows(self) -> bool:
        return True

    def attempt(self) -> AbstractContextManager[None]:
        raise BreakerOpen("w1")


async def test_an_open_breaker_is_noted(fakes: FakeAdapters) -> None:
    fakes["w2"].add(chat_completion("hi"))
    router = make_router(fakes, route("m", backend("w1", **FIRST), "w2", non_stream="passthrough"))
    router.routes[0].backends[0].breaker = OpenedMeanwhile()  # type: ignore[assignment]
    outcome = Outcome()
    await complete(router, chat(), outcome)
    assert facts(outcome) == [("m", "w1", None, "breaker_open", None), ("m", "w2", 200, "ok", None)]
    assert outcome.tried[0].end is not None
