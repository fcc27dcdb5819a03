"""The gateway's exceptions: one tree, in this module.

    Exception
    ├── GatewayError                  an answer for the client: status, OpenAI's body, headers
    │   ├── InvalidRequest            400 invalid_request_error
    │   ├── AuthenticationError       401 invalid_request_error
    │   ├── PermissionDenied          403 permission_error
    │   ├── NotFound                  404 invalid_request_error
    │   │   └── ModelNotFound
    │   ├── MethodNotAllowed          405 invalid_request_error
    │   ├── PayloadTooLarge           413 invalid_request_error
    │   ├── LimitExceeded             429 requests: a key's requests per minute or in flight
    │   │   ├── TokenLimitExceeded    429 tokens: its tokens per minute
    │   │   └── QuotaExceeded         403 insufficient_quota: its tokens per day
    │   ├── UpstreamRejected          the upstream's own 4xx, passed on (status given)
    │   │   └── ContextTooLong        the prompt does not fit the model: never resent as is
    │   ├── UpstreamError             502 upstream_error: gone, reset, or not speaking its API
    │   ├── ServiceUnavailable        503 service_unavailable: try again later
    │   │   ├── NoLiveBackend         no backend of the route may take the request now
    │   │   │   └── BreakerOpen       one backend's circuit breaker refused an attempt
    │   │   ├── Overloaded            the gateway sheds load: its admission queue
    │   │   │   └── UpstreamBufferFull    ...or the answers it may hold in memory at once
    │   │   └── LimitsUnavailable     the keys' limits cannot be checked (failing closed)
    │   ├── UpstreamTimeout           504 timeout
    │   ├── StatusError               a status the web framework chose (status given)
    │   ├── ChaosDisabled             409: an experiment started where chaos is switched off
    │   ├── TooManyExperiments        409: an experiment beside the most that may run
    │   └── StreamInterrupted         a stream broke after its first byte: told as an
    │                                 error event, since its status (200) is already sent
    ├── TransportError                the upstream exchange failed below HTTP: the router
    │   │                             words it as an UpstreamError or UpstreamTimeout
    │   ├── UpstreamConnectError      nothing reached the upstream (`timed_out` says why)
    │   └── UpstreamBroken            it failed after the request went out (reset, closed,
    │       │                         malformed HTTP, a body over its bound)
    │       └── MalformedStream       the upstream's event stream is not one
    ├── ClientDisconnected            the client left before its whole request arrived
    ├── BodyTooLarge                  a request body passed the limit it was read under
    ├── MissingCredential             a backend's API key is not in the environment (start-up)
    └── ConfigError                   the configuration is wrong: its file, field and reason

A `GatewayError`'s status, type and default code are its class's. Only the two classes
whose status comes from outside take it in their constructor (`UpstreamRejected`,
`StatusError`); no instance's is changed after it is made. An error becomes bytes one way,
`body()`: as an answer's body (`gateway.edge.middleware.send_error`, Starlette's handler)
and as a started stream's error event (`gateway.wire.sse.error_event`) alike; its `headers`
(Retry-After, WWW-Authenticate, Allow, x-ratelimit-*) are given when it is made.

Third-party errors are translated where they arise, never let through: pybreaker's
`CircuitBreakerError` becomes `BreakerOpen` (`policies.breaker`); the sockets' `OSError`s,
TLS and httptools' parse errors become `TransportError`s (`providers.http1`).

Outside the tree, on purpose: control-flow signals that never reach a client as themselves
(`policies.retry.AttemptFailed`, which carries the `GatewayError` to tell if no attempt
succeeds; `policies.resume.Diverged`; `gateway.wire.assemble.Incomplete`), the simulated
worker's vLLM-shaped errors (`chaos.sim.protocol.HTTPError`: another server's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

# How much of a client's own input (a path, a model name, an id) an error message or a log
# line repeats: enough to recognise it, never the whole of what an attacker chose to send.
MAX_ECHO_CHARS = 100


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` as an error message or a log line may repeat it: at most `limit` characters."""
    return text if len(text) <= limit else text[:limit] + "…"


# -- What a client is told --------------------------------------------------------------


class GatewayError(Exception):
    """Anything a client can be told. Anything else raised while handling a request is a
    bug, answered as a generic 500 without details."""

    status = 500
    type = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = dict(headers) if headers else {}

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
        """The error as OpenAI's JSON: the one way it becomes bytes, for an answer's body and
        a stream's error event alike."""
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


class LimitExceeded(GatewayError):
    """A key's rate limit refused the request: its requests per minute or in flight.
    `type` names the limit as OpenAI's does ("requests", "tokens")."""

    status = 429
    type = "requests"
    default_code = "rate_limit_exceeded"


