"""Answers whose whole body came in the read that held their first events (an upstream that
answers at once, as the bench's instant worker and a cache in front of vLLM do): the stream
is finished from what arrived, without another read or a read timer, with every check a
stream read event by event gets."""

from __future__ import annotations

import orjson
import pytest

from gateway.config import ResumeConfig
from gateway.router import Outcome
from providers.fake import DONE, Events, FakeAdapters, chat_chunk, chat_events, usage_chunk
from tests.router.conftest import chat, complete, make_router, route, stream

pytestmark = pytest.mark.usefixtures("stream_reading")
NO_RESUME = ResumeConfig(enabled=False)


async def test_a_stream_that_came_whole_reaches_the_client_whole(fakes: FakeAdapters) -> None:
    fakes["w1"].add(Events(chat_events("Hello", " world"), at_once=True))
    router = make_router(fakes, route("m", "w1"))
    outcome = Outcome()
    streamed = await stream(router, chat(stream=True), outcome)
    assert streamed.interrupted is None
    assert (streamed.text, streamed.done) == ("Hello world", True)
    assert streamed.body.count(b"[DONE]") == 1
    assert outcome.completion_tokens == 2
    assert fakes["w1"].responses[0].reads == 1


async def test_a_whole_body_that_forgot_its_done_is_completed(fakes: FakeAdapters) -> None:
    fakes["w1"].add(Events(chat_events("Hi")[:-1], at_once=True))
    router = make_router(fakes, route("m", "w1"))
    streamed = await stream(router, chat(stream=True), Outcome())
    assert streamed.interrupted is None
    assert (streamed.text, streamed.done) == ("Hi", True)


async def test_a_whole_body_whose_last_event_lacks_its_blank_line_keeps_it(
    fakes: FakeAdapters,
) -> None:
    last = b"data: " + orjson.dumps(usage_chunk(5, 1))  # and the body ends
    items = [chat_chunk(role=True), chat_chunk("Hi", finish="stop"), last]
    fakes["w1"].add(Events(items, at_once=True))
    router = make_router(fakes, route("m", "w1"))
    outcome = Outcome()
    streamed = await stream(
        router, chat(stream=True, stream_options={"include_usage": True}), outcome
    )
    assert streamed.interrupted is None
    assert streamed.chunks[-1]["usage"]["completion_tokens"] == 1
    assert streamed.done
    assert outcome.completion_tokens == 1


async def test_a_whole_body_that_ends_unfinished_is_cut_off(fakes: FakeAdapters) -> None:
    fakes["w1"].add(Events([chat_chunk(role=True), chat_chunk("Hel")], at_once=True))
    router = make_router(fakes, route("m", "w1", resume=NO_RESUME))
    streamed = await stream(router, chat(stream=True), Outcome())
    assert streamed.interrupted is not None
    assert streamed.interrupted.code == "upstream_stream_incomplete"
    assert streamed.text == "Hel" and not streamed.done


async def test_an_error_in_the_read_that_held_the_first_events_is_retried(
    fakes: FakeAdapters,
) -> None:
    # The client has nothing yet: another attempt starts afresh.
    items = [chat_chunk(role=True), chat_chunk("Hel"), {"error": {"message": "engine died"}}]
    fakes["w1"].add(Events([*items, chat_chunk("lo"), DONE], at_once=True))
    fakes["w2"].add(Events(chat_events("Hello"), at_once=True))
    router = make_router(fakes, route("m", "w1", "w2"))
    outcome = Outcome()
    streamed = await stream(router, chat(stream=True), outcome)
    assert streamed.interrupted is None
    assert (streamed.text, streamed.backend, outcome.attempts) == ("Hello", "w2", 2)


async def test_an_unterminated_error_ending_a_whole_body_cuts_the_stream_off(
    fakes: FakeAdapters,
) -> None:
    error = b'data: {"error": {"message": "engine died"}}'  # and the body ends
    fakes["w1"].add(Events([chat_chunk(role=True), chat_chunk("Hel"), error], at_once=True))
    router = make_router(fakes, route("m", "w1", resume=NO_RESUME))
    streamed = await stream(router, chat(stream=True), Outcome())
    assert streamed.interrupted is not None
    assert streamed.interrupted.code == "upstream_stream_error"
    assert "engine died" in streamed.interrupted.message
    assert streamed.text == "Hel" and not streamed.done


async def test_a_non_streaming_answer_assembled_from_a_whole_body(fakes: FakeAdapters) -> None:
    fakes["w1"].add(Events(chat_events("Hello", " world"), at_once=True))
    router = make_router(fakes, route("m", "w1"))
    outcome = Outcome()
    completion = await complete(router, chat(), outcome)
    answer = orjson.loads(completion.body)
    assert answer["choices"][0]["message"]["content"] == "Hello world"
    assert answer["usage"]["completion_tokens"] == 2
    assert outcome.attempts == 1


async def test_an_unfinished_whole_body_is_retried_before_the_client_has_anything(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].add(Events([chat_chunk(role=True), chat_chunk("Hel")], at_once=True))
    fakes["w2"].add(Events(chat_events("Hello"), at_once=True))
    router = make_router(fakes, route("m", "w1", "w2"))
    outcome = Outcome()
    completion = await complete(router, chat(), outcome)
    assert orjson.loads(completion.body)["choices"][0]["message"]["content"] == "Hello"
    assert (outcome.attempts, outcome.backend) == (2, "w2")
