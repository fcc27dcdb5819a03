"""The gateway's components, built from one configuration, started in order, closed in reverse.

Building (`Gateway.from_config`) connects to nothing and starts nothing, so it is also how
`vgate check-config` validates what the schema cannot (keys file, credentials). `start()`
takes these steps, each pushing its own close onto one `AsyncExitStack`:

1. what runs from being built has its close pushed first, to be closed last: with Redis
   (`redis.url`, `redis.sentinel` or `redis.cluster`) the clients (redis-py's pool, and with
   `redis.url` the request path's pipelined one) and the limit store and cache on them (the
   store first, so settles still queued go out before a client goes), and the tracer's
   export thread;
2. with Redis, the breaker sync, which reads the shared breakers before serving;
3. every backend's adapter (its connection pool);
4. one round of health checks, so that /ready and routing know from the first request,
   then the health loop;
5. the load scraper, the keys file watcher, the JWT verifier (a JWKS URL's first fetch),
   the config file watcher.

A step that raises unwinds the steps before it, in reverse, and the error propagates:
nothing started is left running. `aclose()` unwinds them all the same way, once.

`reload()` (SIGHUP, the config file changing, POST /admin/config/reload) reads the config
file again and `apply()`s it while serving: a new router over the backends that did not
change (the same objects) and new ones, whose adapters start and are probed before the
router takes traffic; the swap is one step, and each request keeps the router it started
with. Removed backends' adapters close once no request can reach them. What needs a
restart is reported and keeps its old value (gateway/runtime/reload.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from chaos.inject import Chaos, backend_routes
from gateway.config import GatewayConfig, LoadScrapeConfig, RedisConfig, load_config
from gateway.edge.accesslog import AccessLog
from gateway.edge.admin import admin_key_hash
from gateway.edge.auth import KeyRing
from gateway.edge.connections import ConnectionGuard, connection_limits
from gateway.edge.jwt_auth import TokenVerifier
from gateway.edge.keyfile import KeyFileWatcher
from gateway.edge.metrics import GatewayMetrics
from gateway.edge.tracing import Tracer
from gateway.edge.usage import KeyUsage
from gateway.errors import ConfigError
from gateway.router import Backend, Router, RouterHooks
from gateway.router.build import build_router
from gateway.runtime.reload import (
    Adapters,
    ConfigWatcher,
    ReloadReport,
    effective,
    restart_fields,
)
from policies.breaker_sync import BreakerSync
from policies.cache import ResponseCache, memory_cache
from policies.cache_redis import redis_cache
from policies.guardrails import Guardrails
from policies.health import HealthChecker, Probe
from policies.limits import LimitStore
from policies.limits_redis import FailoverLimits, create_limits
from policies.load import LoadScraper, ScrapeTarget
from policies.redis_pipelined import PipelinedRedis, request_path_client
from policies.redis_state import RedisClient, RedisHealth, create_client
from providers import AdapterFactory, create_adapter

logger = logging.getLogger("vgate.config")


class Component(Protocol):
    """What runs in the background or holds connections between start and aclose."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(kw_only=True)
