"""Two counters over a sliding time window, kept in time buckets.

A bucket is a second wide, or wider for a window of more than MAX_BUCKETS seconds, so
memory is bounded whatever the window. Adding costs a comparison in the common case of
several events in the same bucket, and the totals are kept as events come and go: reading
them costs nothing however long the window (a retry budget reads them on every retry).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

MAX_BUCKETS = 600


class SlidingPair:
    """Counts of two kinds of event (`first`, `second`) over the last `window_s` seconds."""

    __slots__ = ("_buckets", "_clock", "_first", "_second", "_slots", "_width")

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        window = max(1, math.ceil(window_s))
        self._width = math.ceil(window / MAX_BUCKETS)  # seconds per bucket
        self._slots = math.ceil(window / self._width)  # buckets in the window
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [slot, first, second]
        # The totals over every bucket but the newest (which adding alone touches).
        self._first = 0
        self._second = 0

    def _current(self) -> list[int]:
        slot = int(self._clock()) // self._width
        buckets = self._buckets
        if not buckets or buckets[-1][0] != slot:
            if buckets:
                _, first, second = buckets[-1]
                self._first += first
                self._second += second
            buckets.append([slot, 0, 0])
            while buckets[0][0] <= slot - self._slots:
                _, first, second = buckets.popleft()
                self._first -= first
                self._second -= second
        return buckets[-1]

    def add_first(self) -> None:
        self._current()[1] += 1

    def add_second(self) -> None:
        self._current()[2] += 1

    def totals(self) -> tuple[int, int]:
        newest = self._current()  # drops buckets that left the window
        return self._first + newest[1], self._second + newest[2]

    def clear(self) -> None:
        self._buckets.clear()
        self._first = self._second = 0
