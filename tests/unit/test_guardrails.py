from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from pydantic import ValidationError

from gateway.config import DEFAULT_MAX_N, GuardrailsConfig, check_pattern
from gateway.edge.auth import KeyRing, hash_key
from gateway.errors import ConfigError, InvalidRequest
from gateway.wire.validation import Endpoint, measure_prompt, parse_request
from policies.guardrails import (
    Guardrails,
    KeyGuardrails,
    utf8_size,
)
from policies.limits import estimate_tokens


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
    capped = Guardrails().check(request, key)
    assert capped.payload["max_completion_tokens"] == 64
    assert "max_tokens" not in capped.payload
    assert "max_completion_tokens" not in request.payload  # the client's own is unchanged
    completion = parse_request(Endpoint.COMPLETIONS, b'{"model": "m", "prompt": "hi"}')
    assert Guardrails().check(completion, key).payload["max_tokens"] == 64
    embedding = parse_request(Endpoint.EMBEDDINGS, b'{"model": "m", "input": "hi"}')
    assert Guardrails().check(embedding, key) is embedding
    named = chat(max_tokens=10)
    assert Guardrails().check(named, key) is named  # within the cap: nothing to rewrite


def test_input_size_counts_utf8_bytes_of_the_text_only() -> None:
    guardrails = Guardrails(max_input_bytes=10)
    assert guardrails.active
    guardrails.check(chat(messages=[{"role": "user", "content": "0123456789"}]), None)
    error = refused(guardrails, chat(messages=[{"role": "user", "content": "é" * 6}]), None)
    assert (error.code, error.param) == ("input_too_large", "messages")
    assert "12 bytes" in error.message and "the gateway allows at most 10" in error.message
    # Across messages and text parts; image parts are not prompt text.
    messages = [
        {"role": "system", "content": "abcde"},
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
    # A name is rendered into the prompt: it counts.
    named = [{"role": "system", "content": "abcde", "name": "x" * 100}]
    refused(guardrails, chat(messages=named), None)


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
        ]
    }
    texts = measure_prompt(Endpoint.CHAT, payload).all_texts()
    # Strings inside tool calls (and other rendered JSON) come after the plain texts.
    assert texts == ["héllo", "ok", "id", "x"]
    assert utf8_size(texts) == 11


# Every shape the upstream renders into the prompt is read by the text checks (issue 9).

SECRET = "launch-code-4242"
BYPASSES: list[tuple[str, dict[str, Any]]] = [
    ("input_text part", {"content": [{"type": "input_text", "text": SECRET}]}),
    ("output_text part", {"content": [{"type": "output_text", "text": SECRET}]}),
    ("refusal part", {"content": [{"type": "refusal", "refusal": SECRET}]}),
    ("thinking part", {"content": [{"type": "thinking", "thinking": SECRET}]}),
    ("bare string part", {"content": ["hello", SECRET]}),
    ("unknown part type", {"content": [{"type": "novel", "body": {"text": SECRET}}]}),
    ("reasoning", {"role": "assistant", "reasoning": SECRET}),
    ("reasoning_content", {"role": "assistant", "reasoning_content": SECRET}),
    ("name", {"content": "hi", "name": SECRET}),
    (
        "tool call arguments",
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": SECRET}}
            ],
        },
    ),
    (
        "tool call name",
        {"role": "assistant", "tool_calls": [{"function": {"name": SECRET, "arguments": "{}"}}]},
    ),
    ("function_call", {"role": "assistant", "function_call": {"name": "f", "arguments": SECRET}}),
    ("tool result", {"role": "tool", "tool_call_id": "1", "content": SECRET}),
    ("an unknown message field", {"content": "hi", "prefix_text": SECRET}),
]


