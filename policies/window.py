"""Two counters over a sliding time window, kept in one-second buckets.

Memory is bounded by the window (one bucket per second at most), and adding costs a
comparison in the common case of several events in the same second.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable


class SlidingPair:
    """Counts of two kinds of event (`first`, `second`) over the last `window_s` seconds."""

    __slots__ = ("_buckets", "_clock", "_window")

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self._window = max(1, math.ceil(window_s))
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [second, first, second]

    def _current(self) -> list[int]:
        second = int(self._clock())
        buckets = self._buckets
        if not buckets or buckets[-1][0] != second:
            buckets.append([second, 0, 0])
            while buckets[0][0] <= second - self._window:
                buckets.popleft()
        return buckets[-1]

    def add_first(self) -> None:
        self._current()[1] += 1

    def add_second(self) -> None:
        self._current()[2] += 1

    def totals(self) -> tuple[int, int]:
        self._current()  # drops buckets that left the window
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    def clear(self) -> None:
        self._buckets.clear()
