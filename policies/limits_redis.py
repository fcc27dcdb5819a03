"""Per-key limits shared by every gateway process through Redis, and what to do without it.

`RedisLimits` keeps each API key's limits in two Redis keys, in one hash slot (the key id is
the hash tag), so a cluster keeps them together:

- `{prefix}:rl:{<key id>}`: a hash with both buckets (`rx`/`rt`: requests, level and time;
  `tx`/`tt`: tokens) and the day's quota (`d`: the UTC day, `u`: tokens used that day). Its
  TTL is the time until it has nothing to remember (buckets drained; end of the day when
  the key has a quota), plus a second.
- `{prefix}:rl:{<key id>}:t`: a sorted set of the tickets in flight, each scored by the end
  of its lease (`lease_s`). It counts `max_concurrent`, makes settling idempotent (only a
  ticket still in the set is settled), and frees the slot of a process that died without
  settling when its lease ends. Its size is bounded by the requests in flight; its TTL is
  the last lease's end.
- `{prefix}:rl:{<key id>}:u`: tickets undone before their admit ran (below), each until its
  lease's end; written only after a Redis call timed out.

Admission is ONE round trip (EVALSHA): one Lua script checks the day's quota, concurrency,
requests and tokens per minute together and charges all of them only if all allow; Redis
runs a script atomically, so N processes admit exactly the limit between them. Time is the
Redis server's (`TIME`), so processes with skewed clocks agree; tests may pass `clock` to
send their own time instead. Settling is a second, separate call, after the response.
Scripts are loaded once per server (EVALSHA; on NOSCRIPT, after a restart, loaded again).
An admit is idempotent on its ticket id (a retried EVALSHA does not charge twice). An admit
whose call failed (a timeout: it may still run) is undone by a settle marked `undo`, retried
in the background; should the undo run first, it leaves the ticket id in `:u`, and the admit,
when it runs, charges nothing: no slot or tokens leak whatever the order.

`FailoverLimits` is the store the edge uses with Redis: it bounds every call by
`socket_timeout_s`, and when Redis fails it fails open (each process's own `LocalLimits`,
so N processes admit up to N times a limit meanwhile) or closed (503 with Retry-After),
logged once when an outage starts and once when it ends (`RedisHealth`) and counted. While
Redis is down one request per `probe_interval_s` tries it, the others do not wait on it;
the first that gets through ends the outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from gateway.config import LimitsConfig, RedisConfig
from policies.limits import (
    ALLOWED,
    NOT_REFUSED,
    R_DAY,
    R_REFUSED,
    FailureMode,
    LimitSpec,
    LimitStore,
    Ticket,
    Verdict,
    clamp_tokens,
    is_unlimited,
    rate,
    unavailable,
    usage_report,
    verdict_from,
)
from policies.limits_local import LocalLimits
from policies.redis_pipelined import PIPELINED_MAX_CALLS, PipelinedRedis
from policies.redis_state import REDIS_ERRORS, RedisClient, RedisHealth, describe

logger = logging.getLogger("vgate.limits")

_UNDO = "undo"  # a Ticket's handle: settle an admit whose call failed
_SETTLE_BATCH = 128  # settles sent in one pipeline at most
_Settle = tuple[Ticket, int | None, bool]  # a ticket, its actual tokens, whether it failed

_LUA_COMMON = """
local P, DAY = 60000000, 86400000000
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local rpm, tpm, quota = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
-- exact integer division of doubles below 2^53: the quotient corrected by one if rounded
local function fdiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local function cdiv(a, b)
  local q = math.ceil(a / b)
  if q * b < a then q = q + 1 elseif (q - 1) * b >= a then q = q - 1 end
  return q
end
-- a bucket's level now, having drained L units per microsecond since t
local function drain(x, t, L)
  x = tonumber(x) or 0
  if x <= 0 then return 0 end
  local e = now - (tonumber(t) or 0)
  if e <= 0 then return x end
  if L <= 0 then return 0 end
  x = x - e * L
  if x < 0 then return 0 end
  return x
