"""The response cache in Redis, shared by every gateway process (see policies/cache.py).

Each entry is one Redis string, `{prefix}:cache:<route tag>:<scope tag>:<hash>` (hashes
only: never a prompt or a key's name), holding the time it was made and the answer's JSON,
with the entry's TTL. A lookup is one GET, bounded by `cache.redis_timeout_s`; a fill is a
SET in a background task, never waited for. Redis failing or slow is not the request's
problem: the lookup raises `CacheUnavailable` (the request goes upstream), the outage is
logged once each way (`RedisHealth`) and counted, and while it lasts one lookup per
`probe_interval_s` tries Redis while the others bypass at once; the first that gets an
answer ends it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from gateway.config import CacheConfig, RedisConfig
from policies.cache import CacheUnavailable, Entry, ResponseCache
from policies.redis_state import REDIS_ERRORS, RedisHealth

logger = logging.getLogger("vgate.cache")
MAX_PENDING_FILLS = 256  # fills in flight at once; past it, a fill is dropped (counted)
_SCAN_LIMIT = 100_000  # keys an admin count or clear walks at most


class RedisStore:
    def __init__(
        self,
        redis: Redis,
        *,
        key_prefix: str,
        timeout_s: float,
        probe_interval_s: float,
        health: RedisHealth,
        max_calls: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.prefix = f"{key_prefix}:cache:"
        self.timeout_s = timeout_s
        self.probe_interval_s = probe_interval_s
        self.health = health
        self.evictions = 0  # Redis evicts by its own policy: not seen from here
        self.dropped_fills = 0
        self.failed_fills = 0
        self._clock = clock
        self._next_probe = 0.0
        self._pending: set[asyncio.Task[None]] = set()
        # The pool is shared with the limits and the breakers, and refuses a call beyond its
        # size rather than waiting: the cache takes at most a few of its connections.
        self._calls = asyncio.Semaphore(max_calls)

    def _usable(self) -> bool:
        """Whether to try Redis now: always while it answers; while it is down, once per
        probe interval."""
        if self.health.up is not False:
            return True
        now = self._clock()
        if now < self._next_probe:
            return False
        self._next_probe = now + self.probe_interval_s
        return True

    def _failed(self, error: BaseException) -> None:
        self._next_probe = self._clock() + self.probe_interval_s
        self.health.failed(error)

    async def get(self, key: str) -> Entry | None:
        if not self._usable():
            raise CacheUnavailable
        try:
            async with asyncio.timeout(self.timeout_s), self._calls:
                raw = await self.redis.get(self.prefix + key)
        except REDIS_ERRORS as error:
            self._failed(error)
            raise CacheUnavailable from None
        self.health.ok()
        if raw is None:
            return None
        data = raw.encode() if isinstance(raw, str) else raw
        created, _, body = data.partition(b"\n")
        try:
            return Entry(body, float(created))
        except ValueError:
            return None  # not ours: never served

    def put(self, key: str, body: bytes, ttl_s: float) -> None:
        if self.health.up is False:
            return  # lookups probe; fills wait for Redis to be back
        if len(self._pending) >= MAX_PENDING_FILLS:
            self.dropped_fills += 1
            return
        value = f"{time.time():.3f}\n".encode() + body
        task = asyncio.get_running_loop().create_task(
            self._set(self.prefix + key, value, max(1, round(ttl_s * 1000)))
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _set(self, key: str, value: bytes, ttl_ms: int) -> None:
        try:
            # A fill may take the connection's own timeout: nobody waits for it.
            async with self._calls:
                await self.redis.set(key, value, px=ttl_ms)
        except REDIS_ERRORS as error:
            self.failed_fills += 1
            self._failed(error)

    async def _keys(self, route_tag: str | None, scope_tag: str | None) -> list[bytes]:
        pattern = f"{self.prefix}{route_tag or '*'}:{scope_tag or '*'}:*"
        found: list[bytes] = []
        async for key in self.redis.scan_iter(match=pattern, count=1000):
            found.append(key)
            if len(found) >= _SCAN_LIMIT:
                break
        return found

    async def clear(self, route_tag: str | None = None, scope_tag: str | None = None) -> int:
        try:
            keys = await self._keys(route_tag, scope_tag)
            for start in range(0, len(keys), 1000):
                await self.redis.unlink(*keys[start : start + 1000])
        except REDIS_ERRORS as error:
            self._failed(error)
            raise CacheUnavailable from None
        return len(keys)

    async def stats(self) -> dict[str, Any]:
        try:
            keys = await self._keys(None, None)
            size = 0
            for start in range(0, len(keys), 1000):
                pipe = self.redis.pipeline(transaction=False)
                for key in keys[start : start + 1000]:
                    pipe.strlen(key)
                size += sum(await pipe.execute())
        except REDIS_ERRORS as error:
            self._failed(error)
            raise CacheUnavailable from None
        return {"entries": len(keys), "bytes": size}

    def size(self) -> tuple[int, int] | None:
        return None  # counted by GET /admin/cache, which walks the keys

    async def aclose(self) -> None:
        """Let fills in flight finish (each bounded by the client's socket timeout)."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=2.0)


def redis_cache(
    config: CacheConfig,
    redis_config: RedisConfig,
    redis: Redis,
    *,
    on_redis_change: Callable[[str, bool], None] | None = None,
) -> ResponseCache:
    store = RedisStore(
        redis,
        key_prefix=redis_config.key_prefix,
        timeout_s=config.redis_timeout_s,
        probe_interval_s=config.probe_interval_s,
        health=RedisHealth("cache", on_redis_change),
        max_calls=max(2, redis_config.max_connections // 4),
    )
    return ResponseCache(config, store)
