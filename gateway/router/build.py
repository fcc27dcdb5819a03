"""Build the router from configuration: a route per model, a backend per backend entry.

The adapters come from the factory passed in (`providers.AdapterFactory`): the real
ones by default, a fake in tests, a fault-injecting wrapper in chaos. What the router
reports as it works goes to `hooks` and `on_breaker_change`; counting it is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.config import BackendConfig, GatewayConfig
from gateway.errors import ConfigError, MissingCredential
from gateway.router import AnswerBounds, Backend, Route, Router, RouterHooks
from policies.adaptive import AdaptiveLimit
from policies.admission import Admission
from policies.breaker import BackendBreaker
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
) -> Router:
    """The router `config` describes; a backend the factory cannot build (a credential
    missing) or an impossible adaptive limit is a ConfigError naming its field."""
    # One bound on the upstream answers held in memory, shared by every backend.
    budget = ByteBudget(config.upstream.max_buffered_bytes)
    routes = [
        Route(
            model,
            [
                _backend(
                    config, m, b, adapters=adapters, budget=budget, on_change=on_breaker_change
                )
                for b in range(len(model.backends))
            ],
            RetryPolicy.from_config(model.retries),
        )
        for m, model in enumerate(config.models)
    ]
    return Router(
        routes,
        admission=Admission.from_config(config.server),
        answers=AnswerBounds(config.upstream.max_body_bytes, budget),
        hooks=hooks,
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
