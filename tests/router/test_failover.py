"""Failover (issue 11): a silent backend is not waited on twice, fallbacks keep a share of
the deadline, and a broken stream goes on along the fallback chain."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import UpstreamTimeout
from gateway.router import Outcome, RouterHooks
from providers.fake import Events, FakeAdapters, Hang, Refuse, chat_completion, chat_events
from tests.router.conftest import (
    QUICK_RETRIES,
    backend,
    chat,
    complete,
    make_router,
    route,
    stream,
    timeouts,
)
from tests.router.test_resumption import answer, broken_after

# Every stream here is read both ways: through rest() and pumped (tests/router/conftest.py).
pytestmark = pytest.mark.usefixtures("stream_reading")

THREE_ATTEMPTS = QUICK_RETRIES.model_copy(update={"max_retries": 2})


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_silent_backend_is_asked_once_then_the_fallback(
    fakes: FakeAdapters, streaming: bool
) -> None:
    fakes["silent"].then = Hang()
    fakes["b1"].add(Events(chat_events("rescued")))
    router = make_router(
        fakes,
        route("primary", "silent", retries=THREE_ATTEMPTS, fallbacks=("backup",)),
        route("backup", "b1"),
    )
    outcome = Outcome()
    loop = asyncio.get_running_loop()
    started = loop.time()
    if streaming:
        answered = (await stream(router, chat("primary", stream=True), outcome)).route
    else:
        answered = (await complete(router, chat("primary"), outcome)).route
    assert answered == "backup"
    # One first-token window (0.5 s) on the silent backend, never three.
    assert len(fakes["silent"].requests) == 1 and outcome.attempts == 2
    assert loop.time() - started < 2 * 0.5


async def test_after_a_timeout_the_next_attempt_goes_to_another_backend(
    fakes: FakeAdapters,
) -> None:
    fakes["silent"].then = Hang()
    fakes["w2"].then = chat_completion("hi")
    router = make_router(
        fakes,
        route(
            "m",
            backend("silent", weight=1000),
            "w2",
            retries=THREE_ATTEMPTS,
            non_stream="passthrough",
            timeouts=timeouts(total_s=5.0),
        ),
    )
    with pytest.raises(UpstreamTimeout):
        # Passthrough, no fallback: the silent backend has the whole total_s (one attempt).
        await complete(router, chat(), Outcome())
    assert len(fakes["silent"].requests) == 1 and not fakes["w2"].requests


async def test_a_stream_that_stays_silent_is_not_retried_on_the_same_backend(
    fakes: FakeAdapters,
) -> None:
    fakes["silent"].then = Hang()
    fakes["w2"].then = Events(chat_events("hi"))
    router = make_router(
        fakes, route("m", backend("silent", weight=1000), "w2", retries=THREE_ATTEMPTS)
    )
    outcome = Outcome()
    streamed = await stream(router, chat(stream=True), outcome)
    assert streamed.backend == "w2" and outcome.attempts == 2
    assert len(fakes["silent"].requests) == 1
    # Three attempts allowed, both backends tried: the third was not the silent one again.


async def test_a_route_of_silent_backends_ends_after_each_was_asked_once(
    fakes: FakeAdapters,
) -> None:
    for name in ("s1", "s2"):
        fakes[name].then = Hang()
    router = make_router(fakes, route("m", "s1", "s2", retries=THREE_ATTEMPTS))
    outcome = Outcome()
    with pytest.raises(UpstreamTimeout, match="first_token_s"):
        await stream(router, chat(stream=True), outcome)
    assert outcome.attempts == 2
    assert len(fakes["s1"].requests) == len(fakes["s2"].requests) == 1


async def test_a_fast_failure_is_still_retried_on_the_same_backend(
    fakes: FakeAdapters,
) -> None:
    fakes["only"].add(Refuse(500), chat_completion("second time lucky"))
    router = make_router(fakes, route("m", "only", non_stream="passthrough"))
    outcome = Outcome()
    completion = await complete(router, chat(), outcome)
    assert completion.backend == "only" and outcome.attempts == 2


async def test_the_fallbacks_share_of_the_deadline_is_kept(fakes: FakeAdapters) -> None:
    """Three silent backends of 0.5 s each and a total of 1.2 s: without a reserve, the
    primary's attempts would spend it all and the client would get a 504."""
    for name in ("s1", "s2", "s3"):
        fakes[name].then = Hang()
    fakes["b1"].add(Events(chat_events("in time")))
    router = make_router(
        fakes,
        route(
            "primary",
            "s1",
            "s2",
            "s3",
            retries=THREE_ATTEMPTS,
            fallbacks=("backup",),
            timeouts=timeouts(first_token_s=0.5, idle_s=0.5, total_s=1.2),
        ),
        route("backup", "b1", timeouts=timeouts(first_token_s=0.5)),
    )
    outcome = Outcome()
    streamed = await stream(router, chat("primary", stream=True), outcome)
    assert (streamed.route, streamed.text) == ("backup", "in time")
    # The reserve (the fallback's first_token_s, 0.5 s) left the primary 0.7 s: two tries.
    asked = sum(len(fakes[name].requests) for name in ("s1", "s2", "s3"))
    assert asked == 2 and outcome.attempts == 3