class Gateway:
    """The runtime pieces built from one configuration."""

    config: GatewayConfig
    keys: KeyRing
    router: Router
    metrics: GatewayMetrics
    access_log: AccessLog | None
    health: HealthChecker
    loads: LoadScraper | None  # vLLM's own running/waiting, scraped as a load signal
    tracer: Tracer | None  # with tracing.enabled: request spans over OTLP
    # With redis.url, .sentinel or .cluster: one pooled client, from start to aclose.
    redis: RedisClient | None
    # With redis.url: the request path's own client (limits, cache lookups), auto-pipelined.
    fast_redis: PipelinedRedis | None
    cache: ResponseCache | None  # with cache.enabled; kept across reloads (restart to change)
    breaker_sync: BreakerSync | None  # with Redis: breakers shared by every process
    limits: LimitStore  # per key: rpm, tpm, day, in flight
    guardrails: Guardrails
    usage: KeyUsage  # per key, today: what /admin/keys/{id} reports
    admin_key_sha256: str | None  # None: no admin API
    key_watcher: KeyFileWatcher  # reloads the keys file when it changes
    # What one client connection may take; uvicorn's protocol for this gateway's server.
    connections: ConnectionGuard
    tokens: TokenVerifier | None  # with jwt.enabled: bearer JWTs beside API keys
    # Chaos experiments; their faults reach the adapters only with chaos.enabled (the master
    # switch, read at start-up), and without it the admin API may not start one.
    chaos: Chaos
    # Reloads the config on a change of its file, and on SIGHUP (`request_reload`).
    config_watcher: ConfigWatcher
    # The adapter factory, without chaos's wrapper: what a reload builds new backends with.
    adapter_factory: AdapterFactory
    adapters: Adapters = field(default_factory=Adapters)  # started and not yet closed
    # Set by `drain()` (SIGTERM): /ready answers 503 from then on, while everything serves.
    draining: bool = field(default=False, init=False)
    _started: AsyncExitStack | None = field(default=None, init=False, repr=False)
    _reloading: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    @classmethod
    def from_config(
        cls,
        config: GatewayConfig,
        *,
        adapters: AdapterFactory = create_adapter,
        log_stream: BinaryIO | None = None,
    ) -> Gateway:
        """Build every component; connects to nothing. A ConfigError names what is wrong.

        `adapters` makes each backend's adapter (`providers.AdapterFactory`): tests pass
        a fake, chaos a wrapper around the real one. `log_stream` takes the access log
        (stdout without one).
        """
        keys = _key_ring(config)
        admin_key = admin_key_hash(config.admin, config.source)
        tokens = (
            TokenVerifier.from_config(config.jwt, config.source) if config.jwt.enabled else None
        )
        metrics = _metrics(config)
        chaos = Chaos(config.chaos, on_injected=metrics.chaos_injected)
        # The client connects on first use: building it here neither blocks nor fails.
        redis = create_client(config.redis, config.source) if config.redis.enabled else None
        fast_redis = request_path_client(config.redis)
        cache = _response_cache(config, redis, fast_redis, metrics)
        router = build_router(
            config,
            adapters=_with_chaos(adapters, chaos, config),
            hooks=_router_hooks(metrics),
            on_breaker_change=metrics.breaker_changed,
            cache=cache,
        )
        connections = ConnectionGuard(connection_limits(config.server))
        _watch(metrics, router, connections)
        usage = KeyUsage(keys)
        keys.on_reload = lambda ring: usage.retain(ring.ids())
        limits = create_limits(
            config.limits, config.redis, fast_redis or redis, on_redis_change=metrics.redis_changed
        )
        metrics.watch_limits(limits)
        gateway: Gateway
        watcher = ConfigWatcher(
            _config_path(config),
            config.server.config_reload_interval_s,
            lambda trigger: gateway.reload_logged(trigger),
        )
        gateway = cls(
            config=config,
            keys=keys,
            router=router,
            metrics=metrics,
            access_log=_access_log(config, log_stream),
            health=_health_checker(router, metrics),
            loads=_load_scraper(config.load_scrape, router),
            tracer=Tracer(config.tracing) if config.tracing.enabled else None,
            redis=redis,
            fast_redis=fast_redis,
            cache=cache,
            breaker_sync=_breaker_sync(config.redis, redis, router, metrics),
            limits=limits,
            guardrails=Guardrails.from_config(config.guardrails),
            usage=usage,
            admin_key_sha256=admin_key,
            key_watcher=KeyFileWatcher.from_config(keys, config.keys),
            connections=connections,
            tokens=tokens,
            chaos=chaos,
            config_watcher=watcher,
            adapter_factory=adapters,
        )
        return gateway

    async def start(self) -> None:
        """Start every component in order (see the module's note). If a step raises, the
        steps before it are closed in reverse and the error propagates."""
        if self._started is not None:
            raise RuntimeError("the gateway is already started")
        async with AsyncExitStack() as stack:
            self._close_last(stack)
            await _start(stack, self.breaker_sync)
            stack.push_async_callback(self.adapters.aclose)
            for backend in self.router.backends:
                await self.adapters.start(backend.adapter)
            await self.health.check_all()
            await _start(stack, self.health)
            await _start(stack, self.loads)
            await _start(stack, self.key_watcher)
            await _start(stack, self.tokens)
            await _start(stack, self.config_watcher)
            self._started = stack.pop_all()

    async def aclose(self) -> None:
        """Close what `start` started, in reverse; closing twice closes nothing more."""
        started, self._started = self._started, None
        if started is not None:
            await started.aclose()

    def _close_last(self, stack: AsyncExitStack) -> None:
        """What runs from being built (the Redis client's pool, the limit store on it, the
        tracer's export thread) is closed after everything started on top of it."""
        if self.redis is not None:
            stack.push_async_callback(self.redis.aclose)
        if self.fast_redis is not None:
            stack.push_async_callback(self.fast_redis.aclose)
        if self.cache is not None:  # before the client: fills in flight go out first
            stack.push_async_callback(self.cache.store.aclose)
        # Before the client: settles still queued go out first, within their deadline.
        stack.push_async_callback(self.limits.aclose)
        if self.tracer is not None:
            # Flushing blocks for up to the export timeout: off the event loop.
            stack.push_async_callback(asyncio.to_thread, self.tracer.shutdown)

    def request_reload(self, trigger: str = "SIGHUP") -> None:
        """Reload the config soon: safe from a signal handler or another thread."""
        self.config_watcher.request(trigger)

    async def reload_logged(self, trigger: str) -> None:
        """`reload`, for the triggers nobody answers (the file, SIGHUP): what happened is
        logged and counted, never raised."""
        with contextlib.suppress(Exception):  # logged and counted by reload
            await self.reload(trigger)

    async def reload(self, trigger: str = "admin") -> ReloadReport:
        """Read the config file again and `apply` it. A `ConfigError` (file, field, reason)
        refuses it, as does a new backend's adapter failing to start: logged, counted, and
        raised, with the config in force as it was."""
        async with self._reloading:
            watcher = self.config_watcher
            try:
                if watcher.path is None:
                    raise ConfigError(self.config.source, "", "the config was not read from a file")
                # Before reading: an invalid file is not read again until it changes again.
                watcher.loaded(watcher.signature())
                new = await asyncio.to_thread(load_config, watcher.path)
                report = await self._apply(new, trigger)
            except Exception as error:
                self.metrics.config_reloaded(False)
                logger.error(
                    "config reload (%s) refused; the config in force stays: %s", trigger, error
                )
                raise
            self.metrics.config_reloaded(True)
            for warning in new.warnings:
                logger.warning("%s", warning)
            logger.info(
                "config reload (%s) applied from %s: %s", trigger, new.source, report.summary()
            )
            return report

    async def apply(self, new: GatewayConfig, trigger: str = "apply") -> ReloadReport:
        """Serve `new` from now on (what needs a restart aside); raises as `reload` does,
        leaving the config in force, but neither logs nor counts."""
        async with self._reloading:
            return await self._apply(new, trigger)

    async def _apply(self, new: GatewayConfig, trigger: str) -> ReloadReport:
        if self._started is None:
            raise RuntimeError("the gateway is not started")
        old_config, old_router = self.config, self.router
        config = effective(old_config, new)
        keys = await asyncio.to_thread(_key_ring, config)  # the keys must name what exists
        guardrails = Guardrails.from_config(config.guardrails)
        router = build_router(
            config,
            adapters=_with_chaos(self.adapter_factory, self.chaos, config),
            hooks=old_router.hooks,
            on_breaker_change=self.metrics.breaker_changed,
            reuse=old_router,
        )
        before, after = set(old_router.backends), set(router.backends)
        added = [backend for backend in router.backends if backend not in before]
        removed = [backend for backend in old_router.backends if backend not in after]
        started: list[Backend] = []
        try:
            for backend in added:
                await self.adapters.start(backend.adapter)
                started.append(backend)
            # New backends are probed before they take traffic, as at start-up.
            await HealthChecker(_probes(router, only=set(added))).check_all()
        except BaseException:
            for backend in reversed(started):
                await self.adapters.close(backend.adapter)
            raise
        self.metrics.extend(
            [model.name for model in config.models], [backend.name for backend in after]
        )
        for backend in added:
            self.metrics.health_changed(backend.name, backend.health.healthy)
        chaos_replaced = self._replace_chaos_experiments(old_config, config)
        # The swap: one step, no await in it. Requests started before keep the old router.
        self.config, self.router, self.guardrails = config, router, guardrails
        self.keys.adopt(keys)  # later keys-file edits may name the new models and backends
        if isinstance(self.limits, FailoverLimits):
            self.limits.mode = config.limits.redis_failure
        if self.breaker_sync is not None:
            self.breaker_sync.replace(b.breaker for b in router.backends if b.breaker.config.shared)
        self.health.replace_probes(_probes(router))
        self.metrics.watch_concurrency_limits((b.name, _limit_of(b)) for b in router.backends)
        self.metrics.watch_upstream_queues((b.name, b.upstream) for b in router.backends)
        self._retarget_loads(config, router)
        if removed:
            grace = max(route.timeouts.total_s for route in old_router.routes)
            self.adapters.retire(removed, old_router, grace + 1.0)
        del old_router
        return ReloadReport(
            source=new.source,
            trigger=trigger,
            added=tuple(backend.name for backend in added),
            removed=tuple(backend.name for backend in removed),
            kept=tuple(backend.name for backend in router.backends if backend in before),
            restart_required=tuple(restart_fields(old_config, new)),
            chaos_experiments=chaos_replaced,
        )

    def _replace_chaos_experiments(self, old: GatewayConfig, new: GatewayConfig) -> bool:
        """With chaos enabled, the config's experiments replace those running (those an
        admin started at run time stop too); whether they changed."""
        if not new.chaos.enabled or old.chaos.experiments == new.chaos.experiments:
            return False
        for running in self.chaos.experiments():
            self.chaos.stop(running["name"])
        for experiment in new.chaos.experiments:
            self.chaos.start(experiment)
        return True

    def _retarget_loads(self, config: GatewayConfig, router: Router) -> None:
        targets = _scrape_targets(router)
        if self.loads is not None:
            self.loads.replace_targets(targets)
        elif targets and config.load_scrape.enabled and self._started is not None:
            self.loads = LoadScraper.from_config(targets, config.load_scrape)
            self._started.push_async_callback(self.loads.aclose)
            self.loads.replace_targets(targets)  # starts its task: the gateway runs

    def drain(self) -> None:
        """Leave rotation: /ready answers 503 from now on, so load balancers stop sending new
        requests here, while everything else serves on (the server's drain delay, before its
        listener closes). A flag write: safe from a signal handler."""
        self.draining = True

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Whether every model has a backend passing its health checks, and which do; never
        ready while draining."""
        models: dict[str, object] = {}
        ready = not self.draining
        for route in self.router.routes:
            up = [b.name for b in route.backends if b.health.healthy]
            down = [b.name for b in route.backends if not b.health.healthy]
            ready = ready and bool(up)
            models[route.name] = {"live": up, "down": down}
        return ready, models


async def _start(stack: AsyncExitStack, component: Component | None) -> None:
    """Start `component` (if there is one) and have `stack` close it."""
    if component is None:
        return
    await component.start()
    stack.push_async_callback(component.aclose)


def _response_cache(
    config: GatewayConfig,
    redis: RedisClient | None,
    fast_redis: PipelinedRedis | None,
    metrics: GatewayMetrics,
) -> ResponseCache | None:
    """With cache.enabled: this process's store, or the shared one on the Redis client."""
    settings = config.cache
    if not settings.enabled:
        return None
    if settings.backend == "redis":
        assert redis is not None  # the config requires redis.url, .sentinel or .cluster
        cache = redis_cache(
            settings,
            config.redis,
            redis,
            on_redis_change=metrics.redis_changed,
            fast=fast_redis,
        )
    else:
        cache = memory_cache(settings)
    metrics.watch_cache(cache)
    return cache


