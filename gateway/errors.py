"""The gateway's exception tree, each error carrying its OpenAI-format body and status.

Everything a client can be told is a `GatewayError`; anything else is a bug and is
answered as a generic 500 without details.
"""

from __future__ import annotations

from typing import Any

import orjson

# How much of a client's own input (a path, a model name, an id) an error message or a log
# line repeats: enough to recognise it, never the whole of what an attacker chose to send.
MAX_ECHO_CHARS = 100


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` as an error message or a log line may repeat it: at most `limit` characters."""
    return text if len(text) <= limit else text[:limit] + "…"


class GatewayError(Exception):
    status = 500
    type = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.payload())


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(GatewayError):
    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class UpstreamError(GatewayError):
    """The upstream failed: gone, reset, or answered something that is not its API."""

    status = 502
    type = "upstream_error"
    default_code = "bad_gateway"


class NoLiveBackend(GatewayError):
    status = 503
    type = "service_unavailable"
    default_code = "no_live_backend"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout"
    default_code = "upstream_timeout"


class UpstreamRejected(GatewayError):
    """The upstream answered with a client error of its own; passed through as it was."""

    type = "invalid_request_error"

    def __init__(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
        error = payload.get("error") if isinstance(payload.get("error"), dict) else {}
        assert isinstance(error, dict)
        super().__init__(
            str(error.get("message") or f"upstream answered {status}"), headers=headers
        )
        self.status = status
        self._payload = payload

    def payload(self) -> dict[str, Any]:
        return self._payload


class ContextTooLong(UpstreamRejected):
    """The prompt (with max_tokens) does not fit the model's context: never resent unchanged."""
