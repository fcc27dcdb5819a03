from __future__ import annotations

import orjson
import pytest

from gateway.errors import InvalidRequest
from gateway.validation import Endpoint, parse_request


def parse(endpoint: Endpoint, payload: object) -> object:
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
