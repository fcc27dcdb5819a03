"""The sliding window under the breaker's failure ratio and the retry budget."""

from __future__ import annotations

import random

from policies.window import MAX_BUCKETS, SlidingPair


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_events_leave_the_window_as_it_slides() -> None:
    clock = Clock()
    pair = SlidingPair(10, clock)
    pair.add_first()
    pair.add_second()
    clock.now += 5
    pair.add_first()
    assert pair.totals() == (2, 1)
    clock.now += 5  # the first second is 10 s old: out
    assert pair.totals() == (1, 0)
    clock.now += 5
    assert pair.totals() == (0, 0)
    pair.add_second()
    pair.clear()
    assert pair.totals() == (0, 0)


def test_a_long_window_holds_a_bounded_number_of_buckets() -> None:
    """A breaker or retry budget configured over a day kept a bucket per second of it
    (86,400) and summed them all on every failure and retry."""
    clock = Clock()
    day = 86_400
    pair = SlidingPair(day, clock)
    for _ in range(2 * day // 7):  # an event every 7 s for two days
        pair.add_first()
        if int(clock.now) % 2:
            pair.add_second()
        clock.now += 7
        assert len(pair._buckets) <= MAX_BUCKETS + 1
    first, second = pair.totals()
    # A day's worth, give or take the one bucket (144 s) at the window's edge.
    assert abs(first - day / 7) <= 144 / 7 + 1
    assert abs(second - day / 14) <= 144 / 7 + 1


def test_the_totals_are_the_events_of_the_window_seconds() -> None:
    rng = random.Random(3)
    clock = Clock()
    pair = SlidingPair(30, clock)
    events: list[tuple[int, int]] = []  # (second, kind)
    for _ in range(5_000):
        clock.now += rng.choice([0, 0, 0, 0.3, 1, 2.5, 40])
        kind = rng.choice([1, 2])
        (pair.add_first if kind == 1 else pair.add_second)()
        events.append((int(clock.now), kind))
        recent = [k for second, k in events if second > int(clock.now) - 30]
        assert pair.totals() == (recent.count(1), recent.count(2))