def _key_ring(config: GatewayConfig) -> KeyRing:
    return KeyRing.load(
        config.keys.file,
        backends={backend.name for model in config.models for backend in model.backends},
        models={name: m.name for m in config.models for name in (m.name, *m.aliases)},
    )


def _metrics(config: GatewayConfig) -> GatewayMetrics:
    return GatewayMetrics(
        [model.name for model in config.models],
        [backend.name for model in config.models for backend in model.backends],
        legacy_names=config.metrics.legacy_names,
    )


def _router_hooks(metrics: GatewayMetrics) -> RouterHooks:
    return RouterHooks(
        on_retry=lambda route, delay: metrics.retries.labels(route).inc(),
        on_fallback=lambda old, new: metrics.fallbacks.labels(old, new).inc(),
        on_resume=metrics.stream_resumed,
    )


def _watch(metrics: GatewayMetrics, router: Router, connections: ConnectionGuard) -> None:
    """Gauges read at scrape time from the components themselves."""
    metrics.watch_admission(router.admission)
    metrics.watch_connections(connections)
    metrics.watch_concurrency_limits((b.name, _limit_of(b)) for b in router.backends)
    metrics.watch_upstream_queues((b.name, b.upstream) for b in router.backends)


def _access_log(config: GatewayConfig, stream: BinaryIO | None) -> AccessLog | None:
    if not config.server.access_log:
        return None
    return AccessLog(
        stream if stream is not None else sys.stdout.buffer,
        flush_interval_s=config.server.access_log_flush_s,
    )


