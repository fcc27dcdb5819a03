"""Assemble the edge: configuration in, a Starlette ASGI application out.

Nothing here is global: every dependency is built from the config in `Gateway` and
passed in, and the lifespan starts and stops what holds connections.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import orjson
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HTTPRoute

from gateway.asgi import ASGIApp, Receive, Scope, Send, header
from gateway.config import ConfigError, GatewayConfig, RetryConfig
from gateway.edge.accesslog import AccessLog
from gateway.edge.admin import admin_key_hash, admin_routes
from gateway.edge.auth import Caller, KeyRing
from gateway.edge.connections import ConnectionGuard, ConnectionLimits, connection_limits
from gateway.edge.jwt_auth import TokenVerifier, token_caller
from gateway.edge.keyfile import KeyFileWatcher
from gateway.edge.metrics import GatewayMetrics
from gateway.edge.middleware import RequestContextMiddleware
from gateway.edge.openapi import openapi_json
from gateway.edge.proxy import ProxyEndpoint, route_for
from gateway.edge.tracing import Tracer
from gateway.edge.usage import KeyUsage
from gateway.errors import AuthenticationError, GatewayError, MethodNotAllowed, NotFound, clip
from gateway.router import AnswerBounds, Backend, Route, Router, RouterHooks
from gateway.wire.validation import Endpoint
from policies.adaptive import AdaptiveLimit
from policies.admission import Admission
from policies.breaker import BackendBreaker
from policies.breaker_sync import BreakerSync
from policies.guardrails import Guardrails
from policies.health import HealthChecker, Probe
from policies.limits import LimitStore
from policies.limits_local import LocalLimits
from policies.limits_redis import create_limits
from policies.load import LoadScraper, ScrapeTarget
from policies.redis_state import RedisHealth, create_client
from policies.retry import RetryBudget, RetryPolicy
from providers import MissingCredential, create_adapter
from providers.http1 import ByteBudget


@dataclass
class Gateway:
    """The runtime pieces built from one configuration."""

    config: GatewayConfig
    keys: KeyRing
    router: Router
    metrics: GatewayMetrics
    access_log: AccessLog | None
    health: HealthChecker
    loads: LoadScraper | None = None  # vLLM's own running/waiting, scraped as a load signal
    tracer: Tracer | None = None  # with tracing.enabled: request spans over OTLP
    redis: Redis | None = None  # with redis.url: one pooled client, from start to aclose
    breaker_sync: BreakerSync | None = None
    guardrails: Guardrails = field(default_factory=Guardrails)
    usage: KeyUsage | None = None  # per key, today: what /admin/keys/{id} reports
    admin_key_sha256: str | None = None  # None: no admin API
    key_watcher: KeyFileWatcher | None = None  # reloads the keys file when it changes
    limits: LimitStore = field(default_factory=LocalLimits)  # per key: rpm, tpm, day, in flight
    # What one client connection may take; uvicorn's protocol for this gateway's server.
    connections: ConnectionGuard = field(
        default_factory=lambda: ConnectionGuard(ConnectionLimits())
    )
    tokens: TokenVerifier | None = None  # with jwt.enabled: bearer JWTs beside API keys

    @classmethod
    def from_config(cls, config: GatewayConfig, *, log_stream: BinaryIO | None = None) -> Gateway:
        keys = KeyRing.load(
            config.keys.file,
            backends={backend.name for model in config.models for backend in model.backends},
            models={name: m.name for m in config.models for name in (m.name, *m.aliases)},
        )
        admin_key = admin_key_hash(config.admin, config.source)
        tokens = (
            TokenVerifier.from_config(config.jwt, config.source) if config.jwt.enabled else None
        )
        metrics = GatewayMetrics(
            [model.name for model in config.models],
            [backend.name for model in config.models for backend in model.backends],
        )
        # One bound on the upstream answers held in memory, shared by every backend.
        budget = ByteBudget(config.upstream.max_buffered_bytes)
        routes = [
            Route(
                model,
                [_backend(config, m, b, metrics, budget) for b in range(len(model.backends))],
                _retry_policy(model.retries),
            )
            for m, model in enumerate(config.models)
        ]
        server = config.server
        admission = Admission(
            limit=server.max_in_flight,
            max_waiting=server.queue_max_waiting,
            timeout_s=server.queue_timeout_s,
        )
        hooks = RouterHooks(
            on_retry=lambda route, delay: metrics.retries.labels(route).inc(),
            on_fallback=lambda old, new: metrics.fallbacks.labels(old, new).inc(),
            on_resume=metrics.stream_resumed,
        )
        router = Router(
            routes,
            admission=admission,
            answers=AnswerBounds(config.upstream.max_body_bytes, budget),
            hooks=hooks,
        )
        metrics.watch_admission(admission)
        connections = ConnectionGuard(connection_limits(server))
        metrics.watch_connections(connections)
        metrics.watch_concurrency_limits((b.name, _limit_of(b)) for b in router.backends)
        access_log = None
        if config.server.access_log:
            access_log = AccessLog(log_stream if log_stream is not None else sys.stdout.buffer)
        health = HealthChecker(
            [
                Probe(backend.name, route.config.health, backend.adapter.health, backend.health)
                for route in routes
                for backend in route.backends
            ],
            on_change=metrics.health_changed,
        )
        loads = None
        scrape = config.load_scrape
        targets = [
            ScrapeTarget(
                backend.name, backend.adapter.metrics, backend.upstream, _in_flight_of(backend)
            )
            for backend in router.backends
            if backend.config.scrapes_metrics
        ]
        if scrape.enabled and targets:
            loads = LoadScraper(
                targets,
                interval_s=scrape.interval_s,
                timeout_s=scrape.timeout_s,
                stale_after=scrape.stale_after,
                max_concurrency=scrape.max_concurrency,
                absent_retry_s=scrape.absent_retry_s,
            )
        tracer = Tracer(config.tracing) if config.tracing.enabled else None
        usage = KeyUsage(keys)
        keys.on_reload = lambda ring: usage.retain(ring.ids())
        rails = config.guardrails
        guardrails = Guardrails(rails.deny_patterns, rails.max_input_bytes, rails.max_n)
        # The client connects on first use: building it here neither blocks nor fails.
        redis = create_client(config.redis) if config.redis.url is not None else None
        limits = create_limits(
            config.limits, config.redis, redis, on_redis_change=metrics.redis_changed
        )
        return cls(
            config,
            keys,
            router,
            metrics,
            access_log,
            health,
            loads,
            tracer,
            redis=redis,
            limits=limits,
            guardrails=guardrails,
            usage=usage,
            admin_key_sha256=admin_key,
            connections=connections,
            key_watcher=KeyFileWatcher(keys, config.keys.reload_interval_s),
            tokens=tokens,
        )

    async def start(self) -> None:
        await self._start_shared_state()
        for backend in self.router.backends:
            await backend.adapter.start()
        # One round before serving, so that /ready and routing know from the first request.
        await self.health.check_all()
        await self.health.start()
        if self.loads is not None:
            await self.loads.start()
        if self.key_watcher is not None:
            await self.key_watcher.start()
        if self.tokens is not None:
            await self.tokens.start()  # a JWKS URL's first fetch (a failure is logged)

    async def aclose(self) -> None:
        if self.tracer is not None:
            # Flushing blocks for up to the export timeout: off the event loop.
            await asyncio.to_thread(self.tracer.shutdown)
        await self.health.aclose()
        if self.key_watcher is not None:
            await self.key_watcher.aclose()
        if self.tokens is not None:
            await self.tokens.aclose()
        if self.loads is not None:
            await self.loads.aclose()
        for backend in self.router.backends:
            await backend.adapter.aclose()
        if self.breaker_sync is not None:
            await self.breaker_sync.aclose()
        await self.limits.aclose()  # settles still queued go out first, within their deadline
        if self.redis is not None:
            await self.redis.aclose()

    async def _start_shared_state(self) -> None:
        """With redis.url: breakers shared by every process (never blocking a request)."""
        settings = self.config.redis
        if self.redis is None:
            return
        self.breaker_sync = BreakerSync(
            self.redis,
            [b.breaker for b in self.router.backends if b.breaker.config.shared],
            key_prefix=settings.key_prefix,
            timeout_s=settings.socket_timeout_s,
            health=RedisHealth("breaker", self.metrics.redis_changed),
            on_applied=self.metrics.breaker_applied,
        )
        await self.breaker_sync.start()

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Whether every model has a backend passing its health checks, and which do."""
        models: dict[str, object] = {}
        ready = True
        for route in self.router.routes:
            up = [b.name for b in route.backends if b.health.healthy]
            down = [b.name for b in route.backends if not b.health.healthy]
            ready = ready and bool(up)
            models[route.name] = {"live": up, "down": down}
        return ready, models


