from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.errors import InvalidRequest
from gateway.validation import Endpoint, parse_request
from policies.guardrails import (
    Guardrails,
    KeyGuardrails,
    check_pattern,
    prompt_texts,
    utf8_size,
)


def chat(**body: Any) -> Any:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    return parse_request(Endpoint.CHAT, orjson.dumps(payload))


def refused(guardrails: Guardrails, request: Any, key: KeyGuardrails | None) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        guardrails.check(request, key)
    assert caught.value.status == 400
    return caught.value


def test_nothing_configured_is_inactive_and_passes() -> None:
    guardrails = Guardrails()
    assert not guardrails.active
    request = chat(max_tokens=10**6)
    guardrails.check(request, None)
    assert request.payload["max_tokens"] == 10**6


def test_max_tokens_over_the_cap_is_refused_naming_the_param() -> None:
    guardrails = Guardrails()
    key = KeyGuardrails(max_tokens=100)
    for param in ("max_tokens", "max_completion_tokens"):
        error = refused(guardrails, chat(**{param: 101}), key)
        assert (error.code, error.param) == ("max_tokens_exceeded", param)
        assert "at most 100" in error.message
    guardrails.check(chat(max_tokens=100), key)
    # Both given: each must be within the cap.
    refused(guardrails, chat(max_tokens=10, max_completion_tokens=200), key)


def test_a_request_naming_no_limit_gets_the_cap() -> None:
    key = KeyGuardrails(max_tokens=64)
    request = chat()
    Guardrails().check(request, key)
    assert request.payload["max_completion_tokens"] == 64
    assert "max_tokens" not in request.payload
    completion = parse_request(Endpoint.COMPLETIONS, b'{"model": "m", "prompt": "hi"}')
    Guardrails().check(completion, key)
    assert completion.payload["max_tokens"] == 64
    embedding = parse_request(Endpoint.EMBEDDINGS, b'{"model": "m", "input": "hi"}')
    Guardrails().check(embedding, key)
    assert "max_tokens" not in embedding.payload


def test_input_size_counts_utf8_bytes_of_the_text_only() -> None:
    guardrails = Guardrails(max_input_bytes=10)
    assert guardrails.active
    guardrails.check(chat(messages=[{"role": "user", "content": "0123456789"}]), None)
    error = refused(guardrails, chat(messages=[{"role": "user", "content": "é" * 6}]), None)
    assert (error.code, error.param) == ("input_too_large", "messages")
    assert "12 bytes" in error.message and "the gateway allows at most 10" in error.message
    # Across messages and text parts; image parts and names are not prompt text.
    messages = [
        {"role": "system", "content": "abcde", "name": "x" * 100},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "abcde"},
                {"type": "image_url", "image_url": {"url": "data:" + "A" * 1000}},
            ],
        },
    ]
    guardrails.check(chat(messages=messages), None)
    messages[0]["content"] = "abcdef"
    refused(guardrails, chat(messages=messages), None)


def test_a_keys_own_input_cap_overrides_the_global_one_either_way() -> None:
    guardrails = Guardrails(max_input_bytes=10)
    text = chat(messages=[{"role": "user", "content": "x" * 20}])
    guardrails.check(text, KeyGuardrails(max_input_bytes=20))
    error = refused(guardrails, chat(messages=[{"role": "user", "content": "x" * 5}]),
                    KeyGuardrails(max_input_bytes=4))  # fmt: skip
    assert "this API key allows at most 4" in error.message


def test_completion_and_embedding_inputs() -> None:
    guardrails = Guardrails(max_input_bytes=4)
    prompt = parse_request(Endpoint.COMPLETIONS, b'{"model": "m", "prompt": ["ab", "cde"]}')
    assert refused(guardrails, prompt, None).param == "prompt"
    tokens = parse_request(Endpoint.COMPLETIONS, b'{"model": "m", "prompt": [1, 2, 3, 4, 5, 6]}')
    guardrails.check(tokens, None)  # token ids are not text
    embedding = parse_request(Endpoint.EMBEDDINGS, b'{"model": "m", "input": "abcde"}')
    assert refused(guardrails, embedding, None).param == "input"


def test_deny_patterns_search_the_prompt_text_and_name_the_pattern() -> None:
    guardrails = Guardrails(deny_patterns=["(?i)drop\\s+table", "ssn-\\d{3}", "(a)\\1"])
    error = refused(
        guardrails, chat(messages=[{"role": "user", "content": "DROP   TABLE x"}]), None
    )
    assert (error.code, error.param) == ("content_policy_violation", "messages")
    assert "deny pattern 0" in error.message
    assert "DROP" not in error.message  # never the text it matched
    parts = [{"type": "text", "text": "my ssn-123"}]
    assert "deny pattern 1" in refused(guardrails, chat(messages=[
        {"role": "user", "content": parts}]), None).message  # fmt: skip
    assert "deny pattern 2" in refused(guardrails, chat(messages=[
        {"role": "user", "content": "baab"}]), None).message  # fmt: skip
    guardrails.check(chat(messages=[{"role": "user", "content": "abab, ssn-12"}]), None)
    # Only the prompt: not the user field, not the model name.
    guardrails.check(chat(user="drop table"), None)


def test_texts_are_searched_as_one() -> None:
    guardrails = Guardrails(["x", "(?i)y", "split\\s+phrase"])
    assert guardrails.denied(["no", "a Y"]) == 1
    assert guardrails.denied(["a split", "phrase"]) == 2  # over two messages: still found
    assert guardrails.denied([]) is None
    assert guardrails.denied(["nothing here"]) is None


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("", "must not be empty"),
        ("a(", "not a valid regular expression"),
        ("x" * 1001, "longer"),
        ("a*", "matches the empty string"),
    ],
)
def test_bad_patterns_are_explained(pattern: str, reason: str) -> None:
    problem = check_pattern(pattern)
    assert problem is not None and reason in problem
    assert check_pattern("(?i)ok+") is None


def test_prompt_texts_and_their_size() -> None:
    payload = {
        "messages": [
            {"role": "user", "content": "héllo"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]},
            {"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "text"}]},
            "not a message",
        ]
    }
    texts = list(prompt_texts(Endpoint.CHAT, payload))
    assert texts == ["héllo", "ok"]
    assert utf8_size(texts) == 8