def _health_checker(router: Router, metrics: GatewayMetrics) -> HealthChecker:
    return HealthChecker(_probes(router), on_change=metrics.health_changed)


def _probes(router: Router, only: set[Backend] | None = None) -> list[Probe]:
    """A probe per backend of `router` (of those in `only`, if given)."""
    return [
        Probe(backend.name, route.config.health, backend.adapter.health, backend.health)
        for route in router.routes
        for backend in route.backends
        if only is None or backend in only
    ]


def _load_scraper(scrape: LoadScrapeConfig, router: Router) -> LoadScraper | None:
    targets = _scrape_targets(router)
    if not scrape.enabled or not targets:
        return None
    return LoadScraper.from_config(targets, scrape)


def _scrape_targets(router: Router) -> list[ScrapeTarget]:
    return [
        ScrapeTarget(
            backend.name, backend.adapter.metrics, backend.upstream, _in_flight_of(backend)
        )
        for backend in router.backends
        if backend.config.scrapes_metrics
    ]


def _with_chaos(adapters: AdapterFactory, chaos: Chaos, config: GatewayConfig) -> AdapterFactory:
    """With chaos enabled, the factory's adapters wrapped to act its experiments' faults."""
    if not config.chaos.enabled:
        return adapters
    return chaos.wrap(adapters, backend_routes(config))


def _config_path(config: GatewayConfig) -> Path | None:
    """The file `config` was read from, if it was (a config built in memory was not)."""
    path = Path(config.source)
    return path if config.source != "<memory>" and path.is_file() else None


def _breaker_sync(
    settings: RedisConfig, redis: RedisClient | None, router: Router, metrics: GatewayMetrics
) -> BreakerSync | None:
    """With a Redis client: the breakers marked shared, in step with every other process
    (built here, it connects only when started, and never blocks a request)."""
    if redis is None:
        return None
    return BreakerSync.from_config(
        redis,
        [b.breaker for b in router.backends if b.breaker.config.shared],
        settings,
        health=RedisHealth("breaker", metrics.redis_changed),
        on_applied=metrics.breaker_applied,
    )


def _in_flight_of(backend: Backend) -> Callable[[], int]:
    return lambda: backend.in_flight


def _limit_of(backend: Backend) -> Callable[[], int]:
    return lambda: backend.concurrency_limit