def _backend(
    config: GatewayConfig,
    model_index: int,
    backend_index: int,
    metrics: GatewayMetrics,
    budget: ByteBudget,
) -> Backend:
    route = config.models[model_index]
    backend = route.backends[backend_index]
    try:
        adapter = create_adapter(backend, route.timeouts, config.upstream, budget)
    except MissingCredential as exc:
        field = f"models[{model_index}].backends[{backend_index}].api_key_env"
        raise ConfigError(config.source, field, str(exc)) from None
    breaker = BackendBreaker(
        backend.name, route.breaker, route=route.name, on_change=metrics.breaker_changed
    )
    limiter = None
    adaptive = backend.adaptive_concurrency
    if adaptive.enabled:
        ceiling = backend.max_in_flight or backend.max_connections
        if adaptive.min_limit > ceiling:
            field = f"models[{model_index}].backends[{backend_index}].adaptive_concurrency"
            raise ConfigError(
                config.source, field + ".min_limit", f"exceeds the backend's limit of {ceiling}"
            )
        limiter = AdaptiveLimit(
            max_limit=ceiling,
            min_limit=adaptive.min_limit,
            initial_limit=adaptive.initial_limit or min(20, ceiling),
            tolerance=adaptive.tolerance,
            long_window=adaptive.long_window,
        )
    return Backend(backend, adapter, backend.model or route.name, breaker, limiter=limiter)


