"""Build the router from configuration: a route per model, a backend per backend entry.

The adapters come from the factory passed in (`providers.AdapterFactory`): the real
ones by default, a fake in tests, a fault-injecting wrapper in chaos. What the router
reports as it works goes to `hooks` and `on_breaker_change`; counting it is the caller's.

Rebuilt on a config reload with `reuse`, the router in force: its admission and its bound on
buffered answers carry over, and so does every backend that did not change (the same
`Backend` object: adapter and pool, breaker, health, adaptive limit, requests in flight).
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.config import BackendConfig, GatewayConfig, ModelRoute
from gateway.errors import ConfigError, MissingCredential
from gateway.router import AnswerBounds, Backend, Route, Router, RouterHooks
from policies.adaptive import AdaptiveLimit
from policies.admission import Admission
from policies.breaker import BackendBreaker
from policies.cache import ResponseCache
from policies.retry import RetryPolicy
from providers import AdapterFactory, create_adapter
from providers.http1 import ByteBudget

BreakerListener = Callable[[str, str, str], None]  # backend, old state, new state


def build_router(
    config: GatewayConfig,
    *,
    adapters: AdapterFactory = create_adapter,
    hooks: RouterHooks | None = None,
    on_breaker_change: BreakerListener | None = None,
    reuse: Router | None = None,
    cache: ResponseCache | None = None,
) -> Router:
    """The router `config` describes; a backend the factory cannot build (a credential
    missing) or an impossible adaptive limit is a ConfigError naming its field.

    With `reuse` (the router in force, on a reload): its admission and answer bounds are
    kept, and a backend of the same name on a route of the same name, whose own config and
    the route settings it depends on (timeouts, breaker) are unchanged, is that router's
    `Backend` object, its adapter not asked of the factory again; so is a route's retry
    policy (its budget) where the route's retries are unchanged, and so is its response
    cache (`cache`: the process's, where `cache.enabled`).
    """
    kept = _reusable(reuse)
    retries = {route.name: route.retry for route in reuse.routes} if reuse else {}
    old_routes = {route.name: route.config for route in reuse.routes} if reuse else {}
    # One bound on the upstream answers held in memory, shared by every backend.
    budget = reuse.answers.budget if reuse else ByteBudget(config.upstream.max_buffered_bytes)
    routes = []
    for m, model in enumerate(config.models):
        backends = []
        for b, backend in enumerate(model.backends):
            same = kept.get((model.name, backend.name))
            if same is not None and _unchanged(same, backend, model):
                backends.append(same[0])
            else:
                backends.append(
                    _backend(
                        config, m, b, adapters=adapters, budget=budget, on_change=on_breaker_change
                    )
                )
        old = old_routes.get(model.name)
        retry = retries[model.name] if old is not None and old.retries == model.retries else None
        routes.append(Route(model, backends, retry or RetryPolicy.from_config(model.retries)))
    return Router(
        routes,
        admission=reuse.admission if reuse else Admission.from_config(config.server),
        answers=reuse.answers if reuse else AnswerBounds(config.upstream.max_body_bytes, budget),
        hooks=hooks if hooks is not None or reuse is None else reuse.hooks,
        cache=reuse.cache if reuse is not None else cache,
    )


def _reusable(router: Router | None) -> dict[tuple[str, str], tuple[Backend, ModelRoute]]:
    """Each backend of `router` by (route name, backend name), with its route's config."""
    if router is None:
        return {}
    return {
        (route.name, backend.name): (backend, route.config)
        for route in router.routes
        for backend in route.backends
    }


def _unchanged(kept: tuple[Backend, ModelRoute], backend: BackendConfig, route: ModelRoute) -> bool:
    """Whether the backend `kept` is what `backend` on `route` would build: its own config,
    and what its adapter (timeouts) and breaker (breaker) were built with."""
    old, old_route = kept
    return (
        old.config == backend
        and old_route.timeouts == route.timeouts
        and old_route.breaker == route.breaker
    )


def _backend(
    config: GatewayConfig,
    model_index: int,
    backend_index: int,
    *,
    adapters: AdapterFactory,
    budget: ByteBudget,
    on_change: BreakerListener | None,
) -> Backend:
    route = config.models[model_index]
    backend = route.backends[backend_index]
    field = f"models[{model_index}].backends[{backend_index}]"
    try:
        adapter = adapters(backend, route.timeouts, config.upstream, budget)
    except MissingCredential as exc:
        raise ConfigError(config.source, f"{field}.api_key_env", str(exc)) from None
    breaker = BackendBreaker(backend.name, route.breaker, route=route.name, on_change=on_change)
    limiter = _limiter(backend, config.source, f"{field}.adaptive_concurrency")
    return Backend(backend, adapter, backend.model or route.name, breaker, limiter=limiter)


def _limiter(backend: BackendConfig, source: str, field: str) -> AdaptiveLimit | None:
    """With adaptive_concurrency: a limit that follows latency, below the backend's own."""
    adaptive = backend.adaptive_concurrency
    if not adaptive.enabled:
        return None
    ceiling = backend.max_in_flight or backend.max_connections
    if adaptive.min_limit > ceiling:
        raise ConfigError(source, f"{field}.min_limit", f"exceeds the backend's limit of {ceiling}")
    return AdaptiveLimit.from_config(adaptive, ceiling)
