"""Hostile request bodies against a real gateway (issue 9): deep JSON, fields of the wrong type,
prompt text hidden in shapes the guardrails did not read, and `n` asking a thousand answers.

Each answer must be a 400 naming what was wrong, never a 500, and the gateway must log no
traceback for any of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from gateway.edge.auth import hash_key
from tests.servers import Gateway, Process, backend, gateway_config, start_gateway

PLAIN = "vg-test-plain-0123456789abcdefghij"
WIDE = "vg-test-wide-0123456789abcdefghijk"  # may ask up to 64 choices
NARROW = "vg-test-narrow-0123456789abcdefgh"  # may ask up to 2
SECRET = "launch-code-4242"
MESSAGES = [{"role": "user", "content": "hi"}]
TPM = 10**6


@pytest.fixture(scope="module")
def gateway(
    logs: Path, sims: tuple[Process, Process], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    keys_file = tmp_path_factory.mktemp("hardening-keys") / "keys.yaml"
    entries = [
        {"id": "plain", "name": "plain", "sha256": hash_key(PLAIN)},
        {
            "id": "wide",
            "name": "wide",
            "sha256": hash_key(WIDE),
            "limits": {"tpm": TPM},
            "guardrails": {"max_n": 64},
        },
        {"id": "narrow", "name": "narrow", "sha256": hash_key(NARROW), "guardrails": {"max_n": 2}},
    ]
    keys_file.write_text(yaml.safe_dump({"keys": entries}))
    first, second = sims
    config = gateway_config(
        [
            {"name": "tiny-llama", "backends": [backend("w1", first.url)]},
            {"name": "tiny-embed", "backends": [backend("e1", second.url)]},
        ]
    )
    config["keys"] = {"file": str(keys_file)}
    # The global n cap is left at its default (16): part of what is tested.
    config["guardrails"] = {"deny_patterns": ["launch-code-\\d+"], "max_input_bytes": 4096}
    process = start_gateway(logs, config)
    yield process
    process.stop()
    assert "Traceback" not in process.log()


def post(
    gateway: Gateway, path: str, body: bytes | dict[str, Any], key: str = PLAIN
) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(
        gateway.url + path,
        content=content,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=30,
    )


def chat(gateway: Gateway, key: str = PLAIN, **body: Any) -> httpx.Response:
    return post(gateway, "/v1/chat/completions", {"model": "tiny-llama", **body}, key)


def error_of(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# 1. Nesting deeper than the router can re-serialise.


def deep_chat(depth: int) -> bytes:
    inner = b"[" * (depth - 1) + b"]" * (depth - 1)
    return b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "x": ' + (
        inner + b"}"
    )


def test_deep_json_is_400_invalid_json_and_logs_no_traceback(gateway: Gateway) -> None:
    for depth in (255, 600, 1100):
        error = error_of(post(gateway, "/v1/chat/completions", deep_chat(depth)))
        assert error["code"] == "invalid_json", depth
    assert (
        "nested too deeply"
        in error_of(post(gateway, "/v1/chat/completions", deep_chat(300)))["message"]
    )
    # The deepest the router can forward still goes through.
    assert post(gateway, "/v1/chat/completions", deep_chat(254)).status_code == 200
    assert "Traceback" not in gateway.log()


# 2. Fields of the wrong type: a 400 naming the field, not a 500.


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": [{"role": {}, "content": "hi"}]}, "messages[0].role"),
        ("/v1/chat/completions", {"messages": [{"role": ["user"]}]}, "messages[0].role"),
        ("/v1/chat/completions", {"messages": MESSAGES, "n": {}}, "n"),
        ("/v1/chat/completions", {"messages": MESSAGES, "user": {"id": 1}}, "user"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": {}}]}]},
            "messages[0].content[0].text",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "assistant", "tool_calls": {"id": "x"}}]},
            "messages[0].tool_calls",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi", "name": ["n"]}]},
            "messages[0].name",
        ),
        ("/v1/completions", {"prompt": [1, "hidden"]}, "prompt[1]"),
        ("/v1/completions", {"prompt": "hi", "best_of": {}}, "best_of"),
        ("/v1/completions", {"prompt": "hi", "suffix": {}}, "suffix"),
    ],
)
def test_a_field_of_the_wrong_type_is_400_naming_it(
    gateway: Gateway, path: str, body: dict[str, Any], param: str
) -> None:
    error = error_of(post(gateway, path, {"model": "tiny-llama", **body}))
    assert (error["param"], error["code"]) == (param, "invalid_value")


def test_a_wrongly_typed_embedding_input_is_400(gateway: Gateway) -> None:
    body = {"model": "tiny-embed", "input": ["fine", ["hidden"]]}
    assert error_of(post(gateway, "/v1/embeddings", body))["param"] == "input[1]"


# 3. Every shape that reaches the model as text is read by the guardrails.

CHAT_SHAPES: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": [{"type": "input_text", "text": SECRET}]}]},
    {"messages": [{"role": "user", "content": [{"type": "output_text", "text": SECRET}]}]},
    {"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": SECRET}]}]},
    {"messages": [{"role": "user", "content": [{"type": "thinking", "thinking": SECRET}]}]},
    {"messages": [{"role": "user", "content": ["hello", SECRET]}]},
    {"messages": [*MESSAGES, {"role": "assistant", "content": "ok", "reasoning": SECRET}]},
    {"messages": [*MESSAGES, {"role": "assistant", "content": "", "reasoning_content": SECRET}]},
    {
        "messages": [
            *MESSAGES,
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "1", "type": "function", "function": {"name": "f", "arguments": SECRET}}
                ],
            },
        ]
    },
    {"messages": [{"role": "user", "content": "hi", "name": SECRET}]},
    {
        "messages": MESSAGES,
        "tools": [{"type": "function", "function": {"name": "f", "description": SECRET}}],
    },
]


@pytest.mark.parametrize("body", CHAT_SHAPES)
def test_text_in_every_chat_shape_is_searched(gateway: Gateway, body: dict[str, Any]) -> None:
    error = error_of(chat(gateway, **body))
    assert error["code"] == "content_policy_violation"
    assert SECRET not in error["message"]


def test_text_in_every_completion_and_embedding_shape_is_searched(gateway: Gateway) -> None:
    for path, body in [
        ("/v1/completions", {"model": "tiny-llama", "prompt": ["fine", SECRET]}),
        ("/v1/completions", {"model": "tiny-llama", "prompt": "fine", "suffix": SECRET}),
        ("/v1/embeddings", {"model": "tiny-embed", "input": ["fine", SECRET]}),
    ]:
        assert error_of(post(gateway, path, body))["code"] == "content_policy_violation", body


def test_hidden_text_counts_toward_the_input_cap(gateway: Gateway) -> None:
    call = {"function": {"name": "f", "arguments": "a" * 5000}}
    body = {"messages": [*MESSAGES, {"role": "assistant", "tool_calls": [call]}]}
    assert error_of(chat(gateway, **body))["code"] == "input_too_large"
    reasoning = {"role": "assistant", "content": "", "reasoning": "r" * 5000}
    assert error_of(chat(gateway, messages=[*MESSAGES, reasoning]))["code"] == "input_too_large"


def test_a_template_of_the_requests_own_is_refused_while_text_checks_apply(
    gateway: Gateway,
) -> None:
    error = error_of(chat(gateway, messages=MESSAGES, chat_template="{{ 'launch-code-' ~ 1 }}"))
    assert (error["code"], error["param"]) == ("unsupported_by_guardrails", "chat_template")


def test_token_ids_are_refused_while_deny_patterns_apply(gateway: Gateway) -> None:
    # A forbidden phrase sent tokenised: no pattern can read it, so it is not let through.
    for path, body in [
        ("/v1/completions", {"model": "tiny-llama", "prompt": [101, 2023, 3642]}),
        ("/v1/embeddings", {"model": "tiny-embed", "input": [[101, 2023]]}),
    ]:
        error = error_of(post(gateway, path, body))
        assert error["code"] == "unsupported_by_guardrails", body


def test_messages_beside_an_embedding_input_are_searched(gateway: Gateway) -> None:
    body = {
        "model": "tiny-embed",
        "input": "fine",
        "messages": [{"role": "user", "content": SECRET}],
    }
    assert error_of(post(gateway, "/v1/embeddings", body))["code"] == "content_policy_violation"


def test_a_clean_request_with_every_shape_still_passes(gateway: Gateway) -> None:
    messages = [
        {"role": "system", "content": "be brief", "name": "policy"},
        {"role": "user", "content": [{"type": "input_text", "text": "hello there"}]},
        {"role": "assistant", "content": "", "reasoning": "a greeting"},
        {"role": "user", "content": "and again"},
    ]
    assert chat(gateway, messages=messages, max_tokens=4).status_code == 200


# 4. `n`: capped (per key, else globally), and counted in the token estimate.


def test_n_over_the_global_default_is_400_naming_it(gateway: Gateway) -> None:
    error = error_of(chat(gateway, messages=MESSAGES, n=1000))
    assert (error["code"], error["param"]) == ("integer_above_max_value", "n")
    assert "at most 16" in error["message"]
    body = {"model": "tiny-llama", "prompt": "hi", "best_of": 17, "max_tokens": 2}
    assert error_of(post(gateway, "/v1/completions", body))["param"] == "best_of"
    assert chat(gateway, messages=MESSAGES, n=16, max_tokens=2).status_code == 200


def test_a_keys_own_n_cap_overrides_the_global_one(gateway: Gateway) -> None:
    error = error_of(chat(gateway, NARROW, messages=MESSAGES, n=3))
    assert "this API key allows at most 2" in error["message"]
    assert chat(gateway, WIDE, messages=MESSAGES, n=20, max_tokens=1).status_code == 200
    assert error_of(chat(gateway, WIDE, messages=MESSAGES, n=65))["param"] == "n"


def test_n_is_charged_in_the_token_estimate(gateway: Gateway) -> None:
    # The header is the limit's state just after this request's estimate was charged.
    response = chat(gateway, WIDE, messages=MESSAGES, n=8, max_tokens=1000)
    assert response.status_code == 200, response.text
    remaining = int(response.headers["x-ratelimit-remaining-tokens"])
    assert remaining <= TPM - 8 * 1000
