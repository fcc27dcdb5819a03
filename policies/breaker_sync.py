"""Circuit breaker state shared by every gateway process and replica through Redis.

Decisions stay local: `allows()` and `attempt()` never wait on Redis, and cost what they
cost without it. What is shared are transitions:

- A transition a process makes itself (open, half-open, closed) is published in the
  background: at most one publish pending per breaker, and it carries the breaker's latest
  state when it goes out. It sets the key `{prefix}:breaker:{route}:{backend}` (with a TTL)
  and PUBLISHes the same JSON on `{prefix}:breaker`, in one script that refuses anything
  older than what the key holds.
- A background subscriber applies other processes' transitions to the local breakers
  (`BackendBreaker.apply_remote`): open or half-open elsewhere opens the breaker here with
  the same `opened_at`, so every process's cool-down ends at the same moment; closed
  elsewhere closes it. Applied transitions are not published again, and a process ignores
  its own messages. On start and after every reconnect it reads the keys first, so a
  process that starts (or comes back) late sees a breaker that is already open; and it
  reads them again every `check_interval_s`, as pub/sub delivers at most once (a message
  sent while a subscription reconnects is lost), so every process converges regardless.
- Redis down or slow: breakers go on deciding from this process's own view; the tasks
  retry with capped, jittered backoff; the outage is logged once when it starts and once
  when it ends (`RedisHealth`). Every call is bounded by a timeout.

On a Redis Cluster every breaker's key and the channel carry one hash tag,
`{<prefix>:breaker}` (the channel is the tag itself), so they live on one slot: the
catch-up reads all keys in one MGET (a cross-slot MGET is refused), the publishing
script is single-slot, and the subscription is made on the same primary that the keys
live on, so a failover of that primary is seen by the catch-up and the subscription
alike. Pub/sub stays plain
(SUBSCRIBE/PUBLISH, which a cluster forwards to every node): transitions are rare, so
the broadcast costs nothing that matters, and the subscription is one connection whose
silence the loop below can check, as with one server.

Transitions are ordered by the wall-clock time they happened, so the processes' clocks
should agree (NTP) to well within a breaker's `open_s`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import Any

import orjson
from redis.asyncio.client import PubSub

from gateway.config import RedisConfig
from policies.breaker import CLOSED, BackendBreaker
from policies.redis_state import REDIS_ERRORS, RedisClient, RedisHealth, describe, is_cluster

logger = logging.getLogger("vgate.breaker")

# A transition dated further ahead of this process's clock than this is not clock skew (the
# processes' clocks must agree to well within open_s) but garbage: ignored and overwritten,
# or one such value would outrank every real transition for as long as it is kept.
MAX_AHEAD_S = 3600.0

# Sets the key and publishes only what is newer than what the key holds: a publish that
# was retried after an outage cannot undo a later transition made elsewhere meanwhile.
_PUBLISH = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, previous = pcall(cjson.decode, current)
  if ok and type(previous) == 'table' then
    local at, new = tonumber(previous['at']), tonumber(ARGV[2])
    -- newer, unless it claims a time no clock could (then it is garbage to overwrite)
    if at and at >= new and at <= new + tonumber(ARGV[5]) then return 0 end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
"""


def breaker_base(key_prefix: str, *, cluster: bool) -> str:
    """The channel, and the start of every breaker's key. On a cluster it is a hash tag,
    so that they all hash to one slot; on one server the names stay as they were."""
    return f"{{{key_prefix}:breaker}}" if cluster else f"{key_prefix}:breaker"


