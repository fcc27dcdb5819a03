"""Streams that break after reaching the client go on elsewhere, as one answer."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.config import ResumeConfig
from gateway.router import Outcome, Router, RouterHooks
from gateway.wire.validation import Endpoint, parse_request
from providers.fake import (
    DONE,
    Break,
    CannotConnect,
    Events,
    FakeAdapters,
    Hang,
    Refuse,
    StreamItem,
    chat_chunk,
    usage_chunk,
)
from tests.router.conftest import MESSAGES, backend, chat, make_router, route, stream, timeouts

# Every stream here is read both ways: through rest() and pumped (tests/router/conftest.py).
pytestmark = pytest.mark.usefixtures("stream_reading")

NO_PREFILL = {"continue_final_message": False}
FIRST = {"weight": 1000}  # picked first: the one whose stream breaks


def broken_after(*pieces: str, end: StreamItem | None = None) -> Events:
    """A stream from the backend that fails: its role chunk, `pieces`, then `end`."""
    items: list[StreamItem] = [chat_chunk(role=True, id="chatcmpl-first")]
    items += [chat_chunk(piece, id="chatcmpl-first") for piece in pieces]
    return Events([*items, end or Break()])


def answer(*pieces: str, prompt_tokens: int = 5) -> Events:
    """A whole stream from the backend that resumes (its own id, its own role chunk)."""
    items: list[StreamItem] = [chat_chunk(role=True, id="chatcmpl-second")]
    for index, piece in enumerate(pieces):
        finish = "stop" if index == len(pieces) - 1 else None
        items.append(chat_chunk(piece, finish=finish, id="chatcmpl-second"))
    return Events([*items, usage_chunk(prompt_tokens, len(pieces), id="chatcmpl-second"), DONE])


class Resumptions(list[tuple[str, str, str]]):
    """The router's on_resume calls: (route, mode, outcome)."""

    def hooks(self) -> RouterHooks:
        return RouterHooks(on_resume=lambda *call: self.append(call))


def resuming_router(fakes: FakeAdapters, resumptions: Resumptions, **first: Any) -> Router:
    second = {key: value for key, value in first.items() if key != "weight"}
    return make_router(
        fakes,
        route("m", backend("w1", **FIRST, **first), backend("w2", **second)),
        hooks=resumptions.hooks(),
    )


async def test_a_broken_stream_is_continued_from_a_prefill(fakes: FakeAdapters) -> None:
    fakes["w1"].add(broken_after("Rivers ", "run "))
    # The prefill's two chunks count as the prompt's to the upstream: 5 + 2.
    fakes["w2"].add(answer("to ", "the sea", prompt_tokens=7))
    resumptions = Resumptions()
    router = resuming_router(fakes, resumptions)
    outcome = Outcome()
    request = chat(stream=True, max_tokens=60, stream_options={"include_usage": True})
    sent_by_client = orjson.loads(orjson.dumps(request.payload))
    streamed = await stream(router, request, outcome)
    assert request.payload == sent_by_client  # the prefill is a copy
    assert streamed.interrupted is None and streamed.done
    assert streamed.text == "Rivers run to the sea"
    chunks = streamed.chunks
    assert {c["id"] for c in chunks} == {"chatcmpl-first"}  # one answer, one id
    assert sum(1 for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]) == 1
    # The two delivered chunks were the answer's, not the prompt's.
    usage = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert chunks[-1]["usage"] == usage
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (5, 4)
    assert (outcome.resumptions, outcome.backend, streamed.backend) == (1, "w2", "w1")
    assert resumptions == [("m", "prefill", "resumed")]
    # The healthy backend was asked to continue the delivered text.
    sent = fakes["w2"].requests[0].body
    assert sent["messages"] == [*MESSAGES, {"role": "assistant", "content": "Rivers run "}]
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert sent["max_tokens"] == 58


async def test_a_broken_stream_is_regenerated_and_matched(fakes: FakeAdapters) -> None:
    fakes["w1"].add(broken_after("Rivers ", "run "))
    # Chunked differently from what was delivered: matched by text, not by chunk.
    fakes["w2"].add(answer("Riv", "ers run to", " the", " sea"))
    resumptions = Resumptions()
    router = resuming_router(fakes, resumptions, **NO_PREFILL)
    outcome = Outcome()
    streamed = await stream(router, chat(stream=True, max_tokens=60), outcome)
    assert streamed.interrupted is None and streamed.done
    assert streamed.text == "Rivers run to the sea"
    assert {c["id"] for c in streamed.chunks} == {"chatcmpl-first"}
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (5, 4)  # its own, exact
    assert outcome.resumptions == 1 and resumptions == [("m", "regenerate", "resumed")]
    # Asked afresh: the client's own request.
    sent = fakes["w2"].requests[0].body
    assert sent["messages"] == MESSAGES and sent["max_tokens"] == 60
    assert "continue_final_message" not in sent


async def test_a_regenerated_answer_that_diverges_ends_with_an_error_event(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].add(broken_after("Rivers ", "run "))
    fakes["w2"].add(answer("Lakes ", "lie still"))
    resumptions = Resumptions()
    router = resuming_router(fakes, resumptions, **NO_PREFILL)
    streamed = await stream(router, chat(stream=True), Outcome())
    assert streamed.interrupted is not None
    assert streamed.interrupted.code == "stream_resume_diverged"
    assert "departs from the text already delivered" in streamed.interrupted.message
    assert "'w2'" in streamed.interrupted.message
    assert streamed.text == "Rivers run " and not streamed.done  # nothing spliced on
    # Counted "resumed" when the new stream started, then "diverged" when it departed.
    assert resumptions[-1] == ("m", "regenerate", "diverged")


