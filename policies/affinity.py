"""Affinity: the same key goes to the same backend, unless that backend is too busy.

Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, 2016). Each backend
owns points on a hash ring, as many as its share of the total weight; a key hashes to a
position and walks clockwise to the first eligible backend that is below its capacity,

    capacity(b) = (1 + epsilon) * (total_load + 1) * weight(b) / total_weight

over the eligible backends (with equal weights, the paper's `(1 + ε)(m + 1) / n`). A key
therefore stays where it is while its backend carries at most 1 + epsilon times its fair share,
and spills to the next backend on the ring beyond that: one hot key cannot melt one worker
(LESSONS.md 11). Because the capacities add up to more than the total load, some eligible
backend is always below its own, so the walk always ends. A backend that is ejected or full
only loses the keys that landed on it; every other key stays put.

The key must name a conversation or a user (a session header, OpenAI's `user` field), never
the system prompt: that is shared by every conversation of a tenant and would send them all to
one backend. Requests without a key go to the fallback strategy (least loaded per weight).

Nothing is kept per key: the ring is built once from the backends' names and weights, so every
process and replica with the same configuration maps a key to the same backend.
"""

from __future__ import annotations

import hashlib
import zlib
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from policies.selection import Candidate, Selector

POINTS_PER_BACKEND = 256  # for a backend of average weight: its share of keys within ~±10%
MAX_RING_POINTS = 16_384  # the ring's bound, whatever the weights and the number of backends
MAX_KEY_CHARS = 1024  # a longer key is hashed by its first 1024 characters


class AffinityRing:
    """A `Selector` that maps a key to a backend, bounded by load; without a key, `fallback`."""

    __slots__ = ("_epsilon", "_fallback", "_owners", "_points", "_weights")

    def __init__(
        self,
        names: Sequence[str],
        weights: Sequence[int],
        *,
        fallback: Selector,
        epsilon: float = 0.25,
    ) -> None:
        if not names or len(names) != len(weights) or any(weight < 1 for weight in weights):
            raise ValueError("names and positive weights must be non-empty and of equal length")
        if len(set(names)) != len(names):
            raise ValueError("backend names must be unique")
        if not epsilon > 0:
            raise ValueError("epsilon must be positive")
        self._weights = tuple(weights)
        self._epsilon = epsilon
        self._fallback = fallback
        self._points, self._owners = _ring(names, self._weights)

    def pick(
        self, candidates: Sequence[Candidate], eligible: Sequence[bool], key: str | None = None
    ) -> int | None:
        if key is None:
            return self._fallback.pick(candidates, eligible)
        return self.pick_at(candidates, eligible, key_hash(key))

    def pick_at(
        self, candidates: Sequence[Candidate], eligible: Sequence[bool], point: int
    ) -> int | None:
        """`pick` for a key already hashed to `point`: how a logged decision is replayed."""
        weights = self._weights
        load = 0
        weight = 0
        for index, ok in enumerate(eligible):
            if ok:
                load += candidates[index].load
                weight += weights[index]
        if not weight:
            return None
        # Below capacity: load < scale * weight. For a whole load that is the same as
        # load < ceil(scale * weight), the paper's rounding, without the ceil.
        scale = (1.0 + self._epsilon) * (load + 1) / weight
        owners = self._owners
        size = len(owners)
        start = bisect_left(self._points, point)
        for step in range(size):
            position = start + step
            index = owners[position if position < size else position - size]
            if eligible[index] and candidates[index].load < scale * weights[index]:
                return index
        return None  # unreachable while loads are what they claim: the capacities add up to more

    def state(self) -> Any:
        return self._fallback.state()

    def restore(self, state: Any) -> None:
        self._fallback.restore(state)


def request_key(
    header: bytes | None, headers: Iterable[tuple[bytes, bytes]], payload: Mapping[str, Any]
) -> str | None:
    """A request's affinity key: the value of `header` (a lower-case ASGI header name), or
    OpenAI's `user` field when `header` is None; None when the request has none.

    Deliberately nothing derived from the prompt: see the module's notes.
    """
    if header is None:
        user = payload.get("user")
        return user if isinstance(user, str) and user else None
    for name, value in headers:
        if name == header:
            return value.decode("latin-1") or None
    return None


def key_hash(key: str) -> int:
    """The key's position on the ring: stable across processes, unlike `hash()` (salted).

    CRC-32 costs ~130 ns where BLAKE2b costs ~420 ns, and spreads keys evenly enough: the
    ring's points, hashed once with BLAKE2b, carry the randomness that balance depends on.
    """
    return zlib.crc32(key[:MAX_KEY_CHARS].encode("utf-8", "surrogatepass"))


def _ring(names: Sequence[str], weights: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Sorted points and the backend index owning each, points in proportion to weight.

    A point is named after its backend and its number, never the backend's position in the
    list, so reordering the configuration moves no key.
    """
    total = sum(weights)
    budget = min(POINTS_PER_BACKEND * len(weights), MAX_RING_POINTS)
    ring: list[tuple[int, str, int]] = []
    for index, (name, weight) in enumerate(zip(names, weights, strict=True)):
        for number in range(max(1, round(budget * weight / total))):
            label = f"{name}#{number}".encode()
            point = int.from_bytes(hashlib.blake2b(label, digest_size=4).digest(), "big")
            ring.append((point, name, index))  # the name breaks (rare) ties the same way anywhere
    ring.sort()
    return [point for point, _, _ in ring], [index for _, _, index in ring]
