"""Backend selection strategies, one per `strategy` of a model route.

- weighted: smooth weighted round robin, as nginx does it. Deterministic and evenly
  interleaved: weights 3:1 give a a b a, a a b a, ... rather than bursts.
- least_inflight: the least load per unit of weight.
- p2c_latency: power of two choices on a latency EWMA times the load, seeded.
- affinity: consistent hashing with bounded loads on a per-request key (policies.affinity);
  requests without a key go by least load.

Load is a candidate's requests in flight from this gateway, plus those others sent it while
its vLLM metrics say so (policies.load). Every strategy picks an index among the eligible
candidates, or None if none is. Only affinity reads the request's key; the others ignore it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from policies.affinity import AffinityRing


class SmoothWeighted:
    __slots__ = ("_current", "_weights")

    def __init__(self, weights: Sequence[int]) -> None:
        if not weights or any(weight < 1 for weight in weights):
            raise ValueError("weights must be a non-empty sequence of positive integers")
        self._weights = tuple(weights)
        self._current = [0] * len(weights)

    def pick(
        self,
        candidates: Sequence[Candidate] | None = None,
        eligible: Sequence[bool] | None = None,
        key: str | None = None,
    ) -> int | None:
        """Index of the next backend among the eligible ones, or None if none is."""
        best = -1
        total = 0
        current = self._current
        for index, weight in enumerate(self._weights):
            if eligible is not None and not eligible[index]:
                continue
            current[index] += weight
            total += weight
            if best < 0 or current[index] > current[best]:
                best = index
        if best < 0:
            return None
        current[best] -= total
        return best

    def state(self) -> Any:
        return list(self._current)

    def restore(self, state: Any) -> None:
        self._current = [int(value) for value in state]


class Candidate(Protocol):
    """What load-aware strategies read of a backend."""

    @property
    def load(self) -> int:
        """Requests the backend is working on: this gateway's in flight, plus what its own
        metrics say others sent it while that report is fresh (policies.load)."""
        ...

    @property
    def latency_ewma_s(self) -> float: ...

    @property
    def weight(self) -> int: ...


class Selector(Protocol):
    def pick(
        self, candidates: Sequence[Candidate], eligible: Sequence[bool], key: str | None = None
    ) -> int | None: ...

    def state(self) -> Any:
        """What the next pick depends on besides its arguments (JSON-able): logged with each
        decision so that `vgate route explain` can replay it."""
        ...

    def restore(self, state: Any) -> None: ...


def create_selector(
    strategy: str,
    weights: Sequence[int],
    seed: int,
    *,
    names: Sequence[str] | None = None,
    epsilon: float = 0.25,
) -> Selector:
    """The route's selector. `names` place affinity's ring points (positions stand in when
    absent, but then reordering the backends moves keys); `epsilon` is its load bound."""
    if strategy == "least_inflight":
        return LeastInFlight()
    if strategy == "p2c_latency":
        return PowerOfTwoChoices(seed)
    if strategy == "affinity":
        names = names if names is not None else [str(index) for index in range(len(weights))]
        return AffinityRing(names, weights, fallback=LeastInFlight(), epsilon=epsilon)
    return SmoothWeighted(weights)


class LeastInFlight:
    """The eligible backend with the least load (requests in flight) per unit of weight.

    Ties rotate, so that an idle pool is still spread evenly.
    """

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(
        self, candidates: Sequence[Candidate], eligible: Sequence[bool], key: str | None = None
    ) -> int | None:
        count = len(candidates)
        best = None
        best_load = 0.0
        for offset in range(count):
            index = (self._next + offset) % count
            if not eligible[index]:
                continue
            load = candidates[index].load / candidates[index].weight
            if best is None or load < best_load:
                best, best_load = index, load
        if best is not None:
            self._next = (best + 1) % count
        return best

    def state(self) -> Any:
        return self._next

    def restore(self, state: Any) -> None:
        self._next = int(state)


class PowerOfTwoChoices:
    """Two eligible backends drawn at random; the one with the lower expected wait wins.

    The expected wait is the latency EWMA times the load plus one; a backend
    without a latency yet scores as the fastest, so that it gets measured. Draw n is a
    function of (seed, n) alone (SplitMix64), so the same seed and the same calls give the
    same choices, and a logged draw number replays one decision.
    """

    __slots__ = ("_draws", "_seed")

    def __init__(self, seed: int) -> None:
        self._seed = seed & _MASK64
        self._draws = 0

    def state(self) -> Any:
        return self._draws

    def restore(self, state: Any) -> None:
        self._draws = int(state)

    def pick(
        self, candidates: Sequence[Candidate], eligible: Sequence[bool], key: str | None = None
    ) -> int | None:
        pool = [index for index, ok in enumerate(eligible) if ok]
        if not pool:
            return None
        if len(pool) == 1:
            return pool[0]
        bits = _splitmix64(self._seed + self._draws * _GOLDEN)
        self._draws += 1
        size = len(pool)
        first_at = bits % size
        second_at = (first_at + 1 + (bits >> 32) % (size - 1)) % size  # never the first
        first, second = pool[first_at], pool[second_at]
        return (
            first
            if _expected_wait(candidates[first]) <= _expected_wait(candidates[second])
            else second
        )


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(value: int) -> int:
    value = (value + _GOLDEN) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _expected_wait(candidate: Candidate) -> float:
    return candidate.latency_ewma_s * (candidate.load + 1)