async def test_a_stalled_stream_is_resumed_once_it_was_idle_for_idle_s(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].add(broken_after("Rivers ", end=Hang()))
    fakes["w2"].add(answer("run ", "on"))
    router = make_router(
        fakes,
        route(
            "m",
            backend("w1", **FIRST),
            "w2",
            # Only idle_s is short: no other timer can be what ends the stall.
            timeouts=timeouts(first_token_s=5, idle_s=0.1, total_s=10),
        ),
    )
    outcome = Outcome()
    streamed = await stream(router, chat(stream=True), outcome)
    assert streamed.text == "Rivers run on" and streamed.done
    assert (outcome.resumptions, outcome.backend) == (1, "w2")


async def test_a_refused_prefill_reports_the_original_failure(fakes: FakeAdapters) -> None:
    refusal = {"error": {"message": "continue_final_message is not supported", "code": 400}}
    fakes["w1"].add(broken_after("Rivers "))
    fakes["w2"].add(Refuse(400, refusal))
    resumptions = Resumptions()
    router = resuming_router(fakes, resumptions)
    streamed = await stream(router, chat(stream=True), Outcome())
    assert streamed.interrupted is not None
    message = streamed.interrupted.message
    assert message.startswith("Backend 'w1' broke off the stream")
    assert "Resuming it failed" in message and "continue_final_message" in message
    assert streamed.interrupted.code == "upstream_stream_broken"
    assert resumptions == [("m", "prefill", "failed")]


async def test_resumption_is_bounded_by_its_attempts(fakes: FakeAdapters) -> None:
    fakes["a1"].then = broken_after("Rivers ")  # every stream of its only backend breaks
    router = make_router(fakes, route("alone", "a1", resume=ResumeConfig(attempts=2)))
    outcome = Outcome()
    streamed = await stream(router, chat("alone", stream=True), outcome)
    assert streamed.interrupted is not None
    assert streamed.interrupted.code == "upstream_stream_broken"
    assert "It was not resumed: it was already resumed 2 times" in streamed.interrupted.message
    assert outcome.resumptions == 2 and len(fakes["a1"].requests) == 3


async def test_without_resumption_a_broken_stream_ends_with_an_error_event(
    fakes: FakeAdapters,
) -> None:
    fakes["u1"].add(broken_after("Rivers "))
    router = make_router(fakes, route("m", "u1", "u2", resume=ResumeConfig(enabled=False)))
    outcome = Outcome()
    streamed = await stream(router, chat(stream=True), outcome)
    assert streamed.interrupted is not None
    assert "broke off the stream" in streamed.interrupted.message
    assert "resumed" not in streamed.interrupted.message
    assert streamed.text == "Rivers " and outcome.resumptions == 0
    assert not fakes["u2"].requests


async def test_a_stream_is_resumed_on_the_fallback_that_answered_it(fakes: FakeAdapters) -> None:
    fakes["p1"].then = CannotConnect()
    fakes["b1"].add(broken_after("Rivers "))
    fakes["b2"].add(answer("run"))
    router = make_router(
        fakes,
        route("primary", "p1", fallbacks=("backup",)),
        route("backup", backend("b1", **FIRST), "b2"),
    )
    outcome = Outcome()
    streamed = await stream(router, chat("primary", stream=True), outcome)
    assert streamed.text == "Rivers run" and streamed.route == "backup"
    assert (outcome.route, outcome.backend, outcome.resumptions) == ("backup", "b2", 1)
    assert fakes["b2"].requests[0].body["model"] == "backup"
    assert len(fakes["p1"].requests) == 1  # not asked again to resume


@pytest.mark.parametrize("prefill", [True, False])
async def test_a_completions_stream_is_resumed_by_regenerating(
    fakes: FakeAdapters, prefill: bool
) -> None:
    def chunk(text: str, finish: str | None = None, id: str = "cmpl-first") -> dict[str, Any]:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        return {"id": id, "object": "text_completion", "created": 1, "choices": [choice]}

    fakes["w1"].add(Events([chunk("Rivers "), chunk("run "), Break()]))
    fakes["w2"].add(Events([chunk("Rivers run to", id="cmpl-2"), chunk(" the sea", "stop"), DONE]))
    resumptions = Resumptions()
    router = resuming_router(fakes, resumptions, continue_final_message=prefill)
    body = {"model": "m", "prompt": "rivers", "stream": True}
    request = parse_request(Endpoint.COMPLETIONS, orjson.dumps(body))
    outcome = Outcome()
    streamed = await stream(router, request, outcome)
    texts = [c["choices"][0]["text"] for c in streamed.chunks if c["choices"]]
    assert "".join(texts) == "Rivers run to the sea" and streamed.done
    # A prefill continues a chat's assistant message: a completion has none.
    assert resumptions == [("m", "regenerate", "resumed")]
    assert fakes["w2"].requests[0].body["prompt"] == "rivers"


async def test_an_unparseable_event_is_dropped_and_counted_not_resumed(
    fakes: FakeAdapters,
) -> None:
    fakes["w1"].add(
        Events(
            [
                chat_chunk(role=True),
                chat_chunk("Rivers "),
                b"data: {garbage\n\n",
                *answer("run").items[1:],
            ]
        )
    )
    router = make_router(fakes, route("m", "w1", "w2"))
    outcome = Outcome()
    streamed = await stream(router, chat(stream=True), outcome)
    assert streamed.text == "Rivers run" and streamed.done
    assert b"garbage" not in streamed.body  # it would break the client's parser
    assert (outcome.dropped_events, outcome.resumptions) == (1, 0)
    assert not fakes["w2"].requests
