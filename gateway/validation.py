"""Request bodies: parsed once, checked enough to fail clearly, forwarded otherwise intact.

Only what the gateway relies on or what would make an upstream fail obscurely is checked;
unknown fields pass through untouched so new OpenAI parameters work without a release.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from gateway.errors import InvalidRequest


class Endpoint(StrEnum):
    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"

    @property
    def streams(self) -> bool:
        return self is not Endpoint.EMBEDDINGS


@dataclass(slots=True)
class ProxyRequest:
    endpoint: Endpoint
    payload: dict[str, Any]
    model: str
    stream: bool
    client_wants_usage: bool
    pin: str | None = None  # the backend this request must go to, if any
    pin_forced: bool = False  # by X-VGate-Pin: that backend and no other, no fallback
    affinity_key: str | None = None  # for strategy affinity: a user or conversation


_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def parse_request(endpoint: Endpoint, body: bytes) -> ProxyRequest:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc.msg} at byte {exc.pos}).",
            code="invalid_json",
        ) from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")

    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "you must provide a model parameter as a non-empty string")

    if endpoint is Endpoint.CHAT:
        _check_messages(payload.get("messages"))
    elif endpoint is Endpoint.COMPLETIONS:
        _check_prompt(payload.get("prompt"))
    else:
        _check_input(payload.get("input"))

    stream = False
    wants_usage = False
    if endpoint.streams:
        stream = _optional_bool(payload, "stream")
        options = payload.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise _invalid("stream_options", "must be an object")
            if not stream:
                raise _invalid("stream_options", "is only allowed when stream is true")
            wants_usage = _optional_bool(
                options, "include_usage", name="stream_options.include_usage"
            )
        for name in ("max_tokens", "max_completion_tokens", "n"):
            _optional_int(payload, name, minimum=1)
        _optional_number(payload, "temperature", 0.0, 2.0)
        _optional_number(payload, "top_p", 0.0, 1.0)
    return ProxyRequest(endpoint, payload, model, stream, wants_usage)


def _invalid(param: str, reason: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid '{param}': {reason}.", param=param, code="invalid_value")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "must be a non-empty array of message objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages[{index}]", "must be an object")
        role = message.get("role")
        if role not in _ROLES:
            raise _invalid(f"messages[{index}].role", f"must be one of {', '.join(sorted(_ROLES))}")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _invalid(f"messages[{index}].content", "must be a string or an array of parts")


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt):
        return
    raise _invalid("prompt", "must be a string or a non-empty array of strings or token ids")


def _check_input(value: Any) -> None:
    if isinstance(value, str) or (isinstance(value, list) and value):
        return
    raise _invalid("input", "must be a string or a non-empty array of strings or token ids")


def _optional_bool(payload: dict[str, Any], key: str, *, name: str | None = None) -> bool:
    value = payload.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(name or key, "must be a boolean")
    return value


def _optional_int(payload: dict[str, Any], key: str, *, minimum: int) -> None:
    value = payload.get(key)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _invalid(key, f"must be an integer of at least {minimum}")


def _optional_number(payload: dict[str, Any], key: str, low: float, high: float) -> None:
    value = payload.get(key)
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise _invalid(key, f"must be a number between {low:g} and {high:g}")
