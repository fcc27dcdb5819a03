"""Backend selection strategies, one per `strategy` of a model route.

- weighted: smooth weighted round robin, as nginx does it. Deterministic and evenly
  interleaved: weights 3:1 give a a b a, a a b a, ... rather than bursts.
- least_inflight: the fewest requests in flight per unit of weight.
- p2c_latency: power of two choices on a latency EWMA times the load, seeded.

Every strategy picks an index among the eligible candidates, or None if none is.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol


class SmoothWeighted:
    __slots__ = ("_current", "_weights")

    def __init__(self, weights: Sequence[int]) -> None:
        if not weights or any(weight < 1 for weight in weights):
            raise ValueError("weights must be a non-empty sequence of positive integers")
        self._weights = tuple(weights)
        self._current = [0] * len(weights)

    def pick(
        self, candidates: Sequence[Candidate] | None = None, eligible: Sequence[bool] | None = None
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


class Candidate(Protocol):
    """What load-aware strategies read of a backend."""

    @property
    def in_flight(self) -> int: ...

    @property
    def latency_ewma_s(self) -> float: ...

    @property
    def weight(self) -> int: ...


class Selector(Protocol):
    def pick(self, candidates: Sequence[Candidate], eligible: Sequence[bool]) -> int | None: ...


def create_selector(strategy: str, weights: Sequence[int], seed: int) -> Selector:
    if strategy == "least_inflight":
        return LeastInFlight()
    if strategy == "p2c_latency":
        return PowerOfTwoChoices(seed)
    return SmoothWeighted(weights)


class LeastInFlight:
    """The eligible backend with the fewest requests in flight per unit of weight.

    Ties rotate, so that an idle pool is still spread evenly.
    """

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Candidate], eligible: Sequence[bool]) -> int | None:
        count = len(candidates)
        best = None
        best_load = 0.0
        for offset in range(count):
            index = (self._next + offset) % count
            if not eligible[index]:
                continue
            load = candidates[index].in_flight / candidates[index].weight
            if best is None or load < best_load:
                best, best_load = index, load
        if best is not None:
            self._next = (best + 1) % count
        return best


class PowerOfTwoChoices:
    """Two eligible backends drawn at random; the one with the lower expected wait wins.

    The expected wait is the latency EWMA times the requests in flight plus one; a backend
    without a latency yet scores as the fastest, so that it gets measured. The draws come
    from a seeded generator: the same seed and the same calls give the same choices.
    """

    __slots__ = ("_random",)

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def pick(self, candidates: Sequence[Candidate], eligible: Sequence[bool]) -> int | None:
        pool = [index for index, ok in enumerate(eligible) if ok]
        if not pool:
            return None
        if len(pool) == 1:
            return pool[0]
        first, second = self._random.sample(pool, 2)
        return (
            first
            if _expected_wait(candidates[first]) <= _expected_wait(candidates[second])
            else second
        )


def _expected_wait(candidate: Candidate) -> float:
    return candidate.latency_ewma_s * (candidate.in_flight + 1)