async def test_an_explicit_reserve_is_what_the_fallbacks_get(fakes: FakeAdapters) -> None:
    fakes["s1"].then = Hang()
    fakes["b1"].add(chat_completion("backup"))
    router = make_router(
        fakes,
        route(
            "primary",
            "s1",
            fallbacks=("backup",),
            non_stream="passthrough",
            timeouts=timeouts(total_s=1.0, fallback_reserve_s=0.6),
        ),
        route("backup", "b1", non_stream="passthrough"),
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    completion = await complete(router, chat("primary"), Outcome())
    assert completion.route == "backup"
    # The silent passthrough was cut at total_s less the reserve: 0.4 s, not the whole 1 s.
    assert loop.time() - started < 0.9


async def test_a_broken_stream_goes_on_on_the_fallback(fakes: FakeAdapters) -> None:
    fakes["w1"].add(broken_after("Rivers ", "run "))
    fakes["b1"].add(answer("to ", "the sea", prompt_tokens=7))
    fell: list[tuple[str, str]] = []
    resumed: list[tuple[str, str, str]] = []
    router = make_router(
        fakes,
        route("primary", "w1", fallbacks=("backup",)),
        route("backup", "b1"),
        hooks=RouterHooks(
            on_fallback=lambda old, new: fell.append((old, new)),
            on_resume=lambda *call: resumed.append(call),
        ),
    )
    outcome = Outcome()
    streamed = await stream(router, chat("primary", stream=True, max_tokens=60), outcome)
    assert streamed.interrupted is None and streamed.done
    assert streamed.text == "Rivers run to the sea"
    assert (outcome.route, outcome.fallback_from, outcome.resumptions) == ("backup", "primary", 1)
    assert fell == [("primary", "backup")]
    assert resumed == [("backup", "prefill", "resumed")]
    # The broken backend was not asked again: the fallback was there.
    assert len(fakes["w1"].requests) == 1
    assert fakes["b1"].requests[0].body["messages"][-1] == {
        "role": "assistant",
        "content": "Rivers run ",
    }


async def test_without_a_fallback_the_broken_backend_itself_may_finish(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].add(broken_after("Rivers ", "run "), answer("to ", "the sea"))
    router = make_router(fakes, route("m", "w1"))
    streamed = await stream(router, chat(stream=True, max_tokens=60), Outcome())
    assert streamed.done and streamed.text == "Rivers run to the sea"
    assert len(fakes["w1"].requests) == 2


async def test_two_causes_read_as_two_sentences(fakes: FakeAdapters) -> None:
    fakes["w1"].add(broken_after("Rivers "))
    fakes["w1"].then = Refuse(500)
    router = make_router(fakes, route("m", "w1"))
    streamed = await stream(router, chat(stream=True, max_tokens=60), Outcome())
    assert streamed.interrupted is not None
    message = streamed.interrupted.message
    assert ". Resuming it failed: " in message, message
    assert message.endswith(".")
