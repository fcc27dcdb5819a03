"""Assemble the edge: a built `Gateway` in, a Starlette ASGI application out.

Nothing here is global: every dependency comes from the `Gateway` passed in, and the
lifespan starts and stops it (gateway/runtime/gateway.py). What a config reload replaces
(the router, the guardrails, the config) is read from the gateway per request, never kept.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HTTPRoute

from gateway.asgi import ASGIApp, header
from gateway.config import GatewayConfig
from gateway.edge.admin import admin_routes
from gateway.edge.admin_relay import AdminRelay, Siblings
from gateway.edge.auth import Caller
from gateway.edge.dispatch import Edge, gateway_error, http_error
from gateway.edge.jwt_auth import token_caller
from gateway.edge.middleware import RequestContextMiddleware
from gateway.edge.openapi import openapi_json
from gateway.edge.proxy import ProxyEndpoint
from gateway.errors import AuthenticationError, GatewayError
from gateway.router import Router
from gateway.runtime.gateway import Gateway
from gateway.wire.validation import Endpoint

__all__ = ["Gateway", "create_app"]

K = TypeVar("K")


class Rebuilt(Generic[K]):
    """A body built from one object (a router, a config), rebuilt when it is replaced.
    The object is held weakly: a router replaced by a reload is not kept alive by it."""

    def __init__(self, build: Callable[[K], bytes]) -> None:
        self._build = build
        self._of: weakref.ref[K] | None = None
        self._body = b""

    def __call__(self, source: K) -> bytes:
        if self._of is None or self._of() is not source:
            self._body, self._of = self._build(source), weakref.ref(source)
        return self._body


def gateway_reload(gateway: Gateway) -> Callable[[], Awaitable[dict[str, Any]]]:
    """POST /admin/config/reload's action: the report as JSON, or the ConfigError."""

    async def reload() -> dict[str, Any]:
        return (await gateway.reload("admin")).to_json()

    return reload


def create_app(
    gateway: Gateway,
    *,
    scrape: Callable[[str | None], Awaitable[tuple[bytes, str]]] | None = None,
    siblings: Siblings | None = None,
) -> ASGIApp:
    """`scrape`: /metrics' body and content type for an Accept header, where it is not this
    process's own registry; `siblings`: the other worker processes, which the admin API's
    calls reach too (several worker processes: gateway/runtime/peer_metrics.py,
    gateway/edge/admin_relay.py)."""
    config = gateway.config  # what only a restart changes: a reload keeps these sections

    def model_object(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "vgate"}

    def models_list(router: Router, allowed: frozenset[str] | None) -> bytes:
        return orjson.dumps(
            {
                "object": "list",
                "data": [
                    model_object(name)
                    for route in router.routes
                    if allowed is None or route.name in allowed
                    for name in (route.name, *route.config.aliases)
                ],
            }
        )

    # Built once per router (a config reload makes a new one), then served as they are.
    models_body: Rebuilt[Router] = Rebuilt(lambda router: models_list(router, None))
    openapi_body: Rebuilt[GatewayConfig] = Rebuilt(openapi_json)

    async def models_caller(request: Request) -> Caller:
        record = request.scope["vgate.record"]
        record.endpoint = "models"
        authorization = header(request.scope, b"authorization")  # raw bytes, as the proxy
        try:
            caller = gateway.keys.authenticate(authorization)
        except AuthenticationError as refused:  # perhaps a JWT
            caller = await token_caller(gateway.keys, gateway.tokens, authorization, refused)
        record.caller = caller.name
        return caller

    async def list_models(request: Request) -> Response:
        caller = await models_caller(request)
        router = gateway.router
        # A key limited to some models sees only those.
        allowed = caller.models
        body = models_body(router) if allowed is None else models_list(router, allowed)
        return Response(body, media_type="application/json")

    async def retrieve_model(request: Request) -> Response:
        """`client.models.retrieve(name)`: one name or alias, as the list shows it."""
        caller = await models_caller(request)
        name = request.path_params["model"]
        # A key limited to some models sees only those.
        gateway.router.route_for(name, caller.models)
        return Response(orjson.dumps(model_object(name)), media_type="application/json")

    async def health(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def ready(request: Request) -> Response:
        is_ready, models = gateway.readiness()
        status = "ready" if is_ready else "draining" if gateway.draining else "not_ready"
        body = orjson.dumps({"status": status, "models": models})
        return Response(body, status_code=200 if is_ready else 503, media_type="application/json")

    async def metrics(request: Request) -> Response:
        # OpenMetrics (with exemplars) to a scraper that asks for it, as Prometheus does.
        accept = request.headers.get("accept")
        if scrape is None:
            body, content_type = gateway.metrics.exposition(accept)
        else:  # the sum over the server's worker processes
            body, content_type = await scrape(accept)
        return Response(body, media_type=content_type)

    async def openapi(request: Request) -> Response:
        # It depends on the config alone.
        return Response(openapi_body(gateway.config), media_type="application/json")

    proxies = {
        endpoint.value: ProxyEndpoint(
            endpoint,
            serving=gateway,  # its router and guardrails, read once per request
            keys=gateway.keys,
            max_body_bytes=config.server.max_body_bytes,
            limits=gateway.limits,
            default_max_tokens_estimate=config.limits.default_max_tokens_estimate,
            tokens=gateway.tokens,
        )
        for endpoint in Endpoint
    }
    routes = [
        *(HTTPRoute(path, proxy, methods=["POST"]) for path, proxy in proxies.items()),
        HTTPRoute("/v1/models", list_models, methods=["GET"]),
        # Served models' names may hold slashes ("org/model"), hence :path.
        HTTPRoute("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        HTTPRoute("/health", health, methods=["GET"]),
        HTTPRoute("/ready", ready, methods=["GET"]),
        HTTPRoute("/metrics", metrics, methods=["GET"]),
        HTTPRoute("/openapi.json", openapi, methods=["GET"]),
    ]
    if gateway.admin_key_sha256 is not None:
        routes += admin_routes(
            gateway.keys,
            gateway.usage,
            gateway.admin_key_sha256,
            gateway.limits,
            chaos=gateway.chaos,
            reload_config=gateway_reload(gateway),
            cache=gateway.cache,
        )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        # Everything built so far lives as long as the process: keep it out of the
        # cyclic collector's generations so collections on the hot path stay short.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await gateway.aclose()

    starlette = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, GatewayError: gateway_error},
        lifespan=lifespan,
    )
    # No redirects: Starlette's answer to a path with a slash too many (or too few) is a 307
    # whose Location is built from the Host header, an open redirect anyone could trigger.
    starlette.router.redirect_slashes = False
    fallback: ASGIApp = starlette
    if siblings is not None and siblings.workers > 1 and gateway.admin_key_sha256 is not None:
        fallback = AdminRelay(starlette, siblings)
    return RequestContextMiddleware(
        Edge(proxies, fallback),
        metrics=gateway.metrics,
        access_log=gateway.access_log,
        tracer=gateway.tracer,
        usage=gateway.usage,
    )
