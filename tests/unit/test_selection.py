from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from policies.selection import LeastInFlight, PowerOfTwoChoices, SmoothWeighted


def test_smooth_weighted_interleaves_by_weight() -> None:
    selector = SmoothWeighted([3, 1])
    picks = [selector.pick() for _ in range(8)]
    assert picks == [0, 0, 1, 0, 0, 0, 1, 0]


def test_shares_follow_weights_exactly_over_a_cycle() -> None:
    selector = SmoothWeighted([5, 3, 2])
    counts = Counter(selector.pick() for _ in range(100))
    assert counts == {0: 50, 1: 30, 2: 20}


def test_ineligible_backends_are_skipped() -> None:
    selector = SmoothWeighted([3, 1])
    assert {selector.pick(None, [False, True]) for _ in range(5)} == {1}
    assert selector.pick(None, [False, False]) is None


def test_same_calls_give_same_choices() -> None:
    a, b = SmoothWeighted([2, 7, 1]), SmoothWeighted([2, 7, 1])
    assert [a.pick() for _ in range(30)] == [b.pick() for _ in range(30)]


def test_rejects_bad_weights() -> None:
    with pytest.raises(ValueError):
        SmoothWeighted([])
    with pytest.raises(ValueError):
        SmoothWeighted([1, 0])


@dataclass
class Load:
    in_flight: int = 0
    latency_ewma_s: float = 0.0
    weight: int = 1

    @property
    def load(self) -> int:
        return self.in_flight


def test_least_in_flight_per_weight() -> None:
    selector = LeastInFlight()
    pool = [Load(in_flight=3), Load(in_flight=1), Load(in_flight=2)]
    assert selector.pick(pool, [True, True, True]) == 1
    assert selector.pick(pool, [True, False, True]) == 2
    heavy = [Load(in_flight=4, weight=4), Load(in_flight=2, weight=1)]
    assert selector.pick(heavy, [True, True]) == 0  # 1 per weight beats 2
    assert selector.pick(pool, [False, False, False]) is None


def test_least_in_flight_rotates_ties() -> None:
    selector = LeastInFlight()
    idle = [Load(), Load(), Load()]
    assert [selector.pick(idle, [True] * 3) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_p2c_prefers_the_lower_expected_wait_and_is_seeded() -> None:
    pool = [Load(latency_ewma_s=0.5), Load(latency_ewma_s=0.01), Load(latency_ewma_s=0.5)]
    selector = PowerOfTwoChoices(seed=7)
    picks = Counter(selector.pick(pool, [True] * 3) for _ in range(300))
    # The fast one wins every draw it is in (2 of 3 draws), the others split the rest.
    assert 170 <= picks[1] <= 230 and picks[1] > picks[0] and picks[1] > picks[2]
    a, b = PowerOfTwoChoices(seed=3), PowerOfTwoChoices(seed=3)
    assert [a.pick(pool, [True] * 3) for _ in range(50)] == [
        b.pick(pool, [True] * 3) for _ in range(50)
    ]


def test_p2c_counts_load_and_respects_eligibility() -> None:
    busy_fast, idle_slow = Load(in_flight=9, latency_ewma_s=0.02), Load(latency_ewma_s=0.1)
    selector = PowerOfTwoChoices(seed=1)
    assert {selector.pick([busy_fast, idle_slow], [True, True]) for _ in range(10)} == {1}
    assert selector.pick([busy_fast, idle_slow], [True, False]) == 0
    assert selector.pick([busy_fast, idle_slow], [False, False]) is None
