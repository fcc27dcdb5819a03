"""Where a caller may send a request: pins, the right to pin, the models it may use."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest, ModelNotFound, PermissionDenied
from gateway.router import Call, Outcome
from providers.fake import Events, FakeAdapters, chat_completion, chat_events
from tests.router.conftest import backend, chat, complete, make_router, route, stream

# Every stream here is read both ways: through rest() and pumped (tests/router/conftest.py).
pytestmark = pytest.mark.usefixtures("stream_reading")


def answer_everything(fakes: FakeAdapters, *names: str) -> None:
    for name in names:
        fakes[name].then = lambda request: Events(chat_events("hi"))


async def test_x_vgate_pin_sends_every_request_to_the_named_backend(fakes: FakeAdapters) -> None:
    answer_everything(fakes, "w1", "w2")
    # w1 would take 100 of every 101 requests: only the pin sends one to w2.
    router = make_router(fakes, route("m", backend("w1", weight=100), "w2"))
    for name in ("w2", "w1", "w2"):
        call = Call("req-1", pin=name, may_pin=True)
        assert (await complete(router, chat(), Outcome(), call)).backend == name
        assert (await stream(router, chat(stream=True), Outcome(), call)).backend == name
    assert len(fakes["w2"].requests) == 4 and len(fakes["w1"].requests) == 2
    # The decision says why: the pin, not the weights.
    outcome = Outcome()
    await complete(router, chat(), outcome, Call("req-2", pin="w2", may_pin=True))
    assert [(d.choice, d.pin, d.reason) for d in outcome.decisions] == [("w2", "w2", "pin")]


async def test_x_vgate_pin_without_the_right_is_403_before_anything_is_sent(
    fakes: FakeAdapters,
) -> None:
    router = make_router(fakes, route("m", "w1", "w2"))
    for call in (Call("req-1", pin="w2"), Call("req-1", pin="w2", pins=("w2",))):
        with pytest.raises(PermissionDenied) as caught:
            router.plan(chat(), call)  # a profile pin is not the right to choose
        assert caught.value.status == 403 and caught.value.code == "pin_not_allowed"
        assert "may_pin" in caught.value.message
    assert not fakes["w1"].requests and not fakes["w2"].requests


@pytest.mark.parametrize("name", ["w9", "b1", "", "  "])
async def test_x_vgate_pin_naming_a_backend_the_route_lacks_is_400(
    fakes: FakeAdapters, name: str
) -> None:
    router = make_router(fakes, route("m", "w1", "w2"), route("backup", "b1"))
    with pytest.raises(InvalidRequest) as caught:
        router.plan(chat(), Call("req-1", pin=name, may_pin=True))
    error = caught.value
    assert (error.status, error.param, error.code) == (400, "X-VGate-Pin", "invalid_value")
    assert "w1, w2" in error.message  # it lists what the route has


async def test_a_profile_pin_list_uses_the_backend_each_route_has(fakes: FakeAdapters) -> None:
    answer_everything(fakes, "w1", "w2", "e1", "e2", "b1")
    router = make_router(
        fakes,
        route("m", backend("w1", weight=100), "w2"),
        route("embed", backend("e1", weight=100), "e2"),
        route("backup", "b1"),
    )
    call = Call("req-1", pins=("w2", "e2"))
    for _ in range(3):
        assert (await stream(router, chat("m", stream=True), Outcome(), call)).backend == "w2"
        assert (await stream(router, chat("embed", stream=True), Outcome(), call)).backend == "e2"
    # A route with none of the key's pinned backends routes it as any other.
    assert (await stream(router, chat("backup", stream=True), Outcome(), call)).backend == "b1"
    assert not fakes["w1"].requests and not fakes["e1"].requests


async def test_a_caller_limited_to_some_models_cannot_tell_others_from_missing_ones(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].add(chat_completion("hi"))
    router = make_router(
        fakes,
        route("allowed", "w1", non_stream="passthrough", aliases=("nickname",)),
        route("secret", "s1"),
    )
    call = Call("req-1", models=frozenset({"allowed"}))
    messages = []
    for model in ("secret", "missing"):
        with pytest.raises(ModelNotFound) as caught:
            router.plan(chat(model), call)
        assert caught.value.status == 404 and caught.value.param == "model"
        messages.append(caught.value.message.replace(model, "X"))
    assert messages[0] == messages[1]  # the same words for both
    assert "allowed" in messages[0] and "secret" not in messages[0]
    assert messages[0].endswith("Models this key may use: allowed.")
    with pytest.raises(ModelNotFound) as long_name:
        router.plan(chat("secret-model" + "x" * 500), call)
    assert len(long_name.value.message) < 250  # the name asked for is clipped, as everywhere
    # An alias of a model it may use is that model.
    assert (await complete(router, chat("nickname"), Outcome(), call)).route == "allowed"
    assert not fakes["s1"].requests


async def test_without_a_model_list_an_unknown_model_lists_every_model(
    fakes: FakeAdapters,
) -> None:
    router = make_router(fakes, route("a", "w1"), route("b", "w2", aliases=("bee",)))
    with pytest.raises(ModelNotFound, match=r"Available models: a, b, bee\."):
        router.plan(chat("c"), Call("req-1"))
