"""gateway.wire.assemble: a stream's chunks into the non-streaming answer, field by field."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.wire.assemble import Assembler, Incomplete, can_assemble, streaming_payload

USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def chat_chunk(choices: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": choices,
        **top,
    }


def text_chunk(choices: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "model": "m",
        "choices": choices,
        **top,
    }


def delta(content: str | None = None, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": {**fields}, "logprobs": None}
    if content is not None:
        choice["delta"]["content"] = content
    choice["finish_reason"] = finish
    return choice


def assembled(chunks: list[dict[str, Any]], *, chat: bool = True, usage: Any = USAGE) -> Any:
    assembler = Assembler(chat=chat)
    for chunk in chunks:
        assembler.record(chunk)
    return assembler.answer(usage)


def test_chat_answer_as_vllm_streams_it() -> None:
    # vLLM: a role chunk, one chunk per token, the last with finish_reason and stop_reason.
    answer = assembled(
        [
            chat_chunk([delta("", role="assistant")], prompt_token_ids=None),
            chat_chunk([delta(" Hello")]),
            chat_chunk([delta(" world")]),
            chat_chunk([{**delta("!", "stop"), "stop_reason": None, "token_ids": None}]),
        ]
    )
    assert answer == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " Hello world!"},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
                "token_ids": None,
            }
        ],
        "usage": USAGE,
        "prompt_token_ids": None,
    }


def test_stop_reason_and_top_level_fields_keep_their_real_values() -> None:
    answer = assembled(
        [
            chat_chunk(
                [delta("", role="assistant", refusal=None)],
                system_fingerprint=None,
                service_tier="default",
            ),
            chat_chunk([delta("a")], system_fingerprint="fp_1", service_tier="default"),
            chat_chunk(
                [{**delta("", "stop"), "stop_reason": "END"}],
                system_fingerprint="fp_1",
                service_tier="default",
            ),
        ]
    )
    assert answer["system_fingerprint"] == "fp_1"  # null in the first chunk, filled in later
    assert answer["service_tier"] == "default"
    choice = answer["choices"][0]
    assert choice["stop_reason"] == "END"
    assert choice["message"] == {"role": "assistant", "content": "a", "refusal": None}


def test_completions_text_is_concatenated() -> None:
    def piece(text: str, finish: str | None = None) -> dict[str, Any]:
        return text_chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}])

    answer = assembled([piece(" one"), piece(" two"), piece(" three", "length")], chat=False)
    assert answer["object"] == "text_completion"
    assert answer["choices"] == [
        {"index": 0, "text": " one two three", "logprobs": None, "finish_reason": "length"}
    ]
    assert answer["usage"] == USAGE


def test_two_choices_interleaved_come_out_in_index_order() -> None:
    def choice(index: int, content: str, finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": {"content": content}, "finish_reason": finish}

    answer = assembled(
        [
            chat_chunk([{"index": 1, "delta": {"role": "assistant", "content": ""}}]),
            chat_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
            chat_chunk([choice(1, "B1")]),
            chat_chunk([choice(0, "A1")]),
            chat_chunk([choice(0, "A2", "stop")]),
            chat_chunk([choice(1, "B2", "length")]),
        ]
    )
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in answer["choices"]] == ["A1A2", "B1B2"]
    assert [c["finish_reason"] for c in answer["choices"]] == ["stop", "length"]


def test_completions_batch_choices_carry_their_index() -> None:
    chunks = [
        text_chunk([{"index": 1, "text": "x", "finish_reason": None}]),
        text_chunk([{"index": 0, "text": "y", "finish_reason": "stop"}]),
        text_chunk([{"index": 1, "text": "z", "finish_reason": "stop"}]),
    ]
    answer = assembled(chunks, chat=False)
    assert [(c["index"], c["text"]) for c in answer["choices"]] == [(0, "y"), (1, "xz")]


def test_tool_calls_merge_by_index() -> None:
    # OpenAI's shape: id, type and name once, then the arguments in pieces; two calls.
    def calls(*items: dict[str, Any]) -> dict[str, Any]:
        return {"index": 0, "delta": {"tool_calls": list(items)}, "finish_reason": None}

    answer = assembled(
        [
            chat_chunk([{"index": 0, "delta": {"role": "assistant", "content": None}}]),
            chat_chunk(
                [
                    calls(
                        {
                            "index": 0,
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    )
                ]
            ),
            chat_chunk([calls({"index": 0, "function": {"arguments": '{"city": '}})]),
            chat_chunk(
                [
                    calls(
                        {
                            "index": 1,
                            "id": "call_b",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": "{}"},
                        }
                    )
                ]
            ),
            chat_chunk([calls({"index": 0, "function": {"arguments": '"Paris"}'}})]),
            chat_chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
        ]
    )
    message = answer["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_time", "arguments": "{}"},
            },
        ],
    }
    assert answer["choices"][0]["finish_reason"] == "tool_calls"


def test_vllm_tool_call_beside_an_empty_content_has_null_content() -> None:
    answer = assembled(
        [
            chat_chunk([delta("", role="assistant")]),
            chat_chunk(
                [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [
                                {
                                    "id": "chatcmpl-tool-1",
                                    "type": "function",
                                    "index": 0,
                                    "function": {"name": "f", "arguments": '{"x": 1}'},
                                }
                            ]
                        },
                        "finish_reason": None,
                    }
                ]
            ),
            chat_chunk([delta("", "tool_calls")]),
        ]
    )
    message = answer["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}


def test_reasoning_is_concatenated_beside_the_content() -> None:
    answer = assembled(
        [
            chat_chunk([delta(None, role="assistant", reasoning_content="Let me ")]),
            chat_chunk([delta(None, reasoning_content="think.")]),
            chat_chunk([delta("Answer", reasoning_content=None)]),
            chat_chunk([delta(".", "stop")]),
        ]
    )
    message = answer["choices"][0]["message"]
    assert message["reasoning_content"] == "Let me think."
    assert message["content"] == "Answer."


def test_role_repeated_in_every_delta_is_not_concatenated() -> None:
    answer = assembled(
        [
            chat_chunk([delta("a", role="assistant")]),
            chat_chunk([delta("b", "stop", role="assistant")]),
        ]
    )
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "ab"}


def test_chat_logprobs_lists_are_concatenated() -> None:
    def token(text: str) -> dict[str, Any]:
        return {"token": text, "logprob": -0.5, "bytes": list(text.encode()), "top_logprobs": []}

    def piece(text: str, finish: str | None = None) -> dict[str, Any]:
        return {
            "index": 0,
            "delta": {"content": text},
            "logprobs": {"content": [token(text)]},
            "finish_reason": finish,
        }

    answer = assembled(
        [
            chat_chunk([delta("", role="assistant")]),
            chat_chunk([piece("Hi")]),
            chat_chunk([piece(" there", "length")]),
        ]
    )
    assert answer["choices"][0]["logprobs"] == {"content": [token("Hi"), token(" there")]}


def test_completions_logprobs_lists_are_concatenated() -> None:
    def piece(text: str, offset: int, finish: str | None = None) -> dict[str, Any]:
        logprobs = {
            "tokens": [text],
            "token_logprobs": [-1.0],
            "top_logprobs": [{text: -1.0}],
            "text_offset": [offset],
        }
        return text_chunk(
            [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]
        )

    answer = assembled([piece("a", 0), piece("b", 1), piece("c", 2, "length")], chat=False)
    assert answer["choices"][0]["logprobs"] == {
        "tokens": ["a", "b", "c"],
        "token_logprobs": [-1.0, -1.0, -1.0],
        "top_logprobs": [{"a": -1.0}, {"b": -1.0}, {"c": -1.0}],
        "text_offset": [0, 1, 2],
    }


def test_vllm_token_ids_are_concatenated() -> None:
    answer = assembled(
        [
            chat_chunk([{**delta("a"), "token_ids": [11]}]),
            chat_chunk([{**delta("b", "stop"), "token_ids": [12, 13]}]),
        ]
    )
    assert answer["choices"][0]["token_ids"] == [11, 12, 13]


def test_usage_is_the_final_usage_chunks() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "extra": {"x": 1}}
    answer = assembled([chat_chunk([delta("a", "stop")])], usage=usage)
    assert answer["usage"] == usage


@pytest.mark.parametrize(
    ("chunks", "usage", "reason"),
    [
        ([], USAGE, "without a choice"),
        ([chat_chunk([])], USAGE, "without a choice"),
        ([chat_chunk([delta("a")])], USAGE, "before choice 0 finished"),
        (
            [
                chat_chunk([{**delta("a"), "index": 0}]),
                chat_chunk([{**delta("b"), "index": 1}]),
                chat_chunk([{**delta("", "stop"), "index": 0}]),
            ],
            USAGE,
            "before choice 1 finished",
        ),
        ([chat_chunk([delta("a", "stop")])], None, "without its usage"),
        ([chat_chunk([delta("a", "stop")])], [1], "without its usage"),
    ],
)
def test_an_unfinished_stream_is_no_answer(
    chunks: list[dict[str, Any]], usage: Any, reason: str
) -> None:
    with pytest.raises(Incomplete, match=reason):
        assembled(chunks, usage=usage)


def test_malformed_choices_are_skipped_not_fatal() -> None:
    answer = assembled(
        [
            chat_chunk(["not a choice", {"index": "0", "delta": {"content": "x"}}]),  # type: ignore[list-item]
            {"choices": "nope"},
            chat_chunk([delta("ok", "stop")]),
        ]
    )
    assert answer["choices"][0]["message"]["content"] == "ok"


def test_chunks_are_not_changed_by_assembly() -> None:
    first = chat_chunk([{**delta("a"), "token_ids": [1]}])
    second = chat_chunk([{**delta("b", "stop"), "token_ids": [2]}])
    assembled([first, second])
    assert first["choices"][0]["token_ids"] == [1]
    assert first["choices"][0]["delta"] == {"content": "a"}


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"model": "m", "messages": []}, True),
        ({"n": 2}, True),
        ({"n": 2, "best_of": 2}, True),
        ({"n": None, "best_of": 1}, True),
        ({"best_of": 3}, False),  # vLLM answers best_of > n whole, never streamed
        ({"n": 2, "best_of": 4}, False),
        ({"use_beam_search": True}, False),
        ({"use_beam_search": False}, True),
        ({"prompt_logprobs": 1}, False),  # vLLM refuses it with stream: true
        ({"prompt_logprobs": None}, True),
    ],
)
def test_can_assemble(payload: dict[str, Any], expected: bool) -> None:
    assert can_assemble(payload) is expected


def test_streaming_payload_asks_for_usage_and_leaves_the_original() -> None:
    original = {"model": "m", "messages": [], "stream": False}
    streamed = streaming_payload(original)
    assert streamed["stream"] is True
    assert streamed["stream_options"] == {"include_usage": True}
    assert original == {"model": "m", "messages": [], "stream": False}