@pytest.mark.parametrize(("shape", "message"), BYPASSES, ids=[s for s, _ in BYPASSES])
def test_every_chat_shape_is_searched_and_counted(shape: str, message: dict[str, Any]) -> None:
    request = chat(messages=[{"role": "user", **message}])
    error = refused(Guardrails(deny_patterns=["launch-code-\\d+"]), request, None)
    assert error.code == "content_policy_violation", shape
    error = refused(Guardrails(max_input_bytes=len(SECRET) - 1), request, None)
    assert error.code == "input_too_large", shape


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": [{"type": "function", "function": {"name": "f", "description": SECRET}}]},
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {
                            "type": "object",
                            "properties": {SECRET: {"type": "string"}},
                        },
                    },
                }
            ]
        },
        {"functions": [{"name": "f", "description": SECRET}]},
        {"documents": [{"title": "t", "text": SECRET}]},
        {"chat_template_kwargs": {"persona": SECRET}},
    ],
)
def test_request_fields_rendered_with_the_messages_are_searched(extra: dict[str, Any]) -> None:
    error = refused(Guardrails(deny_patterns=["launch-code-\\d+"]), chat(**extra), None)
    assert (error.code, error.param) == ("content_policy_violation", "messages")


def test_every_completion_and_embedding_shape_is_searched() -> None:
    guardrails = Guardrails(deny_patterns=["launch-code-\\d+"])
    for endpoint, body in [
        (Endpoint.COMPLETIONS, {"prompt": SECRET}),
        (Endpoint.COMPLETIONS, {"prompt": ["fine", SECRET]}),
        (Endpoint.COMPLETIONS, {"prompt": "fine", "suffix": SECRET}),
        (Endpoint.EMBEDDINGS, {"input": SECRET}),
        (Endpoint.EMBEDDINGS, {"input": ["fine", SECRET]}),
    ]:
        request = parse_request(endpoint, orjson.dumps({"model": "m", **body}))
        assert refused(guardrails, request, None).code == "content_policy_violation", body


def test_fields_no_text_check_can_read_are_refused_only_while_one_is_in_force() -> None:
    template = chat(chat_template="{{ 'launch-' ~ 'code-' ~ 4242 }}")
    error = refused(Guardrails(deny_patterns=["launch-code-\\d+"]), template, None)
    assert (error.code, error.param) == ("unsupported_by_guardrails", "chat_template")
    error = refused(Guardrails(), template, KeyGuardrails(max_input_bytes=1000))
    assert error.param == "chat_template"
    embeds = parse_request(
        Endpoint.COMPLETIONS, orjson.dumps({"model": "m", "prompt": "", "prompt_embeds": "AA=="})
    )
    assert refused(Guardrails(max_input_bytes=10), embeds, None).param == "prompt_embeds"
    # No text check: nothing to bypass, so nothing is refused.
    Guardrails(max_n=DEFAULT_MAX_N).check(template, KeyGuardrails(max_tokens=10))
    Guardrails().check(embeds, None)


# The `n` cap.


def test_n_over_the_global_cap_is_refused_naming_it() -> None:
    guardrails = Guardrails(max_n=DEFAULT_MAX_N)
    assert guardrails.active  # the default config caps n: every request is looked at
    guardrails.check(chat(n=DEFAULT_MAX_N), None)
    error = refused(guardrails, chat(n=1000), None)
    assert (error.code, error.param) == ("integer_above_max_value", "n")
    assert "1000" in error.message and f"the gateway allows at most {DEFAULT_MAX_N}" in (
        error.message
    )
    completion = parse_request(
        Endpoint.COMPLETIONS, b'{"model": "m", "prompt": "hi", "n": 2, "best_of": 17}'
    )
    assert refused(guardrails, completion, None).param == "best_of"
    # Embeddings have no choices.
    embedding = parse_request(Endpoint.EMBEDDINGS, b'{"model": "m", "input": "hi", "n": 99}')
    guardrails.check(embedding, None)


