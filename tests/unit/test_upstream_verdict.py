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
    full = stream_error("w1", {"message": "busy", "code": 429})
    assert full.retryable and not full.backend_fault
    crashed = stream_error("w1", {"message": "engine dead"})
    assert crashed.retryable and crashed.backend_fault


def test_content_types() -> None:
    assert is_json("application/json; charset=utf-8") and is_json("application/problem+json")
    assert not is_json("text/html")
    assert is_event_stream("text/event-stream; charset=utf-8") and not is_event_stream("")