end
-- numbers written to Redis in full (Lua's own conversion keeps 14 digits)
local function num(x) return string.format('%.0f', x) end
-- the hash lives until its buckets are drained, and to the end of its day with a quota
local function expire(xr, xt, d)
  local ttl = 0
  if rpm > 0 then ttl = math.max(ttl, cdiv(xr, rpm)) end
  if tpm > 0 then ttl = math.max(ttl, cdiv(xt, tpm)) end
  if quota >= 0 and d then ttl = math.max(ttl, (d + 1) * DAY - now) end
  redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000) + 1000)
end
local s = redis.call('HMGET', KEYS[1], 'rx', 'rt', 'tx', 'tt', 'd', 'u')
local rt, tt = tonumber(s[2]) or 0, tonumber(s[4]) or 0
local xr, xt = 0, 0
if rpm > 0 then xr = drain(s[1], rt, rpm) end
if tpm > 0 then xt = drain(s[3], tt, tpm) end
"""

# KEYS: the hash, the tickets, the undone tickets. ARGV: now in µs ('' for the server's
# TIME), rpm, tpm (0: none), tokens per day, max concurrent (-1: none), tokens, ticket id,
# lease in µs.
# Returns the R_* integers of policies.limits.
_ADMIT = (
    _LUA_COMMON
    + """
local maxc, tokens, id, lease = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
local day = fdiv(now, DAY)
local used = 0
if tonumber(s[5]) == day then used = tonumber(s[6]) or 0 end
local function result(refused, wait)
  local left = 0
  if quota >= 0 then left = quota - used end
  local rl, rr, tl, tr = 0, 0, 0, 0
  if rpm > 0 then rl, rr = fdiv(rpm * P - xr, P), cdiv(xr, rpm) end
  if tpm > 0 then tl, tr = fdiv(tpm * P - xt, P), cdiv(xt, tpm) end
  return {refused, wait, rl, rr, tl, tr, left, day, now}
end
-- a retried admit, or one undone before it ran: charge nothing
if redis.call('ZSCORE', KEYS[2], id) or redis.call('ZSCORE', KEYS[3], id) then
  return result(0, 0)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', num(now))
local refused, wait = 0, 0
if quota >= 0 and used + tokens > quota then
  refused, wait = 4, (day + 1) * DAY - now
else
  if maxc >= 0 and redis.call('ZCARD', KEYS[2]) >= maxc then refused, wait = 1, 1000000 end
  if rpm > 0 and xr + P > rpm * P then
    local need = cdiv(xr + P - rpm * P, rpm)
    if need > wait then refused, wait = 2, need end
  end
  if tpm > 0 then
    if tokens > tpm then
      if P > wait then refused, wait = 5, P end
    elseif xt + tokens * P > tpm * P then
      local need = cdiv(xt + tokens * P - tpm * P, tpm)
      if need > wait then refused, wait = 3, need end
    end
  end
