"""Stream resumption's pieces: the transcript, the prefill request and the splice."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from policies.resume import Diverged, Splice, Transcript, prefill_payload


def chunk(content: str | None = None, *, role: bool = False, finish: str | None = None) -> Any:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-new",
        "created": 2,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def events(*payloads: Any) -> bytes:
    return b"".join(b"data: " + orjson.dumps(p) + b"\n\n" for p in payloads)


def contents(data: bytes) -> list[Any]:
    out = []
    for event in data.split(b"\n\n"):
        if event and event != b"data: [DONE]":
            out.append(orjson.loads(event.removeprefix(b"data: ")))
    return out


def delivered(*pieces: str) -> Transcript:
    transcript = Transcript(chat=True, max_chars=1000)
    first = chunk("", role=True)
    first["id"], first["created"] = "chatcmpl-orig", 1
    transcript.record(first)
    for piece in pieces:
        transcript.record(chunk(piece))
    return transcript


def test_the_transcript_keeps_the_delivered_text_and_the_original_id() -> None:
    transcript = delivered(" the", " river", " runs")
    assert transcript.text == " the river runs"
    assert transcript.chunks == 3
    assert transcript.id == "chatcmpl-orig"
    assert transcript.resumable


@pytest.mark.parametrize(
    "payload",
    [
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"id": "t"}]}}]},
        {"choices": [{"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {}}]},
        {"choices": [{"index": 1, "delta": {"content": "a"}}]},
        {"choices": [{"index": 0, "delta": {"content": 7}}]},
    ],
    ids=["tool-calls", "two-choices", "second-choice", "not-text"],
)
def test_answers_that_are_not_one_plain_text_are_not_resumable(payload: Any) -> None:
    transcript = delivered(" a")
    transcript.record(payload)
    assert not transcript.resumable


def test_an_answer_over_the_size_limit_is_not_resumable() -> None:
    transcript = Transcript(chat=False, max_chars=5)
    transcript.record({"choices": [{"index": 0, "text": "abc"}]})
    assert transcript.resumable
    transcript.record({"choices": [{"index": 0, "text": "def"}]})
    assert not transcript.resumable


@pytest.mark.parametrize(
    "breaker",
    [
        {"choices": [{"index": 0, "text": "x" * 100}]},  # over the size limit
        {"choices": [{"index": 0, "text": 7}]},  # not plain text
        {"choices": [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}]},  # two choices
    ],
    ids=["too-long", "not-text", "two-choices"],
)
def test_a_transcript_that_gave_up_holds_no_text_however_long_the_stream(breaker: Any) -> None:
    # It is fed every chunk of the stream: once it cannot be resumed, keeping the text
    # would hold the whole answer in memory (a stream may run for hours).
    transcript = Transcript(chat=False, max_chars=50)
    transcript.record({"id": "cmpl-1", "created": 1, "choices": [{"index": 0, "text": "ab"}]})
    transcript.record(breaker)
    assert not transcript.resumable
    for _ in range(10_000):
        transcript.record({"choices": [{"index": 0, "text": "more text "}]})
    assert transcript.pieces == [] and transcript.text == ""
    assert transcript.id == "cmpl-1"  # what a splice needs of it is kept


def test_the_prefill_continues_the_delivered_text_as_the_assistant() -> None:
    original = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10,
        "stream": True,
    }
    resumed = prefill_payload(original, delivered(" a", " b", " c"))
    assert resumed["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": " a b c"},
    ]
    assert resumed["continue_final_message"] is True
    assert resumed["add_generation_prompt"] is False
    assert resumed["max_tokens"] == 7  # three tokens are already the client's
    assert original["messages"] == [{"role": "user", "content": "hi"}]  # untouched
    assert "continue_final_message" not in original


def test_a_prefill_extends_a_message_the_client_was_continuing() -> None:
    original = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Yes,"}],
        "continue_final_message": True,
        "add_generation_prompt": False,
        "max_completion_tokens": 2,
    }
    resumed = prefill_payload(original, delivered(" a", " b", " c"))
    assert resumed["messages"][-1] == {"role": "assistant", "content": "Yes, a b c"}
    assert len(resumed["messages"]) == 2
    assert resumed["max_completion_tokens"] == 1  # never below one


def test_regenerating_holds_back_the_delivered_text_then_streams_on() -> None:
    transcript = delivered(" the", " river")
    splice = Splice(transcript, prefill=False)
    out = splice.rewrite(events(chunk("", role=True), chunk(" the"), chunk(" riv")))
    assert out == b""  # nothing new yet, and no second role chunk
    out = splice.rewrite(events(chunk("er runs"), chunk(" on", finish="length")))
    sent = contents(out)
    assert [c["choices"][0]["delta"]["content"] for c in sent] == [" runs", " on"]
    assert {c["id"] for c in sent} == {"chatcmpl-orig"}
    assert {c["created"] for c in sent} == {1}
    assert sent[-1]["choices"][0]["finish_reason"] == "length"
    assert transcript.text == " the river runs on"


def test_regenerated_text_that_departs_from_the_delivered_text_diverges() -> None:
    splice = Splice(delivered(" the", " river"), prefill=False)
    with pytest.raises(Diverged, match="departs"):
        splice.rewrite(events(chunk(" the"), chunk(" sea")))


def test_a_regenerated_answer_that_ends_short_diverges() -> None:
    splice = Splice(delivered(" the", " river"), prefill=False)
    with pytest.raises(Diverged, match="ended before"):
        splice.rewrite(events(chunk(" the", finish="stop")))
    splice = Splice(delivered(" the"), prefill=False)
    with pytest.raises(Diverged, match="ended before"):
        splice.rewrite(b"data: [DONE]\n\n")


def test_a_prefilled_continuation_is_all_new_text_and_usage_is_the_whole_answer() -> None:
    splice = Splice(delivered(" a", " b"), prefill=True)
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    out = splice.rewrite(
        events(chunk("", role=True), chunk(" c"), {"id": "x", "choices": [], "usage": usage})
        + b"data: [DONE]\n\n"
    )
    sent = contents(out)
    assert [c["choices"][0]["delta"] for c in sent if c["choices"]] == [{"content": " c"}]
    # The two prefilled tokens were counted as prompt upstream; they are the answer's.
    assert sent[-1]["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert out.endswith(b"data: [DONE]\n\n")
    assert splice.adjust_usage(usage) == sent[-1]["usage"]


def test_regenerated_usage_is_the_new_backends_own() -> None:
    splice = Splice(delivered(" a"), prefill=False)
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert splice.adjust_usage(usage) == usage


def test_completions_are_spliced_on_their_text() -> None:
    transcript = Transcript(chat=False, max_chars=100)
    transcript.record({"id": "cmpl-1", "created": 1, "choices": [{"index": 0, "text": " x y"}]})
    splice = Splice(transcript, prefill=False)
    out = splice.rewrite(events({"id": "cmpl-2", "choices": [{"index": 0, "text": " x y z"}]}))
    assert [c["choices"][0]["text"] for c in contents(out)] == [" z"]
