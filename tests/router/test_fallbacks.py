"""Fallbacks: another route answers when the one asked for cannot."""

from __future__ import annotations

import pytest

from gateway.errors import ContextTooLong, NoLiveBackend, UpstreamError
from gateway.router import Call, Outcome, Router, RouterHooks
from providers.fake import CannotConnect, Events, FakeAdapters, Refuse, chat_events
from tests.router.conftest import chat, complete, make_router, route, stream

# Every stream here is read both ways: through rest() and pumped (tests/router/conftest.py).
pytestmark = pytest.mark.usefixtures("stream_reading")

TOO_LONG = {
    "error": {
        "message": "This model's maximum context length is 64 tokens. However, you requested "
        "212 tokens.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
}


def unhealthy(router: Router, name: str) -> None:
    """As a health check that failed would leave it: out of rotation."""
    next(b for b in router.backends if b.name == name).health.healthy = False


@pytest.mark.parametrize("down", ["refusing", "unhealthy"])
@pytest.mark.parametrize("streaming", [False, True])
async def test_the_fallback_answers_when_the_primary_cannot(
    fakes: FakeAdapters, down: str, streaming: bool
) -> None:
    fakes["gone"].then = CannotConnect()
    fakes["b1"].add(Events(chat_events("from backup")))
    fell: list[tuple[str, str]] = []
    router = make_router(
        fakes,
        route("primary", "gone", fallbacks=("backup",)),
        route("backup", "b1"),
        hooks=RouterHooks(on_fallback=lambda old, new: fell.append((old, new))),
    )
    if down == "unhealthy":
        unhealthy(router, "gone")
    outcome = Outcome()
    if streaming:
        streamed = await stream(router, chat("primary", stream=True), outcome)
        assert (streamed.route, streamed.backend, streamed.text) == ("backup", "b1", "from backup")
    else:
        completion = await complete(router, chat("primary"), outcome)
        assert (completion.route, completion.backend) == ("backup", "b1")
    assert (outcome.route, outcome.fallback_from, outcome.backend) == ("backup", "primary", "b1")
    assert fell == [("primary", "backup")]
    # Unhealthy, it was never asked; refusing, it was asked once.
    assert len(fakes["gone"].requests) == (1 if down == "refusing" else 0)
    # The fallback is sent its own model name, not the one the client asked for.
    assert fakes["b1"].requests[0].body["model"] == "backup"


async def test_fallbacks_are_tried_in_order_and_the_last_failure_is_told(
    fakes: FakeAdapters,
) -> None:
    for name in ("p1", "f1", "g1"):
        fakes[name].then = Refuse(502)
    fell: list[tuple[str, str]] = []
    router = make_router(
        fakes,
        route("primary", "p1", fallbacks=("first", "second")),
        route("first", "f1"),
        route("second", "g1"),
        hooks=RouterHooks(on_fallback=lambda old, new: fell.append((old, new))),
    )
    outcome = Outcome()
    with pytest.raises(UpstreamError, match="Backend 'g1' answered 502"):
        await complete(router, chat("primary"), outcome)
    assert fell == [("primary", "first"), ("first", "second")]
    assert (outcome.route, outcome.fallback_from) == ("second", "primary")


async def test_a_prompt_too_long_goes_only_to_a_fallback_with_a_larger_context(
    fakes: FakeAdapters,
) -> None:
    fakes["s1"].add(Refuse(400, TOO_LONG))
    # "tiny" (a smaller window) has no script: asking it would fail the test. Nor has s2,
    # the small route's other backend: a prompt too long is too long on every one.
    fakes["l1"].add(Events(chat_events("a long answer")))
    fell: list[tuple[str, str]] = []
    router = make_router(
        fakes,
        route("small", "s1", "s2", context_window=64, fallbacks=("tiny", "large")),
        route("tiny", "t1", context_window=32),
        route("large", "l1", context_window=4096),
        hooks=RouterHooks(on_fallback=lambda old, new: fell.append((old, new))),
    )
    outcome = Outcome()
    streamed = await stream(router, chat("small", stream=True), outcome)
    assert (streamed.route, streamed.text) == ("large", "a long answer")
    assert (outcome.attempts, outcome.fallback_from) == (2, "small")
    assert fell == [("small", "large")]
    assert not fakes["t1"].requests and not fakes["s2"].requests


async def test_a_prompt_too_long_with_no_larger_fallback_is_the_upstreams_400(
    fakes: FakeAdapters,
) -> None:
    fakes["s1"].add(Refuse(400, TOO_LONG))
    router = make_router(
        fakes,
        route("alone", "s1", fallbacks=("tiny",), context_window=64),
        route("tiny", "t1", context_window=32),
    )
    outcome = Outcome()
    with pytest.raises(ContextTooLong) as caught:
        await complete(router, chat("alone"), outcome)
    assert caught.value.status == 400 and caught.value.payload() == TOO_LONG
    assert outcome.attempts == 1 and not fakes["t1"].requests  # sent once only


async def test_a_forced_pin_never_falls_back(fakes: FakeAdapters) -> None:
    router = make_router(
        fakes,
        route("m", "w1", "w2", fallbacks=("backup",)),
        route("backup", "b1"),
    )
    unhealthy(router, "w2")
    outcome = Outcome()
    with pytest.raises(NoLiveBackend) as caught:
        await complete(router, chat(), outcome, Call("req-1", pin="w2", may_pin=True))
    assert "'w2'" in caught.value.message and caught.value.headers["Retry-After"]
    assert (outcome.route, outcome.fallback_from) == ("m", None)
    assert not fakes["w1"].requests and not fakes["b1"].requests


async def test_a_profile_pin_that_is_down_may_fall_back_but_never_to_another_backend(
    fakes: FakeAdapters,
) -> None:
    fakes["b1"].add(Events(chat_events("backup")))
    router = make_router(
        fakes,
        route("m", "w1", "w2", fallbacks=("backup",)),
        route("backup", "b1"),
    )
    unhealthy(router, "w2")
    outcome = Outcome()
    streamed = await stream(router, chat(stream=True), outcome, Call("req-1", pins=("w2",)))
    assert (streamed.route, streamed.backend) == ("backup", "b1")
    assert outcome.fallback_from == "m" and not fakes["w1"].requests
