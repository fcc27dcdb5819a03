"""gateway.wire.upstream: an upstream's refusal, classified into the facts the router uses."""

from __future__ import annotations

import orjson
import pytest

from gateway.errors import ContextTooLong, UpstreamError, UpstreamRejected
from gateway.wire.upstream import is_event_stream, is_json, rejection, stream_error


def body(message: str, code: object = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "BadRequestError", "code": code}})


@pytest.mark.parametrize(
    ("status", "retryable", "fault", "overloaded"),
    [
        (429, True, False, True),  # the backend is full: not its fault, but back off
        (503, True, True, True),
        (500, True, True, False),
        (502, True, True, False),
        (504, True, True, False),
        (501, False, True, False),
        (404, False, False, False),
    ],
)
def test_a_status_decides_retry_blame_and_backoff(
    status: int, retryable: bool, fault: bool, overloaded: bool
) -> None:
    verdict = rejection("w1", status, body("nope"), None)
    assert (verdict.retryable, verdict.backend_fault, verdict.overloaded) == (
        retryable,
        fault,
        overloaded,
    )


def test_a_client_error_passes_the_upstream_body_on_with_openais_four_keys() -> None:
    verdict = rejection("w1", 400, orjson.dumps({"error": {"message": "bad temperature"}}), None)
    assert isinstance(verdict.error, UpstreamRejected) and verdict.error.status == 400
    assert verdict.error.payload() == {
        "error": {
            "message": "bad temperature",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    assert not verdict.context_too_long and not verdict.content_filtered


def test_a_prompt_too_long_is_its_own_fact() -> None:
    message = "This model's maximum context length is 2048 tokens. However, you requested 3000"
    verdict = rejection("w1", 400, body(message), None)
    assert isinstance(verdict.error, ContextTooLong) and verdict.context_too_long
    assert not verdict.retryable and not verdict.backend_fault


def vllm_body(message: str, param: str | None) -> bytes:
    """vLLM's error body: its exception's name as the type, the status as the code."""
    error = {"message": message, "type": "BadRequestError", "param": param, "code": 400}
    return orjson.dumps({"error": error})


def test_openais_code_names_a_prompt_too_long_whatever_the_message_says() -> None:
    named = rejection("openai", 400, body("Please shorten it.", "context_length_exceeded"), None)
    assert named.context_too_long and not named.retryable
    # Another code is another reason, however the message reads.
    other = rejection(
        "openai", 400, body("the context length of this value", "invalid_value"), None
    )
    assert isinstance(other.error, UpstreamRejected) and not other.context_too_long


@pytest.mark.parametrize(
    ("message", "param"),
    [
        # vLLM's own words, each with the param it sets: the prompt alone does not fit...
        (
            "This model's maximum context length is 2048 tokens. However, your request has"
            " 3000 input tokens. Please reduce the length of the input messages.",
            "input_tokens",
        ),
        # ...by the renderer's count of tokens, or of characters before tokenizing...
        (
            "You passed 3000 input tokens and requested 16 output tokens. However, the"
            " model's context length is only 2048 tokens, resulting in a maximum input"
            " length of 2032 tokens. Please reduce the length of the input prompt.",
            "input_tokens",
        ),
        ("You passed 90000 input characters and requested 16 output tokens.", "input_text"),
        # ...the prompt and max_tokens together do not...
        (
            "'max_tokens' or 'max_completion_tokens' is too large: 4000. This model's maximum"
            " context length is 2048 tokens and your request has 10 input tokens"
            " (4000 > 2048 - 10).",
            "max_tokens",
        ),
        # ...and older vLLM, with no param at all.
        (
            "This model's maximum context length is 2048 tokens. However, you requested 3000"
            " tokens (2900 in the messages, 100 in the completion). Please reduce the length"
            " of the messages or completion.",
            None,
        ),
    ],
)
def test_vllms_prompt_too_long(message: str, param: str | None) -> None:
    verdict = rejection("w1", 400, vllm_body(message, param), None)
    assert isinstance(verdict.error, ContextTooLong) and verdict.context_too_long
    assert not verdict.retryable and not verdict.backend_fault
    assert verdict.error.payload()["error"]["param"] == param  # passed on as vLLM said it


def test_vllms_input_param_is_enough_without_the_words() -> None:
    assert rejection("w1", 400, vllm_body("Too much.", "input_tokens"), None).context_too_long


def test_vllms_other_400s_are_not_a_prompt_too_long() -> None:
    # max_tokens' other checks share the param; another param names another fault.
    small = rejection(
        "w1", 400, vllm_body("max_tokens must be at least 1, got 0.", "max_tokens"), None
    )
    assert isinstance(small.error, UpstreamRejected) and not small.context_too_long
    other = vllm_body("temperature must be in [0, 2] (the context length is fine)", "temperature")
    assert not rejection("w1", 400, other, None).context_too_long


def test_llama_cpps_prompt_too_long_by_its_type() -> None:
    error = {
        "code": 400,
        "message": "request exceeds the available slots",
        "type": "exceed_context_size_error",
    }
    assert rejection("llama", 400, orjson.dumps({"error": error}), None).context_too_long


@pytest.mark.parametrize(
    "message",
    [
        "prompt is too long: 210000 tokens > 200000 maximum",
        "Input validation error: the context window of 4096 tokens is exceeded",
        "the request exceeds the available context size, try increasing it",
    ],
)
def test_the_words_decide_only_where_nothing_else_does(message: str) -> None:
    bare = orjson.dumps({"error": {"message": message}})
    assert rejection("w1", 400, bare, None).context_too_long
    assert not rejection("w1", 422, bare, None).context_too_long  # only a 400 is one


def test_content_refused_by_moderation_is_its_own_fact() -> None:
    verdict = rejection("openai", 400, body("flagged", "content_filter"), None)
    assert verdict.content_filtered and not verdict.retryable


def test_the_gateways_own_credentials_refused_are_the_backends_fault() -> None:
    verdict = rejection("openai", 401, body("Incorrect API key"), None)
    assert isinstance(verdict.error, UpstreamError) and verdict.error.code == "upstream_auth_failed"
    assert verdict.retryable and verdict.backend_fault
    assert verdict.error.status == 502  # never the client's 401: its key was fine


def test_retry_after_counts_only_where_a_retry_is_worth_it() -> None:
    assert rejection("w1", 503, None, 7).retry_after_s == 7
    refused = rejection("w1", 400, None, 7)
    assert refused.retry_after_s is None
    assert refused.error.headers == {"Retry-After": "7"}  # told to the client, parsed


def test_a_body_that_is_not_json_still_classifies_by_status() -> None:
    verdict = rejection("w1", 500, b"<html>oops</html>", None)
    assert verdict.error.message == "Backend 'w1' answered 500"
    assert verdict.retryable and verdict.backend_fault


def test_an_error_event_first_in_a_stream() -> None:
    late = stream_error("w1", {"message": "prompt is too long", "code": 400})
    assert late.context_too_long and not late.retryable and not late.backend_fault
    vllm = {"message": "Too much.", "type": "BadRequestError", "param": "input_tokens", "code": 400}
    assert stream_error("w1", vllm).context_too_long
    named = stream_error("openai", {"message": "Shorten it.", "code": "context_length_exceeded"})
    assert named.context_too_long and named.error.status == 400 and not named.retryable
    crash = stream_error(
        "w1", {"message": "maximum context length exceeded in kernel", "code": 500}
    )
    assert (
        not crash.context_too_long and crash.retryable
    )  # a 5xx is the backend's, whatever its words
    full = stream_error("w1", {"message": "busy", "code": 429})
    assert full.retryable and not full.backend_fault
    crashed = stream_error("w1", {"message": "engine dead"})
    assert crashed.retryable and crashed.backend_fault


def test_content_types() -> None:
    assert is_json("application/json; charset=utf-8") and is_json("application/problem+json")
    assert not is_json("text/html")
    assert is_event_stream("text/event-stream; charset=utf-8") and not is_event_stream("")
