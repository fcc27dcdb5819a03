"""The worker's HTTP plumbing over raw ASGI: vLLM's error shapes, JSON and SSE responses,
reading a JSON body, and request ids.

Every endpoint answers through these, so the status codes, error bodies and framing a gateway
sees are the same whichever part of the worker produced them. The errors are the shapes vLLM's
FastAPI app produces: its validation errors, its serving errors, and plain HTTP ones.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from gateway.asgi import Message, Receive, Scope, Send, read_body
from gateway.errors import BodyTooLarge
from gateway.wire.sse import data_event

__all__ = [
    "JSON",
    "MAX_BODY_BYTES",
    "NOT_FOUND",
    "SSE_HEADERS",
    "UNAUTHORIZED",
    "HTTPError",
    "Handler",
    "RequestIds",
    "error",
    "error_content",
    "field_error",
    "invalid",
    "read_json",
    "rejected",
    "replay",
    "send_event",
    "send_json",
    "until_disconnected",
]

MAX_BODY_BYTES = 16 * 1024 * 1024

JSON = b"application/json"
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


class HTTPError(Exception):
    def __init__(
        self, status: int, content: Any, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = orjson.dumps(content)
        self.headers = headers or []

    async def send(self, send: Send) -> None:
        await send_json(send, self.status, self.body, self.headers)


def error_content(message: str, type_: str, status: int, param: str | None) -> Any:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def error(message: str, type_: str, status: int, param: str | None = None) -> HTTPError:
    return HTTPError(status, error_content(message, type_, status, param))


def invalid(message: str, param: str | None = None) -> HTTPError:
    # A request that fails FastAPI/pydantic validation: vLLM's handler for those reports the
    # HTTP phrase as the type, unlike the errors its serving code raises.
    return error(message, "Bad Request", 400, param)


def rejected(message: str, param: str, value: int) -> HTTPError:
    # vLLM raises VLLMValidationError, whose str() appends the parameter and value.
    return error(f"{message} (parameter={param}, value={value})", "BadRequestError", 400, param)


def field_error(field: str, expected: str) -> HTTPError:
    return invalid(f"body.{field}: Input should be {expected}")


NOT_FOUND = HTTPError(404, {"detail": "Not Found"})
UNAUTHORIZED = HTTPError(401, {"error": "Unauthorized"})


async def send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    response_headers = [(b"content-type", JSON), (b"content-length", b"%d" % len(body))]
    if headers:
        response_headers.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})


async def send_event(send: Send, content: Any) -> None:
    await send(
        {
            "type": "http.response.body",
            "body": data_event(orjson.dumps(content)),
            "more_body": True,
        }
    )


async def read_json(scope: Scope, receive: Receive) -> dict[str, Any]:
    """The request's JSON object, or the HTTPError vLLM answers for a body that is not one."""
    content_type = b""
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value
            break
    if content_type.partition(b";")[0].strip().lower() != JSON:
        raise invalid("Unsupported Media Type: Only 'application/json' is allowed")
    try:
        body = await read_body(scope, receive, MAX_BODY_BYTES)
    except BodyTooLarge as exc:
        raise error(str(exc), "BadRequestError", 413) from None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"JSON decode error: {exc}") from None
    if not isinstance(data, dict):
        raise invalid("body: Input should be a valid dictionary or object")
    return data


def replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for a request whose body has been read already: the body again, then on."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay


async def until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class RequestIds:
    """Request ids that look like vLLM's (32 hex digits) but cost a counter increment."""

    __slots__ = ("_ids", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._ids = itertools.count(1)

    def new(self, prefix: str) -> str:
        return f"{prefix}{self._prefix}{next(self._ids):016x}"
