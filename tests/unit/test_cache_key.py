"""The response cache's key: every field that may change the answer changes the key."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.wire.cachekey import (
    IGNORED_FIELDS,
    cache_key,
    directives,
    is_deterministic,
    tag,
)

BASE: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "hello"}],
    "temperature": 0,
    "max_tokens": 16,
}

# Each OpenAI and vLLM sampling or output field, with a value to set (or change) it to.
FIELDS: list[tuple[str, Any]] = [
    ("temperature", 0.7),
    ("top_p", 0.9),
    ("top_k", 40),
    ("min_p", 0.05),
    ("max_tokens", 17),
    ("max_completion_tokens", 17),
    ("stop", ["\n"]),
    ("stop_token_ids", [2]),
    ("seed", 1),
    ("n", 2),
    ("best_of", 2),
    ("presence_penalty", 0.5),
    ("frequency_penalty", 0.5),
    ("repetition_penalty", 1.1),
    ("length_penalty", 0.9),
    ("logit_bias", {"50256": -100}),
    ("logprobs", True),
    ("top_logprobs", 3),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("parallel_tool_calls", False),
    ("response_format", {"type": "json_object"}),
    ("guided_json", {"type": "object"}),
    ("guided_regex", "[a-z]+"),
    ("guided_choice", ["a", "b"]),
    ("guided_grammar", "root ::= 'a'"),
    ("structured_outputs", {"choice": ["a"]}),
    ("ignore_eos", True),
    ("min_tokens", 2),
    ("skip_special_tokens", False),
    ("spaces_between_special_tokens", False),
    ("include_stop_str_in_output", True),
    ("echo", True),
    ("add_generation_prompt", False),
    ("continue_final_message", True),
    ("chat_template", "{{ messages }}"),
    ("chat_template_kwargs", {"enable_thinking": False}),
    ("reasoning_effort", "low"),
    ("modalities", ["text"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("service_tier", "flex"),
    ("suffix", "!"),
    ("truncate_prompt_tokens", 8),
    ("prompt_logprobs", 1),
    ("use_beam_search", True),
    ("messages", [{"role": "user", "content": "hello!"}]),
    ("a_parameter_nobody_has_heard_of", 1),  # a deny-list: unknown fields count too
]


def key(payload: dict[str, Any], *, scope: str = "key:alice", route: str = "m") -> str:
    return cache_key("/v1/chat/completions", route, scope, payload)


@pytest.mark.parametrize(("name", "value"), FIELDS, ids=[name for name, _ in FIELDS])
def test_each_field_changes_the_key(name: str, value: Any) -> None:
    changed = {**BASE, name: value}
    assert changed != BASE
    assert key(changed) != key(BASE)


def test_fields_that_do_not_change_the_answer_share_the_key() -> None:
    same = {
        **BASE,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "someone",
        "metadata": {"a": "b"},
        "store": True,
        "model": "an-alias",
    }
    assert key(same) == key(BASE)
    assert {"stream", "stream_options", "user", "metadata", "store", "model"} == IGNORED_FIELDS


def test_field_order_does_not_matter_but_nested_values_do() -> None:
    reordered = dict(reversed(list(BASE.items())))
    assert key(reordered) == key(BASE)
    nested = {**BASE, "response_format": {"type": "json_schema", "json_schema": {"a": 1}}}
    other = {**BASE, "response_format": {"type": "json_schema", "json_schema": {"a": 2}}}
    assert key(nested) != key(other)


def test_scope_route_and_endpoint_are_part_of_the_key() -> None:
    assert key(BASE, scope="key:alice") != key(BASE, scope="key:bob")
    assert key(BASE, scope="key:alice") != key(BASE, scope="global")
    assert key(BASE, route="m") != key(BASE, route="n")
    assert cache_key("/v1/completions", "m", "global", BASE) != key(BASE, scope="global")


def test_the_key_is_fixed_length_and_holds_no_prompt() -> None:
    long_prompt = {**BASE, "messages": [{"role": "user", "content": "secret " * 10_000}]}
    short, long = key(BASE), key(long_prompt)
    assert len(short) == len(long) == 16 + 1 + 16 + 1 + 64
    assert "secret" not in long and "alice" not in long
    assert long.startswith(f"{tag('m')}:{tag('key:alice')}:")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0}, True),
        ({"seed": 7, "temperature": 1.0}, True),
        ({}, False),  # the default temperature samples
        ({"temperature": 0.2}, False),
        ({"seed": "7"}, False),
        ({"temperature": False}, False),
    ],
)
def test_deterministic_requests(payload: dict[str, Any], expected: bool) -> None:
    assert is_deterministic(payload) is expected


def test_cache_control_directives() -> None:
    assert directives([]) == (False, False)
    assert directives([(b"cache-control", b"no-cache")]) == (True, False)
    assert directives([(b"cache-control", b"No-Store, max-age=0")]) == (False, True)
    assert directives([(b"x-other", b"no-store")]) == (False, False)