def default_origin() -> str:
    """This process among all gateway processes: host, pid, and a random part for pid reuse."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class BreakerSync:
    """Keeps the given breakers' state in step with every other process using `redis`."""

    @classmethod
    def from_config(
        cls,
        redis: RedisClient,
        breakers: Iterable[BackendBreaker],
        settings: RedisConfig,
        *,
        health: RedisHealth | None = None,
        on_applied: Callable[[str, str], None] | None = None,
    ) -> BreakerSync:
        return cls(
            redis,
            breakers,
            key_prefix=settings.key_prefix,
            timeout_s=settings.socket_timeout_s,
            health=health,
            on_applied=on_applied,
        )

    def __init__(
        self,
        redis: RedisClient,
        breakers: Iterable[BackendBreaker],
        *,
        key_prefix: str = "vgate",
        timeout_s: float = 0.5,
        origin: str | None = None,
        health: RedisHealth | None = None,
        on_applied: Callable[[str, str], None] | None = None,
        check_interval_s: float = 5.0,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
    ) -> None:
        self._redis = redis
        self._cluster = is_cluster(redis)
        self._base = breaker_base(key_prefix, cluster=self._cluster)
        self._breakers: dict[tuple[str, str], BackendBreaker] = {}
        self._keys: dict[BackendBreaker, str] = {}
        self._follow(breakers)
        self.channel = self._base
        self.origin = origin or default_origin()
        self.health = health if health is not None else RedisHealth("breaker")
        self._timeout_s = timeout_s
        self._on_applied = on_applied
        self._check_interval_s = check_interval_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._script = redis.register_script(_PUBLISH)
        self._pending: dict[BackendBreaker, None] = {}  # an ordered set: one entry per breaker
        self._wake = asyncio.Event()
        self._attempted = asyncio.Event()  # the subscriber's first try ended, either way
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    def key(self, breaker: BackendBreaker) -> str:
        return self._keys[breaker]

    def replace(self, breakers: Iterable[BackendBreaker]) -> None:
        """Share these breakers from now on (a config reload added or removed backends):
        removed ones are no longer published or followed, new ones are, read from Redis at
        the subscriber's next check."""
        running = bool(self._tasks)
        for breaker in self._keys:
            breaker.on_local_change = None
        self._follow(breakers)
        for breaker in list(self._pending):
            if breaker not in self._keys:
                del self._pending[breaker]
        if running:
            for breaker in self._keys:
                breaker.on_local_change = self._local_change

    def _follow(self, breakers: Iterable[BackendBreaker]) -> None:
        self._breakers = {(breaker.route, breaker.name): breaker for breaker in breakers}
        self._keys = {
            breaker: f"{self._base}:{breaker.route}:{breaker.name}"
            for breaker in self._breakers.values()
        }

    async def start(self) -> None:
        """Start both tasks, and wait for the first catch-up (bounded by the timeouts) so
        that a process starting late serves its first request knowing what is open."""
        for breaker in self._keys:
            breaker.on_local_change = self._local_change
        self._tasks = [
            asyncio.create_task(self._subscriber(), name="vgate-breaker-sync-subscriber"),
            asyncio.create_task(self._publisher(), name="vgate-breaker-sync-publisher"),
        ]
        with suppress(TimeoutError):
            async with asyncio.timeout(self._timeout_s * 3):
                await self._attempted.wait()

    async def aclose(self) -> None:
        for breaker in self._keys:
            breaker.on_local_change = None
        # The flag as well as the cancel: redis-py can turn a cancellation that lands while
        # it handles a connection error into a ConnectionError, which the loops catch.
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    # Publishing: this process's own transitions.

    def _local_change(self, breaker: BackendBreaker) -> None:
        """Called by the breaker on its own transitions (not on the hot path): queue it."""
        self._pending[breaker] = None
        self._wake.set()

    async def _publisher(self) -> None:
        backoff = self._backoff_initial_s
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            while self._pending and not self._closing:
                breaker = next(iter(self._pending))
                if not breaker.changed_locally:  # overtaken by a transition from elsewhere
                    del self._pending[breaker]
                    continue
                at = breaker.changed_at
                try:
                    await self._publish(breaker)
                except REDIS_ERRORS as error:
                    if self._closing:
                        return
                    self.health.failed(error)
                    await asyncio.sleep(_jitter(backoff))
                    backoff = min(backoff * 2, self._backoff_max_s)
                    continue
                except Exception:  # a bug must not end sharing for the process's lifetime
                    logger.exception("publishing breaker %s failed", breaker.name)
                    self._pending.pop(breaker, None)
                    continue
                backoff = self._backoff_initial_s
                self.health.ok()
                if breaker.changed_at == at:  # else it changed again meanwhile: go again
                    self._pending.pop(breaker, None)

    async def _publish(self, breaker: BackendBreaker) -> None:
        payload = orjson.dumps(
            {
                "route": breaker.route,
                "backend": breaker.name,
                "state": breaker.state,
                "opened_at": breaker.opened_at,
                "at": breaker.changed_at,
                "origin": self.origin,
            }
        )
        ttl_s = max(60, math.ceil(10 * breaker.config.open_s))
        async with asyncio.timeout(self._timeout_s):
            await self._script(
                keys=[self._keys[breaker]],
                args=[payload, repr(breaker.changed_at), ttl_s, self.channel, MAX_AHEAD_S],
            )

    # Subscribing: other processes' transitions.

    async def _subscriber(self) -> None:
        backoff = self._backoff_initial_s
        while not self._closing:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                if self._cluster:
                    # A keyed call on the channel's slot first: should its primary have
                    # died, this call's failure has the client learn the slots again, so
                    # the subscription goes to the new primary, not to the dead one.
                    await self._catch_up()
                async with asyncio.timeout(self._timeout_s):
                    await pubsub.subscribe(self.channel)
                await self._catch_up()
                self.health.ok()
                self._attempted.set()
                backoff = self._backoff_initial_s
                self._republish_own()
                await self._listen(pubsub)
            except REDIS_ERRORS as error:
                if not self._closing:
                    self.health.failed(error)
                self._attempted.set()
            except Exception:  # a bug must not end sharing for the process's lifetime
                logger.exception("breaker sync failed; starting over")
                self._attempted.set()
                backoff = self._backoff_max_s
            finally:
                await self._close(pubsub)
            if self._closing:
                return
            await asyncio.sleep(_jitter(backoff))
            backoff = min(backoff * 2, self._backoff_max_s)

    async def _catch_up(self) -> None:
        """Read every shared breaker's key: what changed while this process was not listening."""
        breakers = list(self._keys)
        if not breakers:
            return
        async with asyncio.timeout(self._timeout_s):
            values = await self._redis.mget([self._keys[breaker] for breaker in breakers])
        for value in values:
            if value is not None:
                self._receive(value)

    def _republish_own(self) -> None:
        """Publish again what this process opened itself: Redis may have lost the keys."""
        for breaker in self._keys:
            if breaker.changed_locally and breaker.state != CLOSED:
                self._local_change(breaker)

    async def _listen(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        heard = loop.time()
        next_check = heard + self._check_interval_s
        while not self._closing:
            message = await pubsub.get_message(timeout=max(0.0, next_check - loop.time()))
            now = loop.time()
            if message is not None:
                heard = now
                if message["type"] == "message":
                    self._receive(message["data"])
            if now >= next_check:
                # A connection that died without a word (no RST) is found by its silence.
                if now - heard > self._check_interval_s + self._timeout_s:
                    raise TimeoutError("no answer to PING on the subscription")
                async with asyncio.timeout(self._timeout_s):
                    await pubsub.ping()
                await self._catch_up()
                next_check = now + self._check_interval_s

    def _receive(self, data: Any) -> None:
        try:
            event = orjson.loads(data)
            if event["origin"] == self.origin:
                return
            breaker = self._breakers.get((str(event["route"]), str(event["backend"])))
            state, at, opened_at = str(event["state"]), float(event["at"]), event["opened_at"]
            if opened_at is not None:
                opened_at = float(opened_at)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            logger.debug("ignored a malformed breaker message: %s", describe(error))
            return
        # Times are checked before they reach the breaker: a NaN or a date out of range
        # would raise there, aborting a catch-up (the keys after it unread) every round.
        if not _plausible(at) or (opened_at is not None and not _plausible(opened_at)):
            logger.debug("ignored a breaker message with impossible times: %r", data[:200])
            return
        if breaker is None:  # a backend this process's configuration does not have
            return
        if breaker.apply_remote(state, opened_at, at) and self._on_applied is not None:
            self._on_applied(breaker.name, breaker.state)

    async def _close(self, pubsub: PubSub) -> None:
        with suppress(*REDIS_ERRORS):
            async with asyncio.timeout(self._timeout_s):
                await pubsub.aclose()


def _plausible(moment: float) -> bool:
    """A wall-clock time some process's transition could carry (False for NaN too)."""
    return 0.0 < moment <= time.time() + MAX_AHEAD_S


def _jitter(backoff: float) -> float:
    return random.uniform(backoff / 2, backoff)
