"""Per-key usage as this process counted it: requests and tokens today (UTC).

The admin API's `process_usage` (see gateway.edge.admin): what this process served; the shared
figures (through Redis) are the limit store's `limits_usage`. Fed once per proxied request,
when it ends, from its record. Bounded: one entry per key id, and ids no longer in the keys file
are dropped on every reload.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import Any

from gateway.edge.auth import KeyRing
from gateway.edge.record import RequestRecord
from policies.cache import WITHOUT_UPSTREAM

_DAY_S = 86_400


class KeyUsage:
    __slots__ = ("_clock", "_counts", "_day", "_keys")

    def __init__(self, keys: KeyRing, clock: Callable[[], float] = time.time) -> None:
        self._keys = keys
        self._clock = clock
        self._day = int(clock() // _DAY_S)
        # key id -> [requests, prompt tokens, completion tokens], today.
        self._counts: dict[str, list[int]] = {}

    def observe(self, key_id: str, record: RequestRecord) -> None:
        """Count one finished request of `key_id` (called by the middleware, once)."""
        day = int(self._clock() // _DAY_S)
        if day != self._day:
            self._day = day
            self._counts.clear()
        counts = self._counts.get(key_id)
        if counts is None:
            counts = self._counts[key_id] = [0, 0, 0]
        counts[0] += 1
        if record.cache in WITHOUT_UPSTREAM:
            return  # an answer from the cache, or shared: no upstream tokens, as for limits
        if record.prompt_tokens:
            counts[1] += record.prompt_tokens
        if record.completion_tokens:
            counts[2] += record.completion_tokens

    def retain(self, key_ids: Collection[str]) -> None:
        """Forget keys that are gone from the keys file."""
        for key_id in [k for k in self._counts if k not in key_ids]:
            del self._counts[key_id]

    async def usage(self, key_id: str) -> dict[str, Any]:
        day = int(self._clock() // _DAY_S)
        requests = prompt = completion = 0
        if day == self._day and key_id in self._counts:
            requests, prompt, completion = self._counts[key_id]
        tokens = prompt + completion
        limits = self._keys.limits_of(key_id)
        per_day = limits.tokens_per_day if limits is not None else None
        return {
            "scope": "process",  # this gateway process's own count, since it started
            "day": datetime.fromtimestamp(day * _DAY_S, UTC).date().isoformat(),
            "requests_today": requests,
            "prompt_tokens_today": prompt,
            "completion_tokens_today": completion,
            "tokens_today": tokens,
            "remaining": {
                "tokens_per_day": None if per_day is None else max(0, per_day - tokens),
            },
        }