def _in_flight_of(backend: Backend) -> Callable[[], int]:
    return lambda: backend.in_flight


def _limit_of(backend: Backend) -> Callable[[], int]:
    return lambda: backend.concurrency_limit


def _retry_policy(config: RetryConfig) -> RetryPolicy:
    budget = RetryBudget(config.budget_ratio, config.budget_window_s, config.budget_min_per_s)
    return RetryPolicy(config, budget)


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


def create_app(gateway: Gateway) -> ASGIApp:
    router = gateway.router
    config = gateway.config

    def model_object(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "vgate"}

    def models_list(allowed: frozenset[str] | None) -> bytes:
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

    models_body = models_list(None)

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
        # A key limited to some models sees only those.
        body = models_body if caller.models is None else models_list(caller.models)
        return Response(body, media_type="application/json")

    async def retrieve_model(request: Request) -> Response:
        """`client.models.retrieve(name)`: one name or alias, as the list shows it."""
        caller = await models_caller(request)
        name = request.path_params["model"]
        route_for(router, caller, name)  # a key limited to some models sees only those
        return Response(orjson.dumps(model_object(name)), media_type="application/json")

    async def health(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def ready(request: Request) -> Response:
        is_ready, models = gateway.readiness()
        body = orjson.dumps({"status": "ready" if is_ready else "not_ready", "models": models})
        return Response(body, status_code=200 if is_ready else 503, media_type="application/json")

    async def metrics(request: Request) -> Response:
        return Response(
            gateway.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    openapi_body = openapi_json(config)  # built once: it depends on the config alone

    async def openapi(request: Request) -> Response:
        return Response(openapi_body, media_type="application/json")

    proxies = {
        endpoint.value: ProxyEndpoint(
            endpoint,
            router=router,
            keys=gateway.keys,
            max_body_bytes=config.server.max_body_bytes,
            guardrails=gateway.guardrails,
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
    if gateway.admin_key_sha256 is not None and gateway.usage is not None:
        routes += admin_routes(
            gateway.keys, gateway.usage, gateway.admin_key_sha256, gateway.limits
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
        exception_handlers={HTTPException: _http_error, GatewayError: _gateway_error},
        lifespan=lifespan,
    )
    # No redirects: Starlette's answer to a path with a slash too many (or too few) is a 307
    # whose Location is built from the Host header, an open redirect anyone could trigger.
    starlette.router.redirect_slashes = False
    return RequestContextMiddleware(
        Edge(proxies, starlette),
        metrics=gateway.metrics,
        access_log=gateway.access_log,
        tracer=gateway.tracer,
        usage=gateway.usage,
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: GatewayError
    if exc.status_code == 404:
        error = NotFound(f"Unknown path {clip(request.scope['path'])}.")
    elif exc.status_code == 405:
        error = MethodNotAllowed(
            f"Method {clip(request.method, 20)} is not allowed on {clip(request.scope['path'])}."
        )
    else:
        error = GatewayError(exc.detail)
        error.status = exc.status_code
    return await _gateway_error(request, error, extra_headers=exc.headers)


async def _gateway_error(
    request: Request, exc: Exception, extra_headers: Mapping[str, str] | None = None
) -> Response:
    assert isinstance(exc, GatewayError)
    record = request.scope.get("vgate.record")
    if record is not None:
        record.error = exc.code or exc.type
    headers = {**exc.headers, **(extra_headers or {})}
    return Response(
        exc.body(), status_code=exc.status, headers=headers, media_type="application/json"
    )