end
if refused ~= 0 then return result(refused, wait) end
local fields = {}
if rpm > 0 then
  xr = xr + P
  fields[#fields + 1] = 'rx'; fields[#fields + 1] = num(xr)
  fields[#fields + 1] = 'rt'; fields[#fields + 1] = num(math.max(rt, now))
end
if tpm > 0 then
  xt = xt + tokens * P
  fields[#fields + 1] = 'tx'; fields[#fields + 1] = num(xt)
  fields[#fields + 1] = 'tt'; fields[#fields + 1] = num(math.max(tt, now))
end
if quota >= 0 then
  used = used + tokens
  fields[#fields + 1] = 'd'; fields[#fields + 1] = num(day)
  fields[#fields + 1] = 'u'; fields[#fields + 1] = num(used)
end
if #fields > 0 then
  redis.call('HSET', KEYS[1], unpack(fields))
  expire(xr, xt, day)
end
redis.call('ZADD', KEYS[2], num(now + lease), id)
redis.call('PEXPIRE', KEYS[2], math.ceil(lease / 1000) + 1000)
return result(0, 0)
"""
)

# KEYS: as for admit. ARGV: now, rpm, tpm, tokens per day (as for admit), ticket id,
# failed (0/1), tokens to add (negative: to give back), the ticket's day (-1: today), undo
# (0/1), lease in µs. Returns 1 if settled, 0 if the ticket was not in flight (settled
# before, its lease over, or, for an undo, its admit not run: then it never will).
_SETTLE = (
    """
if redis.call('ZREM', KEYS[2], ARGV[5]) == 0 then
  if ARGV[9] == '1' then
    local at = tonumber(ARGV[1])
    if not at then
      local t = redis.call('TIME')
      at = tonumber(t[1]) * 1000000 + tonumber(t[2])
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', string.format('%.0f', at))
    redis.call('ZADD', KEYS[3], string.format('%.0f', at + tonumber(ARGV[10])), ARGV[5])
    redis.call('PEXPIRE', KEYS[3], math.ceil(tonumber(ARGV[10]) / 1000) + 1000)
  end
  return 0
end
"""
    + _LUA_COMMON
    + """
local failed, delta, day = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
if day < 0 then day = fdiv(now, DAY) end
local d = tonumber(s[5])
local fields = {}
if failed == 1 and rpm > 0 then
  xr = math.max(0, xr - P)
  fields[#fields + 1] = 'rx'; fields[#fields + 1] = num(xr)
  fields[#fields + 1] = 'rt'; fields[#fields + 1] = num(math.max(rt, now))
end
if delta ~= 0 and tpm > 0 then
  xt = math.min(math.max(0, xt + delta * P), 2 * tpm * P)
  fields[#fields + 1] = 'tx'; fields[#fields + 1] = num(xt)
  fields[#fields + 1] = 'tt'; fields[#fields + 1] = num(math.max(tt, now))
end
if delta ~= 0 and quota >= 0 and d == day then
  fields[#fields + 1] = 'u'; fields[#fields + 1] = num(math.max(0, (tonumber(s[6]) or 0) + delta))
end
if #fields > 0 then
  redis.call('HSET', KEYS[1], unpack(fields))
  expire(xr, xt, d)
end
return 1
"""
)

# KEYS: the hash, the tickets. ARGV: now, rpm, tpm, tokens per day (as for admit).
# Read-only: returns the buckets' levels now, the day's tokens and the tickets in flight.
_USAGE = (
    _LUA_COMMON
    + """
local used = 0
if quota >= 0 and tonumber(s[5]) == fdiv(now, DAY) then used = tonumber(s[6]) or 0 end
local held = redis.call('ZCOUNT', KEYS[2], '(' .. num(now), '+inf')
return {xr, xt, used, held}
"""
)


class RedisLimits:
    """The shared store. Raises what the Redis client raises (`REDIS_ERRORS`), or
    TimeoutError after `timeout_s`: `FailoverLimits` decides what a failure means."""

    def __init__(
        self,
        redis: RedisClient | PipelinedRedis,
        *,
        key_prefix: str = "vgate",
        timeout_s: float = 0.5,
        lease_s: float = 600.0,
        max_calls: int = 12,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.redis = redis
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self._lease_us = round(lease_s * 1_000_000)
        self._clock = clock  # None: the Redis server's clock (tests pass their own)
        self._admit = redis.register_script(_ADMIT)
        self._settle = redis.register_script(_SETTLE)
        self._usage = redis.register_script(_USAGE)
        self._origin = secrets.token_hex(6)
        self._ids = itertools.count(1)
        # The client's pool refuses a call beyond max_connections (it does not wait): calls
        # wait here for one of `max_calls` turns instead, within their timeout.
        self._calls = asyncio.Semaphore(max_calls)

    def keys(self, key_id: str) -> list[str]:
        base = f"{self.key_prefix}:rl:{{{key_id}}}"
        return [base, base + ":t", base + ":u"]

    def new_ticket_id(self) -> str:
        return f"{self._origin}:{next(self._ids)}"

    def _now(self) -> str:
        return "" if self._clock is None else str(int(self._clock() * 1_000_000))

    async def admit(
        self, key_id: str, limits: LimitSpec, tokens_estimate: int, *, ticket_id: str | None = None
    ) -> Verdict:
        if is_unlimited(limits):
            return ALLOWED
        tokens = clamp_tokens(tokens_estimate)
        ticket_id = ticket_id or self.new_ticket_id()
        quota, max_concurrent = limits.tokens_per_day, limits.max_concurrent
        args = (
            self._now(),
            rate(limits.rpm),
            rate(limits.tpm),
            -1 if quota is None else quota,
            -1 if max_concurrent is None else max_concurrent,
            tokens,
            ticket_id,
            self._lease_us,
        )
        keys = self.keys(key_id)
        async with asyncio.timeout(self.timeout_s), self._calls:
            try:
                result = await self._admit(keys=keys, args=args)
            except ResponseError as error:
                if not str(error).startswith("WRONGTYPE"):
                    raise
                # Redis answered: one key of ours holds what no script of ours wrote. Not
                # an outage (that would fail every key open, or closed); repaired here.
                logger.warning(
                    "rate limits: the Redis keys of key %r held a value of the wrong type "
                    "(%s); they were reset",
                    key_id,
                    describe(error),
                )
                await self.redis.delete(*keys)
                result = await self._admit(keys=keys, args=args)
        if result[R_REFUSED] != NOT_REFUSED:
            return verdict_from(limits, tokens, result, None)
        ticket = Ticket(key_id, ticket_id, limits, tokens, int(result[R_DAY]), self)
        return verdict_from(limits, tokens, result, ticket)

    async def usage(self, key_id: str, limits: LimitSpec) -> dict[str, Any]:
        """The key's shared figures (every process's), by one read-only script on the
        server's clock; charges nothing. Bounded by `timeout_s`."""
        if is_unlimited(limits):
            return usage_report(limits, "redis", 0, 0, 0, 0)
        quota = limits.tokens_per_day
        args = (self._now(), rate(limits.rpm), rate(limits.tpm), -1 if quota is None else quota)
        async with asyncio.timeout(self.timeout_s), self._calls:
            result = await self._usage(keys=self.keys(key_id)[:2], args=args)
        return usage_report(limits, "redis", *(int(value) for value in result[:4]))

    def undo_ticket(self, key_id: str, limits: LimitSpec, tokens: int, ticket_id: str) -> Ticket:
        """A ticket to settle (as failed) for an admit whose call failed: it gives back what
        the admit charged if it ran, and makes sure it never does if it has not yet."""
        return Ticket(key_id, ticket_id, limits, clamp_tokens(tokens), -1, self, _UNDO)

    async def settle(self, ticket: Ticket, actual_tokens: int | None, *, failed: bool) -> bool:
        """Settle in Redis (not marking the ticket): True if it was in flight there."""
        keys, args = self._settle_call(ticket, actual_tokens, failed)
        async with asyncio.timeout(self.timeout_s), self._calls:
            settled = await self._settle(keys=keys, args=args)
        return bool(settled)

    async def settle_many(self, items: Sequence[_Settle]) -> list[bool]:
        """Settle several tickets in one round trip (a pipeline of EVALSHAs); idempotent,
        so a batch may be sent again whole."""
        for attempt in (1, 2):
            pipe = self.redis.pipeline(transaction=False)
            for ticket, actual_tokens, failed in items:
                keys, args = self._settle_call(ticket, actual_tokens, failed)
                pipe.evalsha(self._settle.sha, len(keys), *keys, *args)
            async with asyncio.timeout(self.timeout_s), self._calls:
                results = await pipe.execute(raise_on_error=False)
            if attempt == 1 and any(isinstance(result, NoScriptError) for result in results):
                async with asyncio.timeout(self.timeout_s), self._calls:
                    self._settle.sha = await self.redis.script_load(_SETTLE)
                continue
            for result in results:
                if isinstance(result, Exception):
                    raise result
            return [bool(result) for result in results]
        raise NoScriptError("the settle script could not be loaded")

    def _settle_call(
        self, ticket: Ticket, actual_tokens: int | None, failed: bool
    ) -> tuple[list[str], tuple[str | int, ...]]:
        limits = ticket.limits
        if actual_tokens is not None:
            delta = clamp_tokens(actual_tokens) - ticket.tokens
        else:
            delta = -ticket.tokens if failed else 0
        quota = limits.tokens_per_day
        args = (
            self._now(),
            rate(limits.rpm),
            rate(limits.tpm),
            -1 if quota is None else quota,
            ticket.id,
            1 if failed else 0,
            delta,
            ticket.day,
            1 if ticket.handle is _UNDO else 0,
            self._lease_us,
        )
        return self.keys(ticket.key_id), args


class FailoverLimits:
    """The store for a gateway with Redis (`policies.limits.LimitStore`): Redis while it
    answers; without it, `local` (mode "open") or 503 (mode "closed")."""

    def __init__(
        self,
        redis: RedisLimits,
        local: LocalLimits,
        *,
        mode: FailureMode = "open",
        health: RedisHealth | None = None,
        probe_interval_s: float = 1.0,
        settle_deadline_s: float = 10.0,
        max_pending_settles: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.local = local
        self.mode = mode
        self.health = health if health is not None else RedisHealth("limits")
        self.probe_interval_s = probe_interval_s
        self.settle_deadline_s = settle_deadline_s
        self.max_pending_settles = max_pending_settles
        self._clock = clock
        self.down = False
        self._retry_at = 0.0
        self._probing = False
        self._queue: deque[_Settle] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_batch = 0
        self._settler: asyncio.Task[None] | None = None
        # Counted for metrics (gateway.edge.metrics reads them at scrape time): requests
        # decided without Redis...
        self.degraded_admits = 0  # ...by this process's own limits (fail-open)
        self.unavailable_refusals = 0  # ...refused with 503 (fail-closed)
        self.dropped_settles = 0  # settles not even tried: max_pending_settles were pending
        self.lost_settles = 0  # settles that failed until settle_deadline_s (lease frees them)

    @property
    def pending_settles(self) -> int:
        return len(self._queue) + self._in_batch

    async def admit(
        self, key_id: str, limits: LimitSpec, tokens_estimate: int, *, ticket_id: str | None = None
    ) -> Verdict:
        if is_unlimited(limits):
            return ALLOWED
        if self.down:
            if self._probing or self._clock() < self._retry_at:
                return self._without_redis(key_id, limits, tokens_estimate)
            self._probing = True
        ticket_id = ticket_id or self.redis.new_ticket_id()
        try:
            verdict = await self.redis.admit(key_id, limits, tokens_estimate, ticket_id=ticket_id)
        except asyncio.CancelledError:
            self._probing = False
            self._undo(key_id, limits, tokens_estimate, ticket_id)
            raise
        except Exception as error:
            self._probing = False
            self._failed(error)
            # A call that timed out may have been carried out: give back what it charged.
            self._undo(key_id, limits, tokens_estimate, ticket_id)
            return self._without_redis(key_id, limits, tokens_estimate)
        self._probing = False
        self._ok()
        return verdict

    async def settle(self, ticket: Ticket, actual_tokens: int | None, *, failed: bool) -> None:
        """Settle and wait for it (retried until `settle_deadline_s`)."""
        if ticket.store is not self.redis:
            self.local.settle_nowait(ticket, actual_tokens, failed=failed)
            return
        if ticket.settled:
            return
        ticket.settled = True
        await self._settle_batch([(ticket, actual_tokens, failed)])

    async def usage(self, key_id: str, limits: LimitSpec) -> dict[str, Any]:
        """Redis's shared figures; while Redis is down or if it fails this call, this
        process's own (`"source": "local"`). Never changes the outage state: admits do."""
        if not self.down:
            try:
                return await self.redis.usage(key_id, limits)
            except Exception as error:
                logger.debug("rate limits: usage from Redis failed: %s", describe(error))
        return self.local.usage_now(key_id, limits)

    def settle_nowait(self, ticket: Ticket, actual_tokens: int | None, *, failed: bool) -> None:
        """Queue the settle for the background settler, which sends what has queued up in
        one pipeline (one round trip for many requests). The queue is bounded: beyond
        `max_pending_settles` a settle is dropped and counted (its slot is freed when its
        lease ends)."""
        if ticket.store is not self.redis:
            self.local.settle_nowait(ticket, actual_tokens, failed=failed)
            return
        if ticket.settled:
            return
        ticket.settled = True
        if len(self._queue) >= self.max_pending_settles:
            if self.dropped_settles == 0:
                logger.warning(
                    "rate limits: %d settles pending; further ones are dropped (their "
                    "slots are freed when their leases end)",
                    len(self._queue),
                )
            self.dropped_settles += 1
            return
        self._queue.append((ticket, actual_tokens, failed))
        self._idle.clear()
        self._wake.set()
        if self._settler is None:
            self._settler = asyncio.get_running_loop().create_task(
                self._settle_queued(), name="vgate-limits-settler"
            )

    async def _settle_queued(self) -> None:
        queue = self._queue
        while True:
            await self._wake.wait()
            self._wake.clear()
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), _SETTLE_BATCH))]
                self._in_batch = len(batch)
                try:
                    await self._settle_batch(batch)
                except Exception:  # a bug must not end settling for the process's lifetime
                    logger.exception("rate limits: settling failed")
                finally:
                    self._in_batch = 0
            self._idle.set()

    async def _settle_batch(self, batch: list[_Settle]) -> None:
        backoff = 0.05
        deadline = self._clock() + self.settle_deadline_s
        while True:
            try:
                if len(batch) == 1:
                    await self.redis.settle(*batch[0][:2], failed=batch[0][2])
                else:
                    await self.redis.settle_many(batch)
            except Exception as error:
                self._failed(error, probed=False)
                if not isinstance(error, REDIS_ERRORS) or self._clock() + backoff > deadline:
                    self.lost_settles += len(batch)
                    return
                await asyncio.sleep(random.uniform(backoff / 2, backoff))
                backoff = min(backoff * 2, 1.0)
                continue
            self._ok()
            return

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait until the queued settles are done (at most `timeout_s`)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()

    async def aclose(self, timeout_s: float = 2.0) -> None:
        """Finish the queued settles (bounded), then stop the settler."""
        await self.drain(timeout_s)
        if self._settler is not None:
            self._settler.cancel()
            await asyncio.gather(self._settler, return_exceptions=True)
            self._settler = None
        self.lost_settles += len(self._queue)
        self._queue.clear()
        self._idle.set()

    def _without_redis(self, key_id: str, limits: LimitSpec, tokens_estimate: int) -> Verdict:
        if self.mode == "closed":
            self.unavailable_refusals += 1
            return unavailable(self.probe_interval_s)
        self.degraded_admits += 1
        return self.local.admit_now(key_id, limits, tokens_estimate)

    def _undo(self, key_id: str, limits: LimitSpec, tokens: int, ticket_id: str) -> None:
        """Undo an admit whose outcome is unknown (`RedisLimits.undo_ticket`)."""
        self.settle_nowait(
            self.redis.undo_ticket(key_id, limits, tokens, ticket_id), None, failed=True
        )

    def _failed(self, error: BaseException, *, probed: bool = True) -> None:
        """Redis failed a call: an admit's (`probed`: the next try is due after the probe
        interval), or a settle's (which only starts an outage)."""
        if probed or not self.down:
            self._retry_at = self._clock() + self.probe_interval_s
        if self.down:
            return
        self.down = True
        self.health.failed(error)
        if not isinstance(error, REDIS_ERRORS):
            logger.error("rate limits: unexpected error from Redis: %s", describe(error))
        if self.mode == "closed":
            logger.warning(
                "rate limits fail closed: requests are refused with 503 until Redis answers"
            )
        else:
            logger.warning(
                "rate limits fail open: each gateway process enforces every key's limits on "
                "its own until Redis answers"
            )

    def _ok(self) -> None:
        if self.down or self.health.up is not True:
            self.down = False
            self.health.ok()


def create_limits(
    limits: LimitsConfig,
    redis_config: RedisConfig,
    redis: RedisClient | PipelinedRedis | None,
    *,
    on_redis_change: Callable[[str, bool], None] | None = None,
) -> LimitStore:
    """The store for a gateway: in-process without a Redis client, else shared through it
    (`redis`: the process's request-path client, `policies.redis_pipelined`, or its one
    pooled redis-py client, `policies.redis_state.create_client`)."""
    local = LocalLimits(max_keys=limits.local_max_keys)
    if redis is None:
        return local
    shared = RedisLimits(
        redis,
        key_prefix=redis_config.key_prefix,
        timeout_s=redis_config.socket_timeout_s,
        lease_s=limits.lease_s,
        max_calls=(
            PIPELINED_MAX_CALLS
            if isinstance(redis, PipelinedRedis)
            # The pool is shared: leave a few connections to the breakers' sync.
            else max(1, redis_config.max_connections - 4)
        ),
    )
    return FailoverLimits(
        shared,
        local,
        mode=limits.redis_failure,
        health=RedisHealth("limits", on_redis_change),
        probe_interval_s=limits.probe_interval_s,
    )
