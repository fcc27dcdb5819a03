"""Per-key limits kept in this process: exact for one process, O(1) per request, no timers.

The state of a key is seven integers (`_KeyState`); the arithmetic is `policies.limits`'s,
the same the Redis script does, so the two stores decide alike. States live in an LRU map
bounded by `max_keys`; a state that has nothing to remember (buckets drained, no request in
flight, nothing used today) is dropped as the map is walked, a couple of entries per request,
so idle keys expire without a timer. Beyond `max_keys` active keys the least recently used
is dropped even if it still remembers something (counted in `evicted_active`, exported as
`vgate_limits_evicted_active_total`): keys come from the keys file, so this takes a keys
file larger than the cap.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from policies.limits import (
    ALLOWED,
    BY_CONCURRENCY,
    BY_DAY,
    BY_REQUESTS,
    BY_SIZE,
    BY_TOKENS,
    DAY_US,
    NOT_REFUSED,
    PERIOD_US,
    LimitSpec,
    Ticket,
    Verdict,
    clamp_tokens,
    is_unlimited,
    rate,
    usage_report,
    verdict_from,
)

CONCURRENCY_WAIT_US = 1_000_000  # a slot frees when some request ends: suggest a second
_SWEEP_PER_ADMIT = 2


class _KeyState:
    __slots__ = ("day", "in_flight", "rt", "rx", "tt", "tx", "used")

    def __init__(self) -> None:
        self.rx = 0  # requests bucket: level (units) at time rt (µs)
        self.rt = 0
        self.tx = 0  # tokens bucket: level at time tt
        self.tt = 0
        self.day = -1  # the UTC day `used` counts
        self.used = 0
        self.in_flight = 0

    def idle(self, now: int, rpm: int, tpm: int) -> bool:
        """Nothing to remember: forgetting it changes no decision."""
        return (
            self.in_flight == 0
            and (self.used == 0 or self.day != now // DAY_US)
            and drain(self.rx, self.rt, now, rpm) == 0
            and drain(self.tx, self.tt, now, tpm) == 0
        )


def drain(level: int, at: int, now: int, limit: int) -> int:
    """A bucket's level at `now`, having drained `limit` units per µs since `at`."""
    if level <= 0:
        return 0
    elapsed = now - at
    if elapsed <= 0:
        return level
    if limit <= 0:
        return 0
    return max(0, level - elapsed * limit)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class LocalLimits:
    """The in-process store (`policies.limits.LimitStore`)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        max_keys: int = 100_000,
    ) -> None:
        self._clock = clock  # wall-clock seconds: the quota's day is the UTC day
        self.max_keys = max_keys
        self._states: OrderedDict[str, tuple[_KeyState, LimitSpec]] = OrderedDict()
        self._origin = "local-" + secrets.token_hex(4)
        self._ids = itertools.count(1)
        self.evicted_active = 0  # states dropped while they still remembered something

    def __len__(self) -> int:
        return len(self._states)

    def now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    async def admit(
        self, key_id: str, limits: LimitSpec, tokens_estimate: int, *, ticket_id: str | None = None
    ) -> Verdict:
        return self.admit_now(key_id, limits, tokens_estimate, ticket_id=ticket_id)

    def admit_now(
        self, key_id: str, limits: LimitSpec, tokens_estimate: int, *, ticket_id: str | None = None
    ) -> Verdict:
        if is_unlimited(limits):
            return ALLOWED
        now = self.now_us()
        tokens = clamp_tokens(tokens_estimate)
        states = self._states
        entry = states.get(key_id)
        if entry is None:
            state = _KeyState()
            states[key_id] = (state, limits)
            self._bound(now)
        else:
            state = entry[0]
            if entry[1] is not limits:
                states[key_id] = (state, limits)
            states.move_to_end(key_id)
        result = decide(state, now, limits, tokens)
        self._sweep(now)
        if result[0] != NOT_REFUSED:
            return verdict_from(limits, tokens, result, None)
        ticket = Ticket(
            key_id,
            ticket_id or f"{self._origin}:{next(self._ids)}",
            limits,
            tokens,
            result[7],
            self,
            state,
        )
        return verdict_from(limits, tokens, result, ticket)

    async def settle(self, ticket: Ticket, actual_tokens: int | None, *, failed: bool) -> None:
        self.settle_nowait(ticket, actual_tokens, failed=failed)

    def settle_nowait(self, ticket: Ticket, actual_tokens: int | None, *, failed: bool) -> None:
        if ticket.settled:
            return
        ticket.settled = True
        state = ticket.handle
        if not isinstance(state, _KeyState):
            return
        reconcile(state, self.now_us(), ticket, actual_tokens, failed)

    async def usage(self, key_id: str, limits: LimitSpec) -> dict[str, Any]:
        return self.usage_now(key_id, limits)

    def usage_now(self, key_id: str, limits: LimitSpec) -> dict[str, Any]:
        """The key's figures in this process, charging and touching nothing."""
        now = self.now_us()
        entry = self._states.get(key_id)
        state = entry[0] if entry is not None else _KeyState()
        rpm, tpm = rate(limits.rpm), rate(limits.tpm)
        used = state.used if state.day == now // DAY_US else 0
        return usage_report(
            limits,
            "local",
            drain(state.rx, state.rt, now, rpm) if rpm else 0,
            drain(state.tx, state.tt, now, tpm) if tpm else 0,
            used,
            state.in_flight,
        )

    async def aclose(self) -> None:
        self._states.clear()

    def _bound(self, now: int) -> None:
        states = self._states
        while len(states) > self.max_keys:
            _, (state, limits) = states.popitem(last=False)
            if not state.idle(now, rate(limits.rpm), rate(limits.tpm)):
                self.evicted_active += 1

    def _sweep(self, now: int) -> None:
        """Drop the least recently used states while they are idle (a couple per call)."""
        states = self._states
        for _ in range(_SWEEP_PER_ADMIT):
            if len(states) <= 1:
                return
            key_id, (state, limits) = next(iter(states.items()))
            if not state.idle(now, rate(limits.rpm), rate(limits.tpm)):
                return
            del states[key_id]


