"""What an upstream's refusal means, as facts the router acts on.

The wire's status codes, error bodies and in-stream error events are read here, once: the
router decides with a `Verdict` (retry? blame the backend? back off? a prompt too long?),
never with a status code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import ContextTooLong, GatewayError, UpstreamError, UpstreamRejected

# What of an error body is read: enough for any real message, never a flood held in memory.
MAX_ERROR_BODY_BYTES = 64 * 1024

_RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
_OVERLOADED_STATUSES = frozenset({429, 503})
_CREDENTIAL_STATUSES = frozenset({401, 403, 407})
# A prompt too long for the model, as each upstream says it. OpenAI names it by its code.
_CONTEXT_CODES = frozenset({"context_length_exceeded"})
# llama.cpp's server by its error type (its code is the status).
_CONTEXT_TYPES = frozenset({"exceed_context_size_error"})
# vLLM answers `{"type": "BadRequestError", "code": 400, "param": ...}`. Newer versions
# (VLLMValidationError) name in `param` what did not fit: the prompt's tokens, or its text
# before tokenizing. A prompt plus max_tokens over the model's length is "max_tokens", which
# max_tokens' other checks use too, so there the message decides; so it does where param is
# null (older vLLM, and errors raised without one).
_VLLM_ERROR_TYPE = "BadRequestError"
_VLLM_CONTEXT_PARAMS = frozenset({"input_tokens", "input_text"})
_VLLM_UNDECIDED_PARAMS = frozenset({"max_tokens", "max_completion_tokens"})
# The last resort: the message's words (OpenAI's, vLLM's, Anthropic's, TGI's, llama.cpp's).
_CONTEXT_TOO_LONG = re.compile(
    r"context length|context window|context size|too many tokens|prompt is too long", re.I
)
# OpenAI's codes for an answer its moderation refused; vLLM has none.
_CONTENT_FILTER_CODES = frozenset({"content_filter", "content_policy_violation"})


@dataclass(frozen=True, slots=True)
class Verdict:
    """One upstream refusal, classified."""

    error: GatewayError  # what the client is told, if this is the request's last word
    retryable: bool  # another attempt (here or on another backend) may succeed
    backend_fault: bool  # counts against the backend's circuit breaker
    overloaded: bool = False  # the backend said it is full: its adaptive limit backs off
    retry_after_s: int | None = None  # how long the backend asked to be left alone

    @property
    def context_too_long(self) -> bool:
        """The prompt does not fit this model: only a larger context window can help."""
        return isinstance(self.error, ContextTooLong)

    @property
    def content_filtered(self) -> bool:
        """The upstream's moderation refused the content: resending it changes nothing."""
        if not isinstance(self.error, UpstreamRejected):
            return False
        error = self.error.payload().get("error")
        return isinstance(error, dict) and error.get("code") in _CONTENT_FILTER_CODES


def rejection(backend: str, status: int, body: bytes | None, retry_after_s: int | None) -> Verdict:
    """An upstream's answer with a status other than 200, and its (bounded) body if read."""
    payload = _json(body)
    message = error_message(payload)
    retryable = status in _RETRYABLE_STATUSES
    overloaded = status in _OVERLOADED_STATUSES
    retry_after = retry_after_s if retryable else None
    if status in _CREDENTIAL_STATUSES:
        # The client's key was fine; the gateway's own credentials for this backend are not.
        error: GatewayError = UpstreamError(
            f"Backend '{backend}' refused the gateway's credentials ({status}).",
            code="upstream_auth_failed",
        )
        return Verdict(error, retryable=True, backend_fault=True)
    if 400 <= status < 500:
        error_body = payload.get("error") if isinstance(payload, dict) else None
        # OpenAI's four keys, always: the upstream's values where it gave them.
        normalised = {
            "message": message or f"Backend '{backend}' answered {status}.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
            **(error_body if isinstance(error_body, dict) else {}),
        }
        # The client gets the parsed whole seconds, never the upstream's own bytes.
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else {}
        too_long = status == 400 and _context_too_long(normalised)
        rejected = ContextTooLong if too_long else UpstreamRejected
        return Verdict(
            rejected(status, {"error": normalised}, headers),
            retryable=retryable,
            backend_fault=False,
            overloaded=overloaded,
            retry_after_s=retry_after,
        )
    detail = f": {message}" if message else ""
    return Verdict(
        UpstreamError(f"Backend '{backend}' answered {status}{detail}", code="upstream_error"),
        retryable=retryable,
        backend_fault=True,
        overloaded=overloaded,
        retry_after_s=retry_after,
    )


def stream_error(backend: str, error: dict[str, Any]) -> Verdict:
    """An error event where a stream's first event should be (vLLM's way to refuse late)."""
    code = error.get("code")
    message = str(error.get("message") or "no message")
    # vLLM's code is the status it would have answered; OpenAI's names the reason.
    named = isinstance(code, str) and code in _CONTEXT_CODES
    status = code if isinstance(code, int) else 400 if named else None
    if status is not None and 400 <= status < 500 and status not in (*_CREDENTIAL_STATUSES, 429):
        rejected = ContextTooLong if _context_too_long(error) else UpstreamRejected
        return Verdict(rejected(status, {"error": error}, {}), retryable=False, backend_fault=False)
    return Verdict(
        UpstreamError(f"Backend '{backend}' failed its stream at once: {message}"),
        retryable=True,
        backend_fault=code != 429,
    )


def is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def is_event_stream(content_type: str) -> bool:
    return content_type.startswith("text/event-stream")


def error_message(payload: Any) -> str | None:
    """The message of an OpenAI-format (or bare `{"message": ...}`) error body, clipped."""
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:500]
        if isinstance(payload.get("message"), str):
            return str(payload["message"])[:500]
    return None


def _json(body: bytes | None) -> Any:
    if body is None:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _context_too_long(error: dict[str, Any]) -> bool:
    """Whether an OpenAI-shaped error object says the prompt does not fit the model: by
    its code, then by vLLM's shape, and by its message's words only where neither says."""
    code, kind, param = error.get("code"), error.get("type"), error.get("param")
    if isinstance(code, str) and code:
        return code in _CONTEXT_CODES  # OpenAI's codes name the one reason
    if isinstance(kind, str) and kind in _CONTEXT_TYPES:
        return True
    if kind == _VLLM_ERROR_TYPE and isinstance(param, str):
        if param in _VLLM_CONTEXT_PARAMS:
            return True
        if param not in _VLLM_UNDECIDED_PARAMS:
            return False  # vLLM named another parameter as the one at fault
    message = error.get("message")
    return isinstance(message, str) and _CONTEXT_TOO_LONG.search(message[:500]) is not None
