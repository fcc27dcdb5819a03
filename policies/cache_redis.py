"""The response cache in Redis, shared by every gateway process (see policies/cache.py).

Each entry is one Redis string, `{prefix}:cache:<route tag>:<scope tag>:<hash>` (hashes
only: never a prompt or a key's name), holding the time it was made and the answer's JSON,
with the entry's TTL. A lookup is one GET, bounded by `cache.redis_timeout_s`; where
requests coalesce across processes it is one script instead (`look_up`: the entry, else
the key's lease taken if free, else its holder), so a miss costs no more round trips than
a hit. A fill is a SET in a background task, never waited for (by the lease's holder: one
script, the SET and the lease given back). Beside the entry, on its slot: its lease
(`lease:`), the stream a leading process relays its events through (`flight:`, a Redis
Stream) and the mark of a follower waiting for it (`watch:`).

Redis failing or slow is not the request's problem: the lookup raises `CacheUnavailable`
(the request goes upstream), the outage is logged once each way (`RedisHealth`) and
counted, and while it lasts one lookup per `probe_interval_s` tries Redis while the others
bypass at once; the first that gets an answer ends it.

On a Redis Cluster an entry's name puts everything after the prefix in a hash tag,
`{prefix}:cache:{<route tag>:<scope tag>:<hash>}`, and its lease is
`{prefix}:cache:lease:{<same>}`: the entry and its lease share a slot, so waiting for
another process's answer reads both in one call to one node. A lookup of several entries
(`get_many`) is split by slot (redis-py's `mget_nonatomic`, one MGET per slot, sent to
the nodes at once); it never needed to be atomic. The admin count and clear walk every
primary (`scan_iter` on a cluster scans each). On one server the names stay untagged, as
they were.

On one server (`redis.url`) the calls on a request's path (lookups, fills, leases) go
through the request path's pipelined client (policies/redis_pipelined.py), which the
limits share: a lookup and a limit check issued in the same loop turn go out in one
write. The admin's walks over the keys keep redis-py's client.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

from redis.asyncio import RedisCluster

from gateway.config import CacheConfig, RedisConfig
from policies.cache import STREAMING, WHOLE, CacheUnavailable, Entry, Lookup, ResponseCache
from policies.redis_pipelined import PIPELINED_MAX_CALLS, PipelinedRedis
from policies.redis_state import REDIS_ERRORS, RedisClient, RedisHealth

logger = logging.getLogger("vgate.cache")
# A lease given back only by its holder. KEYS: the lease. ARGV: its token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# A miss's lookup and its claim in one call: the entry if there is one (no lease taken);
# else the lease, taken when free; else who holds it (its value: how that process
# answers). A streaming claimant that finds a streaming holder marks the key's flight as
# watched, so that the holder relays its stream. KEYS: the entry, its lease, the flight's
# watch mark. ARGV: the lease's value (token), its ms, "1" where the claimant streams.
_LOOK_UP_OR_CLAIM = """
local entry = redis.call('GET', KEYS[1])
if entry then return {0, entry} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
local holder = redis.call('GET', KEYS[2]) or ''
if ARGV[3] == '1' and string.sub(holder, 1, 1) == 's' then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
end
return {2, holder}
"""
# A fill by the lease's holder: the entry kept, then the lease given back, in one call (a
# process waiting finds the entry before the lease is gone). KEYS: the entry, its lease.
# ARGV: the entry's value, its ms, the lease's token.
_FILL = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""
# A flight's events appended to its stream, whose TTL is set anew. Its first entry starts
# the stream afresh (what an earlier flight of the key left is dropped); its last drops the
# watch mark (a later flight starts unwatched). KEYS: the stream, the watch mark. ARGV: the
# TTL (ms), "f" and/or "l" for the first and the last entry, then its fields and values.
_APPEND = """
if string.find(ARGV[2], 'f', 1, true) then redis.call('DEL', KEYS[1]) end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if string.find(ARGV[2], 'l', 1, true) then redis.call('DEL', KEYS[2]) end
return id
"""
MAX_PENDING_FILLS = 256  # fills in flight at once; past it, a fill is dropped (counted)
_SCAN_LIMIT = 100_000  # keys an admin count or clear walks at most


def entry_name(prefix: str, key: str, *, cluster: bool) -> str:
    """An entry's Redis key (`prefix` ends with ':cache:'): on a cluster the cache key is
    a hash tag, so the entry and its lease (`lease_name`) share one slot."""
    return f"{prefix}{{{key}}}" if cluster else prefix + key


def lease_name(prefix: str, key: str, *, cluster: bool) -> str:
    return f"{prefix}lease:{{{key}}}" if cluster else f"{prefix}lease:{key}"


def flight_name(prefix: str, key: str, *, cluster: bool) -> str:
    """The stream a leading process relays its events through: on the entry's slot."""
    return f"{prefix}flight:{{{key}}}" if cluster else f"{prefix}flight:{key}"


