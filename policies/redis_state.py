"""The Redis side of shared state: one pooled client per process, and its reachability.

Redis is never on a request's path here: whatever shares state through it does so from
background tasks, and a process that cannot reach it keeps deciding from its own view.
Every call is bounded by `socket_timeout_s`. The client retries a call only once, at once,
and only on a connection error: a pooled connection that died with a restarted server is
replaced without a false alarm; a timeout is never retried (callers bound their calls).

With `redis.sentinel` the client follows the primary that the sentinels name: a new
connection asks them first (each ask bounded by `socket_timeout_s`), and a connection to a
primary that died or was demoted fails and is replaced by one to the new primary, so a
failover looks to the components like a short outage, with the same bounds.

With `redis.cluster` the client is redis-py's `RedisCluster`: it learns the slots from the
listed nodes on first use and sends each command to the primary of its key's slot,
following MOVED redirects and refreshing its view after a connection error. A command
touching several keys must keep them on one slot, so each component names its keys with a
hash tag (`{...}`) wherever a script, MGET or transaction spans more than one key.
`max_connections` then bounds each node's pool.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeAlias

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from gateway.config import RedisClusterConfig, RedisConfig, RedisSentinelConfig
from gateway.errors import ConfigError

logger = logging.getLogger("vgate.redis")

# What a failed or slow Redis call raises: the client's errors, a socket's, a timeout's;
# a cluster's own (no slot covered, no node reachable) are not RedisErrors.
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    RedisError,
    RedisClusterException,
    OSError,
    TimeoutError,
)

# What create_client returns; both take the same commands, scripts and pipelines.
RedisClient: TypeAlias = Redis | RedisCluster


def is_cluster(redis: object) -> bool:
    """Whether `redis` talks to a Redis Cluster (keys on several nodes)."""
    return isinstance(redis, RedisCluster)


def create_client(config: RedisConfig, source: str = "configuration") -> RedisClient:
    """A pooled asyncio client, on `redis.url`, through `redis.sentinel` or to
    `redis.cluster`; it connects on first use, so this never blocks or fails on an
    unreachable server. A password variable that is not set is a ConfigError naming the
    field (`source`: the config file)."""
    options: dict[str, Any] = {
        "socket_timeout": config.socket_timeout_s,
        "socket_connect_timeout": config.socket_timeout_s,
        "max_connections": config.max_connections,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "client_name": "vgate",
    }
    if config.sentinel is not None:
        return _sentinel_client(config.sentinel, options, source)
    if config.cluster is not None:
        return _cluster_client(config.cluster, options, source)
    if config.url is None:
        raise ValueError("redis.url is not set")
    return Redis.from_url(config.url, **options)


class _SentinelManagedRedis(Redis):
    """The primary's client, which also closes its sentinels' connections when closed
    (redis-py leaves those to whoever made the `Sentinel`)."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        sentinels: Sentinel = self.connection_pool.sentinel_manager  # type: ignore[attr-defined]
        try:
            await super().aclose(close_connection_pool)
        finally:
            await sentinels.aclose()


def _sentinel_client(config: RedisSentinelConfig, options: dict[str, Any], source: str) -> Redis:
    password = _secret(config.password_env, "redis.sentinel.password_env", source)
    sentinel_password = _secret(
        config.sentinel_password_env, "redis.sentinel.sentinel_password_env", source
    )
    # Asking the sentinels is bounded as every other call is; one that does not answer is
    # skipped for the next (redis-py asks them in turn), never retried.
    sentinel_options: dict[str, Any] = {
        "socket_timeout": options["socket_timeout"],
        "socket_connect_timeout": options["socket_connect_timeout"],
        "retry": Retry(NoBackoff(), 0),
    }
    if sentinel_password is not None:
        sentinel_options["password"] = sentinel_password
    sentinels = Sentinel(config.addresses(), sentinel_kwargs=sentinel_options)
    return sentinels.master_for(  # type: ignore[no-any-return]
        config.service_name,
        redis_class=_SentinelManagedRedis,
        db=config.db,
        password=password,
        ssl=config.ssl,
        **options,
    )


def _cluster_client(
    config: RedisClusterConfig, options: dict[str, Any], source: str
) -> RedisCluster:
    password = _secret(config.password_env, "redis.cluster.password_env", source)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in config.addresses()],
        password=password,
        username=config.username,
        ssl=config.ssl,
        # The client works on with the slots that are served: whether a node answers for
        # its slots while others are uncovered is the servers' setting
        # (cluster-require-full-coverage), not the client's to refuse.
        require_full_coverage=False,
        **options,
    )


def _secret(variable: str | None, field: str, source: str) -> str | None:
    if variable is None:
        return None
    value = os.environ.get(variable, "")
    if not value:
        raise ConfigError(source, field, f"environment variable {variable} is not set")
    return value


class RedisHealth:
    """Whether one component reaches Redis: an outage is logged once when it starts
    (warning) and once when it ends (info), and reported to `on_change` once each way."""

    def __init__(self, component: str, on_change: Callable[[str, bool], None] | None = None):
        self.component = component
        self.up: bool | None = None  # None until the first call tells
        self._on_change = on_change
        self._down_since = 0.0

    def ok(self) -> None:
        if self.up is True:
            return
        if self.up is False:
            logger.info(
                "redis reachable again for %s after %.1f s",
                self.component,
                time.monotonic() - self._down_since,
            )
        self.up = True
        if self._on_change is not None:
            self._on_change(self.component, True)

    def failed(self, error: BaseException) -> None:
        if self.up is False:
            return
        self.up = False
        self._down_since = time.monotonic()
        logger.warning(
            "redis unreachable for %s (%s); this process goes on with its own state",
            self.component,
            describe(error),
        )
        if self._on_change is not None:
            self._on_change(self.component, False)


def describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