class TokenLimitExceeded(LimitExceeded):
    """The key's tokens per minute refused the request."""

    type = "tokens"


class QuotaExceeded(LimitExceeded):
    """The key's tokens for the day are spent (until 00:00 UTC)."""

    status = 403
    type = "insufficient_quota"
    default_code = "insufficient_quota"


class UpstreamRejected(GatewayError):
    """The upstream answered with a client error of its own; passed through as it was,
    its status included. `payload` is the upstream's error body (OpenAI's shape)."""

    type = "invalid_request_error"

    def __init__(self, status: int, payload: dict[str, Any], headers: Mapping[str, str]) -> None:
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


class UpstreamError(GatewayError):
    """The upstream failed: gone, reset, or answered something that is not its API."""

    status = 502
    type = "upstream_error"
    default_code = "bad_gateway"


class ServiceUnavailable(GatewayError):
    """The gateway cannot serve the request now, by nobody's fault in it: try again later
    (a Retry-After says when, where the gateway knows)."""

    status = 503
    type = "service_unavailable"


class NoLiveBackend(ServiceUnavailable):
    default_code = "no_live_backend"


class BreakerOpen(NoLiveBackend):
    """`backend`'s circuit breaker refused an attempt: it opened between the backend's
    choice and the attempt. No fault of the backend's own: another may be tried."""

    def __init__(self, backend: str) -> None:
        super().__init__(f"Backend '{backend}' is not taking requests.")
        self.backend = backend


class Overloaded(ServiceUnavailable):
    """The gateway is full: more requests in flight or waiting than it takes at once."""

    default_code = "overloaded"


class UpstreamBufferFull(Overloaded):
    """Taking more of an upstream's answer would pass `upstream.max_buffered_bytes`, the
    process's bound on answers held in memory at once: the gateway is overloaded, not the
    upstream at fault, so the client is told to retry shortly (and no breaker counts it)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The gateway holds as much of upstream answers as it may at once ({limit} bytes, "
            "upstream.max_buffered_bytes); retry shortly.",
            headers={"Retry-After": "1"},
        )
        self.limit = limit


class LimitsUnavailable(ServiceUnavailable):
    """The keys' limits live in Redis, which does not answer, and they fail closed."""

    default_code = "rate_limits_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout"
    default_code = "upstream_timeout"


class StatusError(GatewayError):
    """An HTTP error the web framework raised with a status the gateway has no class for
    (Starlette's `HTTPException`): its status and wording kept."""

    def __init__(
        self, status: int, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, headers=headers)
        self.status = status
        self.type = "invalid_request_error" if status < 500 else "server_error"


class ChaosDisabled(GatewayError):
    """An experiment was to be started on a gateway whose config has chaos disabled."""

    status = 409
    type = "invalid_request_error"
    default_code = "chaos_disabled"


class TooManyExperiments(GatewayError):
    """An experiment was to be started beside `MAX_CHAOS_EXPERIMENTS` others."""

    status = 409
    type = "invalid_request_error"
    default_code = "too_many_experiments"


class StreamInterrupted(GatewayError):
    """A stream broke after its first byte reached the client: its 200 is sent, so the
    client is told with an error event (`gateway.wire.sse.error_event`) and no [DONE]."""


# -- The upstream exchange, below HTTP ----------------------------------------------------


class TransportError(Exception):
    """The exchange with an upstream failed below HTTP's semantics. Never told to a client
    as it is: the router decides what it means (retry, eject, which error to answer)."""


class UpstreamConnectError(TransportError):
    """No connection could be made: the request never reached the upstream."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class UpstreamBroken(TransportError):
    """The connection failed after the request was sent (reset, closed, malformed HTTP, a
    body over its bound)."""


class MalformedStream(UpstreamBroken):
    """The upstream's event stream is not one: handled like a connection that broke."""


# -- The client's side of the exchange ----------------------------------------------------


class ClientDisconnected(Exception):
    """The client went away before the gateway had its whole request."""


class BodyTooLarge(Exception):
    """A request body passed `limit` bytes; each server words its own answer (the gateway's
    is a `PayloadTooLarge`)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than {limit} bytes")
        self.limit = limit


# -- Start-up -----------------------------------------------------------------------------


class MissingCredential(Exception):
    """The environment variable that should hold a backend's API key is unset or empty.
    The runtime reports it as a configuration error naming the field."""


# -- What start-up is told ---------------------------------------------------------------


class ConfigError(Exception):
    """A configuration problem: which file, which field, and why."""

    def __init__(self, source: str, field: str, reason: str) -> None:
        self.source = source
        self.field = field
        self.reason = reason
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {reason}")