def test_a_keys_own_n_cap_overrides_the_global_one_either_way() -> None:
    guardrails = Guardrails(max_n=4)
    guardrails.check(chat(n=8), KeyGuardrails(max_n=8))
    error = refused(guardrails, chat(n=3), KeyGuardrails(max_n=2))
    assert "this API key allows at most 2" in error.message
    # No global cap: the key's alone applies, and without one nothing does.
    refused(Guardrails(), chat(n=3), KeyGuardrails(max_n=2))
    Guardrails().check(chat(n=10**6), None)


# The token estimate reads the same measure.


def test_the_estimate_counts_every_choice_and_every_rendered_shape() -> None:
    request = chat(max_tokens=10, n=3)
    assert estimate_tokens(request.payload, "chat") == 4 + 1 + 10 * 3
    completion = parse_request(
        Endpoint.COMPLETIONS, b'{"model": "m", "prompt": "abcd", "max_tokens": 10, "best_of": 5}'
    )
    assert estimate_tokens(completion.payload, "/v1/completions") == 1 + 10 * 5
    # Tool-call arguments and reasoning count: 40 characters, 10 tokens more.
    message = {
        "role": "assistant",
        "reasoning": "r" * 20,
        "tool_calls": [{"function": {"arguments": "a" * 20}}],
    }
    plain = chat(max_tokens=1)
    rich = chat(max_tokens=1, messages=[{"role": "user", "content": "hi"}, message])
    assert estimate_tokens(rich.payload, "chat") >= estimate_tokens(plain.payload, "chat") + 14
    # Measured once by parse_request, passed in: the same answer without a second walk.
    for request in (plain, rich, completion):
        endpoint = request.endpoint.value
        assert estimate_tokens(request.payload, endpoint, prompt=request.prompt) == (
            estimate_tokens(request.payload, endpoint)
        )


def test_token_ids_are_refused_while_deny_patterns_apply() -> None:
    tokens = parse_request(Endpoint.COMPLETIONS, b'{"model": "m", "prompt": [[1, 2], [3]]}')
    error = refused(Guardrails(deny_patterns=["x"]), tokens, None)
    assert (error.code, error.param) == ("unsupported_by_guardrails", "prompt")
    embedding = parse_request(Endpoint.EMBEDDINGS, b'{"model": "m", "input": [1, 2]}')
    assert refused(Guardrails(deny_patterns=["x"]), embedding, None).param == "input"
    # The size cap alone does not read them: the body limit bounds them.
    Guardrails(max_input_bytes=1).check(tokens, None)


def test_messages_sent_for_embedding_are_searched_too() -> None:
    body = {"model": "m", "input": "fine", "messages": [{"role": "user", "content": SECRET}]}
    request = parse_request(Endpoint.EMBEDDINGS, orjson.dumps(body))
    assert refused(Guardrails(deny_patterns=["launch-code-\\d+"]), request, None).param == "input"


# The settings: the global cap in the config, a key's own in the keys file.


def test_the_global_n_cap_defaults_to_16_and_may_be_lifted() -> None:
    assert GuardrailsConfig().max_n == DEFAULT_MAX_N == 16
    assert GuardrailsConfig(max_n=None).max_n is None
    with pytest.raises(ValidationError):
        GuardrailsConfig(max_n=0)


def test_a_keys_max_n_reaches_its_caller(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    entries = [
        {"id": "a", "name": "a", "sha256": hash_key("sa"), "guardrails": {"max_n": 32}},
        {"id": "b", "name": "b", "sha256": hash_key("sb")},
    ]
    path.write_text(yaml.safe_dump({"keys": entries}))
    keys = KeyRing.load(path)
    assert keys.authenticate(b"Bearer sa").guardrails == KeyGuardrails(max_n=32)
    assert keys.authenticate(b"Bearer sb").guardrails is None
    entries[1]["guardrails"] = {"max_n": 0}
    path.write_text(yaml.safe_dump({"keys": entries}))
    with pytest.raises(ConfigError, match=r"guardrails\.max_n"):
        KeyRing.load(path)
