"""The Redis side of shared state: one pooled client per process, and its reachability.

Redis is never on a request's path here: whatever shares state through it does so from
background tasks, and a process that cannot reach it keeps deciding from its own view.
Every call is bounded by `socket_timeout_s`. The client retries a call only once, at once,
and only on a connection error: a pooled connection that died with a restarted server is
replaced without a false alarm; a timeout is never retried (callers bound their calls).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.config import RedisConfig

logger = logging.getLogger("vgate.redis")

# What a failed or slow Redis call raises: the client's errors, a socket's, a timeout's.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


def create_client(config: RedisConfig) -> Redis:
    """A pooled asyncio client; it connects on first use, so this never blocks or fails
    on an unreachable server."""
    if config.url is None:
        raise ValueError("redis.url is not set")
    return Redis.from_url(
        config.url,
        socket_timeout=config.socket_timeout_s,
        socket_connect_timeout=config.socket_timeout_s,
        max_connections=config.max_connections,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        client_name="vgate",
    )


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