def watch_name(prefix: str, key: str, *, cluster: bool) -> str:
    """Set while a follower in another process waits for the flight's stream."""
    return f"{prefix}watch:{{{key}}}" if cluster else f"{prefix}watch:{key}"


def entry_pattern(
    prefix: str, route_tag: str | None, scope_tag: str | None, *, cluster: bool
) -> str:
    """What SCAN matches for the entries of a route and scope (None: any)."""
    tagged = f"{route_tag or '*'}:{scope_tag or '*'}:*"
    return f"{prefix}{{{tagged}" if cluster else prefix + tagged


class RedisStore:
    def __init__(
        self,
        redis: RedisClient,
        *,
        key_prefix: str,
        timeout_s: float,
        probe_interval_s: float,
        health: RedisHealth,
        max_calls: int = 4,
        clock: Callable[[], float] = time.monotonic,
        fast: PipelinedRedis | None = None,
        fill_timeout_s: float = 0.5,
    ) -> None:
        self.redis = redis  # the admin's walks over the keys
        # The request path's calls: the pipelined client where there is one.
        self.calls: RedisClient | PipelinedRedis = fast or redis
        self.fill_timeout_s = fill_timeout_s
        self.prefix = f"{key_prefix}:cache:"
        self._cluster = isinstance(redis, RedisCluster)
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
        self._calls = asyncio.Semaphore(PIPELINED_MAX_CALLS if fast else max_calls)
        self._release = self.calls.register_script(_RELEASE)
        self._look_up = self.calls.register_script(_LOOK_UP_OR_CLAIM)
        self._fill = self.calls.register_script(_FILL)
        self._append = self.calls.register_script(_APPEND)
        # Followers reading another process's stream (a blocking read each, on a pooled
        # connection of its own) at once; past this, a follower waits for the whole answer.
        self.stream_readers = asyncio.Semaphore(max_calls)
        # How long one blocking read of a flight's stream waits: within the socket timeout.
        self.block_s = min(1.0, max(0.01, fill_timeout_s / 2))

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
                raw = await self.calls.get(self._entry_key(key))
        except REDIS_ERRORS as error:
            self._failed(error)
            raise CacheUnavailable from None
        self.health.ok()
        return None if raw is None else _entry(raw)

    async def get_many(self, keys: list[str]) -> list[Entry | None]:
        if not self._usable():
            raise CacheUnavailable
        try:
            async with asyncio.timeout(self.timeout_s), self._calls:
                names = [self._entry_key(key) for key in keys]
                if isinstance(self.calls, RedisCluster):  # entries on many slots
                    raws = await self.calls.mget_nonatomic(names)
                else:
                    raws = await self.calls.mget(names)
        except REDIS_ERRORS as error:
            self._failed(error)
            raise CacheUnavailable from None
        self.health.ok()
        return [None if raw is None else _entry(raw) for raw in raws]

    def put(self, key: str, body: bytes, ttl_s: float, lease: str = "") -> None:
        """Keep `body` (in the background); then give back `lease` (this process's lease on
        the key's call, if it holds one), so that a process waiting finds the entry first."""
        if self.health.up is False:
            return  # lookups probe; fills wait for Redis to be back
        if len(self._pending) >= MAX_PENDING_FILLS:
            self.dropped_fills += 1
            return
        value = f"{time.time():.3f}\n".encode() + body
        self._background(self._set(key, value, max(1, round(ttl_s * 1000)), lease))

    def release(self, key: str, lease: str) -> None:
        """Give back this process's lease on the key's call: its answer is not kept."""
        if lease and len(self._pending) < MAX_PENDING_FILLS:
            self._background(self._set(key, None, 0, lease))

    def _background(self, call: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(call)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _set(self, key: str, value: bytes | None, ttl_ms: int, lease: str) -> None:
        try:
            # Nobody waits for a fill: it may take the client's whole socket timeout.
            async with asyncio.timeout(self.fill_timeout_s), self._calls:
                names = [self._entry_key(key), self._lease_key(key)]
                if value is not None and lease:
                    await self._fill(keys=names, args=[value, ttl_ms, lease])
                elif value is not None:
                    await self.calls.set(names[0], value, px=ttl_ms)
                elif lease:
                    await self._release(keys=names[1:], args=[lease])
        except REDIS_ERRORS as error:
            self.failed_fills += 1
            self._failed(error)

    def _entry_key(self, key: str) -> str:
        return entry_name(self.prefix, key, cluster=self._cluster)

    def _lease_key(self, key: str) -> str:
        return lease_name(self.prefix, key, cluster=self._cluster)

    def _token(self, streaming: bool) -> str:
        """A new lease's value: how its holder answers (a stream it relays, or a whole
        answer), then a token of its own; given back only by the same value."""
        return (STREAMING if streaming else WHOLE) + secrets.token_hex(8)

    async def claim(self, key: str, lease_s: float, *, streaming: bool = False) -> str | None:
        """A lease on the key's upstream call, across processes: this process's token when
        it takes it (it calls, keeps the answer, gives the lease back), None when another
        process holds it. Raises `CacheUnavailable` as `get` does."""
        if not self._usable():
            raise CacheUnavailable
        token = self._token(streaming)
        lease_ms = max(1, round(lease_s * 1000))
        try:
            async with asyncio.timeout(self.timeout_s), self._calls:
                taken = await self.calls.set(self._lease_key(key), token, nx=True, px=lease_ms)
        except REDIS_ERRORS as error:
            self._failed(error)
            raise CacheUnavailable from None
        self.health.ok()
        return token if taken else None

    async def look_up(self, key: str, lease_s: float, *, streaming: bool = False) -> Lookup:
        """The entry under `key`; on a miss, in the same call, the key's lease taken when
        it is free (`Lookup.lease`, this process then makes the call) or who holds it
        (`Lookup.holder`). A hit takes no lease. Raises `CacheUnavailable` as `get` does."""
        if not self._usable():
            raise CacheUnavailable
        token = self._token(streaming)
        lease_ms = max(1, round(lease_s * 1000))
        try:
            async with asyncio.timeout(self.timeout_s), self._calls:
                names = [self._entry_key(key), self._lease_key(key), self._watch_key(key)]
                reply = await self._look_up(keys=names, args=[token, lease_ms, int(streaming)])
        except REDIS_ERRORS as error:
            self._failed(error)
            raise CacheUnavailable from None
        self.health.ok()
        found = int(reply[0])
        if found == 0:
            entry = _entry(reply[1])
            return Lookup(entry=entry) if entry is not None else Lookup()
        if found == 1:
            return Lookup(lease=token)
        holder = reply[1]
        return Lookup(holder=holder.decode() if isinstance(holder, bytes) else str(holder))

    async def await_entry(self, key: str, within_s: float) -> Entry | None:
        """Wait for another process's answer under `key`: the entry once it is there; None
        when its lease ends without one (that process failed or died), after `within_s`,
        or when Redis does not answer (polled every 10 ms, backing off to 100 ms)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        interval = 0.01
        while True:
            try:
                entry, leased = await self.leader_state(key)
            except CacheUnavailable:
                return None
            if entry is not None:
                return entry
            if not leased or loop.time() + interval > deadline:
                return None
            await asyncio.sleep(interval)
            interval = min(interval * 2, 0.1)

    async def leader_state(self, key: str) -> tuple[Entry | None, bool]:
        """The entry under `key` if there is one, and whether its lease is held (one call);
        raises `CacheUnavailable`."""
        try:
            async with asyncio.timeout(self.timeout_s), self._calls:
                pipe = self.calls.pipeline(transaction=False)
                pipe.get(self._entry_key(key))
                pipe.exists(self._lease_key(key))
                raw, leased = await pipe.execute()
        except REDIS_ERRORS as error:
            self._failed(error)
            raise CacheUnavailable from None
        return (None if raw is None else _entry(raw)), bool(leased)

    # A flight's stream (gateway/router/relay.py): the lease's holder appends the events of
    # its stream, followers in other processes read them as they come.

    def _flight_key(self, key: str) -> str:
        return flight_name(self.prefix, key, cluster=self._cluster)

    def _watch_key(self, key: str) -> str:
        return watch_name(self.prefix, key, cluster=self._cluster)

    async def watched(self, key: str) -> bool:
        """Whether a follower in another process waits for the key's flight stream (marked
        by its lookup); raises `CacheUnavailable`."""
        try:
            async with asyncio.timeout(self.timeout_s), self._calls:
                return bool(await self.calls.exists(self._watch_key(key)))
        except REDIS_ERRORS as error:
            self._failed(error)
            raise CacheUnavailable from None

    async def append(
        self,
        key: str,
        fields: list[tuple[str, bytes]],
        ttl_s: float,
        *,
        first: bool = False,
        last: bool = False,
    ) -> None:
        """Append one entry of `fields` to the key's flight stream, which then lives
        `ttl_s`; the `first` starts it afresh, the `last` drops its watch mark. Raises
        `CacheUnavailable` when Redis does not take it in time."""
        mode = ("f" if first else "") + ("l" if last else "")
        args: list[str | bytes | int] = [max(1, round(ttl_s * 1000)), mode]
        for name, value in fields:
            args += [name, value]
        names = [self._flight_key(key), self._watch_key(key)]
        try:
            async with asyncio.timeout(self.fill_timeout_s), self._calls:
                await self._append(keys=names, args=args)
        except REDIS_ERRORS as error:
            self._failed(error)
            raise CacheUnavailable from None

    async def read_flight(
        self, key: str, after: str, block_s: float
    ) -> list[tuple[str, dict[str, bytes]]]:
        """The key's flight stream's entries after the id `after` ("0": from the start),
        waiting up to `block_s` for one (a blocking XREAD, on a pooled connection of its
        own: never on the request path's shared one); raises `CacheUnavailable`."""
        block_ms = max(1, round(block_s * 1000))
        try:
            async with asyncio.timeout(block_s + self.fill_timeout_s):
                reply: Any = await self.redis.xread({self._flight_key(key): after}, block=block_ms)
        except REDIS_ERRORS as error:
            self._failed(error)
            raise CacheUnavailable from None
        entries: list[tuple[str, dict[str, bytes]]] = []
        for _, items in reply or ():
            for raw_id, raw_fields in items:
                fields = {_text(name): _bytes(value) for name, value in raw_fields.items()}
                entries.append((_text(raw_id), fields))
        return entries

    async def _keys(self, route_tag: str | None, scope_tag: str | None) -> list[bytes]:
        pattern = entry_pattern(self.prefix, route_tag, scope_tag, cluster=self._cluster)
        found: list[bytes] = []
        # On one server the pattern also matches a key's lease, flight and watch mark.
        beside = tuple(f"{self.prefix}{kind}:".encode() for kind in ("lease", "flight", "watch"))
        async for key in self.redis.scan_iter(match=pattern, count=1000):
            if _bytes(key).startswith(beside):
                continue
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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _entry(raw: bytes | str) -> Entry | None:
    data = raw.encode() if isinstance(raw, str) else raw
    created, _, body = data.partition(b"\n")
    try:
        return Entry(body, float(created))
    except ValueError:
        return None  # not ours: never served


def redis_cache(
    config: CacheConfig,
    redis_config: RedisConfig,
    redis: RedisClient,
    *,
    on_redis_change: Callable[[str, bool], None] | None = None,
    fast: PipelinedRedis | None = None,
) -> ResponseCache:
    store = RedisStore(
        redis,
        fast=fast,
        fill_timeout_s=redis_config.socket_timeout_s,
        key_prefix=redis_config.key_prefix,
        timeout_s=config.redis_timeout_s,
        probe_interval_s=config.probe_interval_s,
        health=RedisHealth("cache", on_redis_change),
        max_calls=max(2, redis_config.max_connections // 4),
    )
    return ResponseCache(config, store, shared=store)
