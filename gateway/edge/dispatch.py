"""The outermost app's dispatch, and the answers Starlette gives for errors.

`Edge` sends the proxied POST endpoints straight to their handlers and everything else
to Starlette; `http_error` and `gateway_error` are Starlette's exception handlers, so an
unknown path, a wrong method and a `GatewayError` raised in a handler are all answered in
OpenAI's error shape.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from gateway.asgi import ASGIApp, Receive, Scope, Send
from gateway.edge.proxy import ProxyEndpoint
from gateway.errors import GatewayError, MethodNotAllowed, NotFound, StatusError, clip


class Edge:
    """The outermost app: the proxied POST endpoints directly, everything else via Starlette.

    The three proxied paths are the hot path; dispatching them by a dict lookup spares
    each request Starlette's error and exception middleware and its regex routing. Their
    other methods still reach Starlette, which answers 405 with `Allow`.
    """

    def __init__(self, proxies: Mapping[str, ProxyEndpoint], fallback: ASGIApp) -> None:
        self.proxies = dict(proxies)
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.proxies.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.fallback(scope, receive, send)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: GatewayError
    headers = dict(exc.headers or {})  # 405's Allow
    if exc.status_code == 404:
        error = NotFound(f"Unknown path {clip(request.scope['path'])}.", headers=headers)
    elif exc.status_code == 405:
        error = MethodNotAllowed(
            f"Method {clip(request.method, 20)} is not allowed on {clip(request.scope['path'])}.",
            headers=headers,
        )
    else:
        error = StatusError(exc.status_code, exc.detail, headers=headers)
    return await gateway_error(request, error)


async def gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    record = request.scope.get("vgate.record")
    if record is not None:
        record.error = exc.code or exc.type
    return Response(
        exc.body(), status_code=exc.status, headers=exc.headers, media_type="application/json"
    )
