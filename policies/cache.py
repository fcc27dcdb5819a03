"""The response cache's stores, and its counters.

An entry is one complete answer: the JSON body of a non-streaming response (a stream's is
assembled into one), and the wall-clock time it was made, for `Age`. Keys come from
`gateway.wire.cachekey` (`<route tag>:<scope tag>:<hash>`); the router decides what is
looked up and what is kept (gateway/router/caching.py); a store only keeps.

- `MemoryStore`: this process's LRU, bounded by entries (`cache.maxsize`) and by the bytes
  of its answers (`cache.max_bytes`), each entry living `ttl_s` (by a clock tests can set).
- `policies.cache_redis.RedisStore`: shared by every process through the `redis:`
  connection, entries expiring by Redis TTL; a lookup that fails or is slow raises
  `CacheUnavailable` (the request goes upstream as if uncached), a fill never waits.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.config import CacheConfig


class CacheUnavailable(Exception):
    """The store could not answer in time: the request bypasses the cache."""


@dataclass(frozen=True, slots=True)
class Entry:
    body: bytes  # the answer, as a non-streaming response's JSON body
    created: float  # wall-clock seconds (time.time()) when it was kept


# What a lease's value starts with: how the process holding it answers. One that streams
# relays its events through the key's flight stream (gateway/router/relay.py), which a
# streaming follower in another process reads as they come.
STREAMING = "s"
WHOLE = "w"


@dataclass(frozen=True, slots=True)
class Lookup:
    """What one lookup that may claim found: the key's entry; else, on a miss, the key's
    lease taken by it (`lease`: this process makes the call) or held by another process
    (`holder`: that lease's value); neither where the store could not say (not shared)."""

    entry: Entry | None = None
    lease: str = ""
    holder: str | None = None


class CacheStore(Protocol):
    evictions: int  # entries dropped to make room (not those expired)

    async def get(self, key: str) -> Entry | None:
        """The entry under `key`, or None; raises `CacheUnavailable` when it cannot tell."""
        ...

    async def get_many(self, keys: list[str]) -> list[Entry | None]:
        """The entries under `keys`, in order (one round trip); raises as `get` does."""
        ...

    def put(self, key: str, body: bytes, ttl_s: float) -> None:
        """Keep `body` under `key` for `ttl_s`; never waits (a shared store writes in the
        background, and a write that fails is dropped)."""
        ...

    async def clear(self, route_tag: str | None = None, scope_tag: str | None = None) -> int:
        """Drop every entry, or those of one route or one scope (their tags); how many."""
        ...

    async def stats(self) -> dict[str, Any]:
        """{"entries": int, "bytes": int} now (a shared store: as far as it could count)."""
        ...

    def size(self) -> tuple[int, int] | None:
        """(entries, bytes) at no cost, for the metrics; None where it would cost a walk."""
        ...

    async def aclose(self) -> None: ...


class SharedStore(CacheStore, Protocol):
    """A store every process shares, which also coalesces across them: one process at a
    time holds a key's lease and makes its call; the others wait for its entry."""

    def put(self, key: str, body: bytes, ttl_s: float, lease: str = "") -> None: ...

    stream_readers: asyncio.Semaphore  # followers reading another process's stream at once
    block_s: float  # one blocking read of a flight's stream waits at most this

    async def claim(self, key: str, lease_s: float, *, streaming: bool = False) -> str | None: ...

    async def look_up(self, key: str, lease_s: float, *, streaming: bool = False) -> Lookup: ...

    async def await_entry(self, key: str, within_s: float) -> Entry | None: ...

    async def leader_state(self, key: str) -> tuple[Entry | None, bool]: ...

    async def watched(self, key: str) -> bool: ...

    def release(self, key: str, lease: str) -> None: ...

    async def append(
        self,
        key: str,
        fields: list[tuple[str, bytes]],
        ttl_s: float,
        *,
        first: bool = False,
        last: bool = False,
    ) -> None: ...

    async def read_flight(
        self, key: str, after: str, block_s: float
    ) -> list[tuple[str, dict[str, bytes]]]: ...


class MemoryStore:
    """This process's LRU of answers, bounded by entries and by bytes."""

    __slots__ = ("_bytes", "_clock", "_entries", "evictions", "max_bytes", "maxsize")

    def __init__(
        self, maxsize: int, max_bytes: int, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._clock = clock
        # key -> (entry, expires at); most recently used last
        self._entries: OrderedDict[str, tuple[Entry, float]] = OrderedDict()
        self._bytes = 0
        self.evictions = 0

    async def get(self, key: str) -> Entry | None:
        held = self._entries.get(key)
        if held is None:
            return None
        entry, expires = held
        if self._clock() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    async def get_many(self, keys: list[str]) -> list[Entry | None]:
        return [await self.get(key) for key in keys]

    def put(self, key: str, body: bytes, ttl_s: float) -> None:
        if len(body) > self.max_bytes:
            return
        now = self._clock()
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (Entry(body, now), now + ttl_s)
        self._bytes += len(body)
        entries = self._entries
        while len(entries) > self.maxsize or self._bytes > self.max_bytes:
            oldest = next(iter(entries))
            self._drop(oldest)
            self.evictions += 1

    def _drop(self, key: str) -> None:
        entry, _ = self._entries.pop(key)
        self._bytes -= len(entry.body)

    async def clear(self, route_tag: str | None = None, scope_tag: str | None = None) -> int:
        doomed = [key for key in self._entries if _matches(key, route_tag, scope_tag)]
        for key in doomed:
            self._drop(key)
        return len(doomed)

    async def stats(self) -> dict[str, Any]:
        return {"entries": len(self._entries), "bytes": self._bytes}

    def size(self) -> tuple[int, int] | None:
        return len(self._entries), self._bytes

    async def aclose(self) -> None:
        self._entries.clear()
        self._bytes = 0


def _matches(key: str, route_tag: str | None, scope_tag: str | None) -> bool:
    route, scope, _ = key.split(":", 2)
    return (route_tag is None or route == route_tag) and (scope_tag is None or scope == scope_tag)


RESULTS = ("hit", "miss", "coalesced")
# The results whose answer no upstream gave this request: they count as the key's requests,
# never as tokens (limits, usage, token metrics).
WITHOUT_UPSTREAM = frozenset({"hit", "coalesced"})
# Upper bounds of the lookup-latency histogram, in seconds: a dict lookup to a slow Redis.
LOOKUP_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
# Why a cacheable-looking request did not use the cache, a fixed set (bounded labels).
BYPASS_REASONS = ("not_deterministic", "no_store", "unavailable", "not_cacheable")


@dataclass(slots=True)
class ResponseCache:
    """The cache a gateway process has: its settings, its store, and what it did (counted
    here, read by the metrics at scrape time: nothing on the request's path but an add).

    Lives as long as the process: a config reload keeps it (its section needs a restart),
    while each route's own `cache:` overrides apply as soon as the route is reloaded."""

    config: CacheConfig
    store: CacheStore
    shared: SharedStore | None = None  # the store again, where it coalesces across processes
    # (result, route) -> count: route names come from the config, so the set is bounded.
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    bypasses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYPASS_REASONS, 0))
    stored: int = 0  # answers handed to the store
    too_large: int = 0  # answers over max_entry_bytes, not kept
    # Lookups' latency: a count per LOOKUP_BUCKETS bound (the last: above them all), the sum.
    lookup_counts: list[int] = field(default_factory=lambda: [0] * (len(LOOKUP_BUCKETS) + 1))
    lookup_sum_s: float = 0.0

    async def get(self, key: str) -> Entry | None:
        """The store's entry under `key` (raises `CacheUnavailable`), its latency observed."""
        start = time.perf_counter()
        try:
            return await self.store.get(key)
        finally:
            self._observe(time.perf_counter() - start)

    async def get_many(self, keys: list[str]) -> list[Entry | None]:
        start = time.perf_counter()
        try:
            return await self.store.get_many(keys)
        finally:
            self._observe(time.perf_counter() - start)

    async def look_up(self, key: str, lease_s: float | None, *, streaming: bool) -> Lookup:
        """The entry under `key`; with `lease_s` and a shared store, on a miss, the key's
        lease claimed in the same call (`SharedStore.look_up`). Raises `CacheUnavailable`."""
        start = time.perf_counter()
        try:
            if lease_s is None or self.shared is None:
                return Lookup(entry=await self.store.get(key))
            return await self.shared.look_up(key, lease_s, streaming=streaming)
        finally:
            self._observe(time.perf_counter() - start)

    def _observe(self, seconds: float) -> None:
        self.lookup_counts[bisect.bisect_left(LOOKUP_BUCKETS, seconds)] += 1
        self.lookup_sum_s += seconds

    def count(self, result: str, route: str) -> None:
        key = (result, route)
        self.counts[key] = self.counts.get(key, 0) + 1

    def bypass(self, reason: str) -> None:
        self.bypasses[reason] += 1

    def total(self, result: str) -> int:
        return sum(n for (kind, _), n in self.counts.items() if kind == result)

    def keep(self, key: str, body: bytes, ttl_s: float, lease: str = "") -> bool:
        """Hand a complete answer to the store, unless it is too large; whether it was.
        `lease`: this process's lease on the key's call, given back once the entry is in."""
        if len(body) > self.config.max_entry_bytes:
            self.too_large += 1
            self.release(key, lease)
            return False
        if lease and self.shared is not None:
            self.shared.put(key, body, ttl_s, lease)
        else:
            self.store.put(key, body, ttl_s)
        self.stored += 1
        return True

    async def lease(self, key: str, lease_s: float, *, streaming: bool = False) -> str | None:
        """Who makes the key's upstream call: this process ("" without a shared store or
        while it is unavailable, else its lease's token), or another (None)."""
        if self.shared is None:
            return ""
        try:
            return await self.shared.claim(key, lease_s, streaming=streaming)
        except CacheUnavailable:
            return ""

    async def await_entry(self, key: str, within_s: float) -> Entry | None:
        """Another process's answer to the key, once it has kept it (None: it did not)."""
        return None if self.shared is None else await self.shared.await_entry(key, within_s)

    def release(self, key: str, lease: str) -> None:
        if lease and self.shared is not None:
            self.shared.release(key, lease)

    async def describe(self) -> dict[str, Any]:
        """GET /admin/cache: the store's size now and this process's hit ratio."""
        hits, misses = self.total("hit"), self.total("miss")
        coalesced = self.total("coalesced")
        looked = hits + misses + coalesced
        try:
            size: dict[str, Any] = await self.store.stats()
        except CacheUnavailable:
            size = {"entries": None, "bytes": None}
        return {
            "object": "cache",
            "enabled": self.config.enabled,
            "backend": self.config.backend,
            **size,
            "hits": hits,
            "misses": misses,
            "coalesced": coalesced,
            "hit_ratio": None if not looked else round((hits + coalesced) / looked, 4),
            "bypasses": dict(self.bypasses),
            "evictions": self.store.evictions,
        }


def memory_cache(config: CacheConfig, *, clock: Callable[[], float] = time.time) -> ResponseCache:
    return ResponseCache(config, MemoryStore(config.maxsize, config.max_bytes, clock=clock))
