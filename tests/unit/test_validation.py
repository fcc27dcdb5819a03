from __future__ import annotations

import orjson
import pytest

from gateway.errors import InvalidRequest
from gateway.wire.validation import Endpoint, ProxyRequest, measure_prompt, parse_request


def parse(endpoint: Endpoint, payload: object) -> ProxyRequest:
    return parse_request(endpoint, orjson.dumps(payload))


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_valid_chat_keeps_unknown_fields() -> None:
    request = parse_request(Endpoint.CHAT, orjson.dumps({**CHAT, "seed": 7, "logit_bias": {}}))
    assert request.model == "m" and not request.stream
    assert request.payload["seed"] == 7


def test_stream_and_usage_flags() -> None:
    request = parse_request(
        Endpoint.CHAT,
        orjson.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}}),
    )
    assert request.stream and request.client_wants_usage


def test_invalid_json_is_400() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(Endpoint.CHAT, b"{not json")
    assert caught.value.status == 400 and caught.value.code == "invalid_json"
    with pytest.raises(InvalidRequest):
        parse_request(Endpoint.CHAT, b"[1, 2]")


@pytest.mark.parametrize(
    ("endpoint", "payload", "param"),
    [
        (Endpoint.CHAT, {"messages": CHAT["messages"]}, "model"),
        (Endpoint.CHAT, {"model": ""}, "model"),
        (Endpoint.CHAT, {"model": "m"}, "messages"),
        (Endpoint.CHAT, {"model": "m", "messages": []}, "messages"),
        (Endpoint.CHAT, {"model": "m", "messages": ["hi"]}, "messages[0]"),
        (Endpoint.CHAT, {"model": "m", "messages": [{"role": "robot"}]}, "messages[0].role"),
        (
            Endpoint.CHAT,
            {"model": "m", "messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
        ),
        (Endpoint.CHAT, {**CHAT, "stream": "yes"}, "stream"),
        (Endpoint.CHAT, {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
        (Endpoint.CHAT, {**CHAT, "max_tokens": 0}, "max_tokens"),
        (Endpoint.CHAT, {**CHAT, "max_tokens": True}, "max_tokens"),
        (Endpoint.CHAT, {**CHAT, "temperature": 3}, "temperature"),
        (Endpoint.COMPLETIONS, {"model": "m"}, "prompt"),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": []}, "prompt"),
        (Endpoint.EMBEDDINGS, {"model": "m", "input": 3}, "input"),
    ],
)
def test_each_bad_field_is_named(endpoint: Endpoint, payload: object, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(endpoint, payload)
    assert caught.value.param == param
    assert param in caught.value.message


# Nesting: orjson parses 1024 levels, the router re-serialises at most 254.


def nested(depth: int) -> bytes:
    """A chat request whose `extra` field makes the whole body `depth` levels deep."""
    inner = b"[" * (depth - 1) + b"]" * (depth - 1)
    return (
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "extra": ' + inner + b"}"
    )


def test_json_nested_deeper_than_the_router_can_forward_is_400_invalid_json() -> None:
    parse_request(Endpoint.CHAT, nested(254))  # the deepest that re-serialises
    for depth in (255, 300, 1000):
        with pytest.raises(InvalidRequest) as caught:
            parse_request(Endpoint.CHAT, nested(depth))
        assert caught.value.code == "invalid_json"
        assert "nested too deeply" in caught.value.message and "254" in caught.value.message
    # Deeper than orjson parses at all: its own error, the same code.
    with pytest.raises(InvalidRequest) as caught:
        parse_request(Endpoint.CHAT, nested(2000))
    assert caught.value.code == "invalid_json"


def test_many_brackets_without_depth_pass() -> None:
    # More brackets than the depth limit, none deep: the exact check clears it.
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"}]}] * 400
    request = parse(Endpoint.CHAT, {"model": "m", "messages": messages})
    assert len(request.payload["messages"]) == 400


# Type confusion: every field the gateway reads is checked before anything uses it.


@pytest.mark.parametrize(
    ("endpoint", "payload", "param"),
    [
        (Endpoint.CHAT, {"model": "m", "messages": [{"role": {}}]}, "messages[0].role"),
        (Endpoint.CHAT, {"model": "m", "messages": [{"role": ["user"]}]}, "messages[0].role"),
        (Endpoint.CHAT, {"model": "m", "messages": [{"content": "hi"}]}, "messages[0].role"),
        (Endpoint.CHAT, {"model": {"a": 1}, "messages": CHAT["messages"]}, "model"),
        (Endpoint.CHAT, {"model": ["m"], "messages": CHAT["messages"]}, "model"),
        (Endpoint.CHAT, {"model": "m", "messages": {"role": "user"}}, "messages"),
        (Endpoint.CHAT, {**CHAT, "stream": {}}, "stream"),
        (Endpoint.CHAT, {**CHAT, "stream": True, "stream_options": []}, "stream_options"),
        (
            Endpoint.CHAT,
            {**CHAT, "stream": True, "stream_options": {"include_usage": {}}},
            "stream_options.include_usage",
        ),
        (Endpoint.CHAT, {**CHAT, "n": {}}, "n"),
        (Endpoint.CHAT, {**CHAT, "n": [2]}, "n"),
        (Endpoint.CHAT, {**CHAT, "n": 2.5}, "n"),
        (Endpoint.CHAT, {**CHAT, "max_completion_tokens": "9"}, "max_completion_tokens"),
        (Endpoint.CHAT, {**CHAT, "user": {"id": 1}}, "user"),
        (Endpoint.CHAT, {**CHAT, "user": 7}, "user"),
        (
            Endpoint.CHAT,
            {"model": "m", "messages": [{"role": "user", "content": {"text": "hi"}}]},
            "messages[0].content",
        ),
        (
            Endpoint.CHAT,
            {"model": "m", "messages": [{"role": "user", "content": [7]}]},
            "messages[0].content[0]",
        ),
        (
            Endpoint.CHAT,
            {"model": "m", "messages": [{"role": "user", "content": [None]}]},
            "messages[0].content[0]",
        ),
        (
            Endpoint.CHAT,
            {
                "model": "m",
                "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            },
            "messages[0].content[0].text",
        ),
        (
            Endpoint.CHAT,
            {"model": "m", "messages": [{"role": "user", "content": "a", "name": {}}]},
            "messages[0].name",
        ),
        (
            Endpoint.CHAT,
            {"model": "m", "messages": [{"role": "assistant", "reasoning_content": []}]},
            "messages[0].reasoning_content",
        ),
        (
            Endpoint.CHAT,
            {"model": "m", "messages": [{"role": "assistant", "tool_calls": {"id": "x"}}]},
            "messages[0].tool_calls",
        ),
        (
            Endpoint.CHAT,
            {"model": "m", "messages": [{"role": "assistant", "tool_calls": ["call"]}]},
            "messages[0].tool_calls[0]",
        ),
        (
            Endpoint.CHAT,
            {"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": "f"}]}]},
            "messages[0].tool_calls[0].function",
        ),
        (
            Endpoint.CHAT,
            {
                "model": "m",
                "messages": [
                    {"role": "assistant", "tool_calls": [{"function": {"arguments": {"a": 1}}}]}
                ],
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            Endpoint.CHAT,
            {"model": "m", "messages": [{"role": "assistant", "function_call": "f"}]},
            "messages[0].function_call",
        ),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": {"text": "hi"}}, "prompt"),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": ["a", 1]}, "prompt[1]"),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": [1, "secret"]}, "prompt[1]"),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": [1, 2.5]}, "prompt[1]"),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": [[1], []]}, "prompt[1]"),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": [[1], ["a"]]}, "prompt[1]"),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": [True]}, "prompt[0]"),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": [None, None]}, "prompt[0]"),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": "a", "suffix": ["b"]}, "suffix"),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": "a", "best_of": 0}, "best_of"),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": "a", "best_of": "2"}, "best_of"),
        (Endpoint.EMBEDDINGS, {"model": "m", "input": [{"text": "a"}]}, "input[0]"),
        (Endpoint.EMBEDDINGS, {"model": "m", "input": ["a", ["b"]]}, "input[1]"),
    ],
)
def test_a_field_of_the_wrong_type_is_400_naming_it(
    endpoint: Endpoint, payload: object, param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(endpoint, payload)
    assert caught.value.status == 400 and caught.value.code == "invalid_value"
    assert caught.value.param == param
    assert f"'{param}'" in caught.value.message


# What counts as prompt text: every shape the upstream renders.


def texts_of(endpoint: Endpoint, payload: dict[str, object]) -> list[str]:
    return measure_prompt(endpoint, payload).all_texts()


def test_every_text_shape_of_a_chat_message_is_measured() -> None:
    content = [
        "bare",
        {"type": "text", "text": "t"},
        {"type": "input_text", "text": "it"},
        {"type": "output_text", "text": "ot"},
        {"type": "refusal", "refusal": "r"},
        {"type": "thinking", "thinking": "th", "signature": "sig"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "mystery", "payload": {"deep": "m"}},
    ]
    messages = [
        {"role": "system", "content": "sys", "name": "nm"},
        {"role": "user", "content": content},
        {
            "role": "assistant",
            "content": None,
            "reasoning": "why",
            "reasoning_content": "because",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "fn", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "out"},
        {"role": "assistant", "function_call": {"name": "old", "arguments": '{"a":1}'}},
        {"role": "user", "content": "x", "custom_field": {"k": "v"}},
    ]
    tools = [{"type": "function", "function": {"name": "tool", "description": "desc"}}]
    prompt = measure_prompt(
        Endpoint.CHAT,
        {"messages": messages, "tools": tools, "documents": [{"title": "doc"}]},
    )
    texts = set(prompt.all_texts())
    for text in ("sys", "nm", "bare", "t", "it", "ot", "r", "th", "m", "why", "because"):
        assert text in texts, text
    for text in ("fn", "{}", "c1", "out", "old", '{"a":1}', "x", "custom_field", "v"):
        assert text in texts, text
    for text in ("tool", "desc", "doc"):
        assert text in texts, text
    # Media are media, not text: their data never counts as prompt text.
    assert "data:image/png;base64,AAAA" not in texts and "AAAA" not in texts
    assert prompt.media == 2 and prompt.messages == 6 and prompt.opaque is None


def test_completion_and_embedding_shapes_are_measured() -> None:
    prompt = measure_prompt(Endpoint.COMPLETIONS, {"prompt": ["a", "b"], "suffix": "s"})
    assert prompt.all_texts() == ["a", "b", "s"] and prompt.token_ids == 0
    assert measure_prompt(Endpoint.COMPLETIONS, {"prompt": [1, 2, 3]}).token_ids == 3
    assert measure_prompt(Endpoint.COMPLETIONS, {"prompt": [[1, 2], [3]]}).token_ids == 3
    assert measure_prompt(Endpoint.EMBEDDINGS, {"input": "e"}).all_texts() == ["e"]
    assert measure_prompt(Endpoint.EMBEDDINGS, {"input": [[1], [2, 3]]}).token_ids == 3


def test_fields_no_text_check_can_see_into_are_noted() -> None:
    chat = {**CHAT, "chat_template": "{{ 'x' }}"}
    assert measure_prompt(Endpoint.CHAT, chat).opaque == "chat_template"
    completion = {"prompt": "a", "prompt_embeds": "AAAA"}
    assert measure_prompt(Endpoint.COMPLETIONS, completion).opaque == "prompt_embeds"
    assert measure_prompt(Endpoint.CHAT, CHAT).opaque is None


def test_parse_request_keeps_the_measure() -> None:
    request = parse(Endpoint.CHAT, {**CHAT, "tools": [{"function": {"name": "f"}}]})
    assert request.prompt.all_texts() == ["hi", "function", "name", "f"]
