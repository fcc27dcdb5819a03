"""Admission: the process's in-flight limit, its queue, and the slots every request frees."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from gateway.config import ServerConfig
from gateway.errors import Overloaded, UpstreamRejected
from gateway.router import Call, Outcome, Router
from policies.admission import Priority
from providers.fake import Break, Events, FakeAdapters, Refuse, chat_chunk, chat_events
from tests.router.conftest import CALL, chat, complete, make_router, route, stream

# Every stream here is read both ways: through rest() and pumped (tests/router/conftest.py).
pytestmark = pytest.mark.usefixtures("stream_reading")

ONE_AT_A_TIME = ServerConfig(max_in_flight=1, queue_max_waiting=4, queue_timeout_s=5)


async def until(condition: Callable[[], bool]) -> None:
    """Let the other tasks run until `condition` holds: a handful of loop turns, no sleeps."""
    async with asyncio.timeout(5):
        # Admission has no event to wait on: yield to the tasks under test until it holds.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0)


def idle(router: Router) -> bool:
    """Nothing held: no admission slot, nothing in flight on any backend."""
    return router.admission.in_flight == 0 and all(b.in_flight == 0 for b in router.backends)


async def test_a_stream_holds_its_slot_until_it_is_closed_and_the_next_waits_for_it(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].then = lambda request: Events(chat_events("hi"))
    router = make_router(fakes, route("m", "w1"), server=ONE_AT_A_TIME)
    first = await router.open_stream(router.plan(chat(stream=True), CALL), Outcome())
    assert router.admission.in_flight == 1
    queued = Outcome()
    waiting = asyncio.create_task(stream(router, chat(stream=True), queued))
    await until(lambda: router.admission.waiting == 1)
    assert len(fakes["w1"].requests) == 1  # the second has not gone upstream
    first.close()
    assert (await waiting).text == "hi"
    assert queued.waited_s > 0 and len(fakes["w1"].requests) == 2
    assert idle(router)


async def test_interactive_requests_are_admitted_before_batch_ones(fakes: FakeAdapters) -> None:
    fakes["w1"].then = lambda request: Events(chat_events("hi"))
    router = make_router(fakes, route("m", "w1"), server=ONE_AT_A_TIME)
    holder = await router.open_stream(router.plan(chat(stream=True), CALL), Outcome())
    batch = Call("batch", priority=Priority.BATCH)
    interactive = Call("interactive", priority=Priority.INTERACTIVE)
    tasks = [
        asyncio.create_task(stream(router, chat(stream=True), Outcome(), batch)),
        asyncio.create_task(stream(router, chat(stream=True), Outcome(), interactive)),
    ]
    await until(lambda: router.admission.waiting == 2)
    holder.close()
    await asyncio.gather(*tasks)
    order = [r.request_id for r in fakes["w1"].requests[1:]]
    assert order == ["interactive", "batch"]  # queued second, admitted first
    assert idle(router)


async def test_a_full_queue_is_shed_at_once_before_any_upstream_work(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].add(Events(chat_events("hi")))
    server = ServerConfig(max_in_flight=1, queue_max_waiting=0, queue_timeout_s=5)
    router = make_router(fakes, route("m", "w1"), server=server)
    holder = await router.open_stream(router.plan(chat(stream=True), CALL), Outcome())
    outcome = Outcome()
    with pytest.raises(Overloaded) as caught:
        await complete(router, chat(), outcome)
    assert caught.value.status == 503 and caught.value.headers["Retry-After"]
    assert outcome.attempts == 0 and len(fakes["w1"].requests) == 1
    holder.close()
    assert idle(router)


async def test_a_wait_past_the_queue_timeout_is_shed(fakes: FakeAdapters) -> None:
    fakes["w1"].add(Events(chat_events("hi")))
    server = ServerConfig(max_in_flight=1, queue_max_waiting=4, queue_timeout_s=0.05)
    router = make_router(fakes, route("m", "w1"), server=server)
    holder = await router.open_stream(router.plan(chat(stream=True), CALL), Outcome())
    with pytest.raises(Overloaded, match="queue timeout"):
        await complete(router, chat(), Outcome())
    assert router.admission.waiting == 0 and len(fakes["w1"].requests) == 1
    holder.close()
    assert idle(router)


async def test_every_way_a_request_ends_gives_its_slot_back(fakes: FakeAdapters) -> None:
    fakes["w1"].add(
        Refuse(400),  # a completion refused
        Refuse(400),  # a stream refused before it opened
        Events([chat_chunk(role=True), chat_chunk("a"), Break()]),  # broken mid-way...
        Refuse(400),  # ...and its resumption refused
        Events(chat_events("whole")),
    )
    router = make_router(fakes, route("m", "w1"), server=ONE_AT_A_TIME)
    with pytest.raises(UpstreamRejected):
        await complete(router, chat(), Outcome())
    assert idle(router)
    with pytest.raises(UpstreamRejected):
        await stream(router, chat(stream=True), Outcome())
    assert idle(router)
    broken = await stream(router, chat(stream=True), Outcome())
    assert broken.interrupted is not None and idle(router)
    assert (await stream(router, chat(stream=True), Outcome())).text == "whole"
    assert idle(router)


async def test_a_stream_settles_its_usage_when_it_closes(fakes: FakeAdapters) -> None:
    fakes["w1"].add(Events(chat_events("a", "b", "c", prompt_tokens=11)))
    router = make_router(fakes, route("m", "w1"))
    outcome = Outcome()
    streamed = await stream(router, chat(stream=True), outcome)
    assert (outcome.prompt_tokens, outcome.completion_tokens, outcome.tokens) == (11, 3, 14)
    # The client did not ask for usage: the gateway's own usage chunk is not forwarded.
    assert all("usage" not in c for c in streamed.chunks)