def decide(state: _KeyState, now: int, limits: LimitSpec, tokens: int) -> list[int]:
    """Check every limit; charge all of them only if all allow. Returns the R_* integers."""
    rpm, tpm = rate(limits.rpm), rate(limits.tpm)
    quota, max_concurrent = limits.tokens_per_day, limits.max_concurrent
    day = now // DAY_US
    used = state.used if state.day == day else 0
    xr = drain(state.rx, state.rt, now, rpm) if rpm else 0
    xt = drain(state.tx, state.tt, now, tpm) if tpm else 0
    refused, wait = NOT_REFUSED, 0
    if quota is not None and used + tokens > quota:
        refused, wait = BY_DAY, (day + 1) * DAY_US - now
    else:
        if max_concurrent is not None and state.in_flight >= max_concurrent:
            refused, wait = BY_CONCURRENCY, CONCURRENCY_WAIT_US
        if rpm and xr + PERIOD_US > rpm * PERIOD_US:
            need = ceil_div(xr + PERIOD_US - rpm * PERIOD_US, rpm)
            if need > wait:
                refused, wait = BY_REQUESTS, need
        if tpm:
            if tokens > tpm:
                if wait < PERIOD_US:
                    refused, wait = BY_SIZE, PERIOD_US
            elif xt + tokens * PERIOD_US > tpm * PERIOD_US:
                need = ceil_div(xt + tokens * PERIOD_US - tpm * PERIOD_US, tpm)
                if need > wait:
                    refused, wait = BY_TOKENS, need
    if refused == NOT_REFUSED:
        if rpm:
            xr += PERIOD_US
            state.rx, state.rt = xr, max(state.rt, now)
        if tpm:
            xt += tokens * PERIOD_US
            state.tx, state.tt = xt, max(state.tt, now)
        if quota is not None:
            used += tokens
            state.day, state.used = day, used
        state.in_flight += 1
    return [
        refused,
        wait,
        (rpm * PERIOD_US - xr) // PERIOD_US if rpm else 0,
        ceil_div(xr, rpm) if rpm else 0,
        (tpm * PERIOD_US - xt) // PERIOD_US if tpm else 0,
        ceil_div(xt, tpm) if tpm else 0,
        quota - used if quota is not None else 0,
        day,
        now,
    ]


def reconcile(
    state: _KeyState, now: int, ticket: Ticket, actual_tokens: int | None, failed: bool
) -> None:
    """Settle a ticket: free its slot, replace its estimate with `actual_tokens`, and give
    back the request itself when it failed."""
    limits = ticket.limits
    rpm, tpm = rate(limits.rpm), rate(limits.tpm)
    if state.in_flight > 0:
        state.in_flight -= 1
    if actual_tokens is not None:
        delta = clamp_tokens(actual_tokens) - ticket.tokens
    else:
        delta = -ticket.tokens if failed else 0
    if failed and rpm:
        state.rx = max(0, drain(state.rx, state.rt, now, rpm) - PERIOD_US)
        state.rt = max(state.rt, now)
    if delta and tpm:
        level = drain(state.tx, state.tt, now, tpm) + delta * PERIOD_US
        state.tx = min(max(0, level), 2 * tpm * PERIOD_US)
        state.tt = max(state.tt, now)
    if delta and limits.tokens_per_day is not None and state.day == ticket.day:
        state.used = max(0, state.used + delta)
