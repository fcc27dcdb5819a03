"""An adaptive concurrency limit per backend: as many requests at once as it serves well.

A static `max_in_flight` is either too high (the worker queues, latency climbs for everyone)
or too low (GPUs idle). This limit follows latency instead, in the manner of Netflix
concurrency-limits' Gradient2:

- a long-term baseline of latency (an average over ~`long_window` samples) and a short-term
  one (an average over the last few) are kept;
- gradient = clamp(tolerance * long / short, 0.5, 1): 1 while latency stays within
  `tolerance` times its baseline, below 1 as it rises beyond that;
- new = limit * gradient + sqrt(limit), blended into the limit with weight `smoothing`: a
  steady latency grows the limit by `smoothing * sqrt(limit)` per sample (20 to 256 in about
  120 samples), a doubled one shrinks it by about 5% per sample;
- a dropped request (timed out, or refused as overloaded) halves the limit, once per window
  of `limit` samples, as TCP does once per round trip: a burst of timeouts among requests
  that were all sent before the first one came back is one signal, not fifty;
- the limit grows only while the backend is busy enough to test it (in flight at least half
  the limit), or an idle period would drift it up to the ceiling unmeasured;
- a latency that stays high becomes the new baseline within ~`long_window` samples (the
  work changed: longer prompts, another mix), and the limit grows back; when latency then
  falls to well below that baseline, it is pulled down faster than the average would.

The limit stays within [`min_limit`, `max_limit`], the latter the backend's static
`max_in_flight`.

LLM latency depends on how much is generated, so samples are normalised (`latency_sample`):
a stream's time to first token (queueing and prefill: what concurrency changes), otherwise
seconds per completion token when usage is known (decode slows as the batch grows), else the
raw latency. The three are different units, so each has its own baselines; they share the
one limit. A sample costs a few float operations (~0.6 µs), O(1); there are no timers.
"""

from __future__ import annotations

import math
from enum import IntEnum

from gateway.config import AdaptiveConcurrencyConfig

WARMUP_SAMPLES = 10


class Signal(IntEnum):
    FIRST_TOKEN = 0  # a stream's time to first token
    PER_TOKEN = 1  # a non-stream's latency per completion token
    TOTAL = 2  # a non-stream's latency, usage unknown


def latency_sample(
    latency_s: float, *, stream: bool, completion_tokens: int | None = None
) -> tuple[float, Signal]:
    """The sample to feed `on_sample` for one attempt, and which kind it is.

    For a stream, `latency_s` is the time to its first event; otherwise the whole exchange.
    """
    if stream:
        return latency_s, Signal.FIRST_TOKEN
    if completion_tokens:
        return latency_s / completion_tokens, Signal.PER_TOKEN
    return latency_s, Signal.TOTAL


class AdaptiveLimit:
    """One backend's limit: read `limit` when selecting, report every attempt's outcome."""

    __slots__ = (
        "_count",
        "_hold_until",
        "_limit",
        "_long",
        "_long_alpha",
        "_samples",
        "_short",
        "_short_alpha",
        "_smoothing",
        "_tolerance",
        "_whole",
        "max_limit",
        "min_limit",
    )

    @classmethod
    def from_config(cls, settings: AdaptiveConcurrencyConfig, ceiling: int) -> AdaptiveLimit:
        """Within the backend's own limit, `ceiling`."""
        return cls(
            max_limit=ceiling,
            min_limit=settings.min_limit,
            initial_limit=settings.initial_limit or min(20, ceiling),
            tolerance=settings.tolerance,
            long_window=settings.long_window,
        )

    def __init__(
        self,
        *,
        max_limit: int,
        min_limit: int = 1,
        initial_limit: int | None = None,
        tolerance: float = 1.5,
        smoothing: float = 0.2,
        long_window: int = 600,
        short_window: int = 5,
    ) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError("need 1 <= min_limit <= max_limit")
        if tolerance < 1 or not 0 < smoothing <= 1:
            raise ValueError("need tolerance >= 1 and 0 < smoothing <= 1")
        if not 1 <= short_window < long_window:
            raise ValueError("need 1 <= short_window < long_window")
        self.min_limit = min_limit
        self.max_limit = max_limit
        start = initial_limit if initial_limit is not None else min(max_limit, 20)
        self._limit = float(min(max(start, min_limit), max_limit))
        self._whole = int(self._limit)
        self._tolerance = tolerance
        self._smoothing = smoothing
        # EWMA weights as for an N-sample moving average. The baseline starts as the plain
        # mean of its first WARMUP_SAMPLES, so that a first outlier does not stand for it.
        self._long_alpha = 2.0 / (long_window + 1)
        self._short_alpha = 2.0 / (short_window + 1)
        self._short = [0.0] * len(Signal)
        self._long = [0.0] * len(Signal)
        self._count = [0] * len(Signal)
        self._samples = 0
        self._hold_until = 0

    @property
    def limit(self) -> int:
        """Requests the backend may have in flight now."""
        return self._whole

    def on_sample(
        self,
        latency_s: float,
        *,
        dropped: bool = False,
        signal: Signal = Signal.TOTAL,
        in_flight: int | None = None,
    ) -> None:
        """Count one finished attempt. `in_flight`: the backend's requests at that moment
        (None: unknown, taken as busy)."""
        self._samples += 1
        if dropped:
            if self._samples >= self._hold_until:
                self._hold_until = self._samples + self._whole
                self._set(self._limit * 0.5)
            return
        if not 0.0 < latency_s < math.inf:
            return  # nothing to learn from a zero, negative, NaN or infinite time
        counts = self._count
        count = counts[signal] + 1
        if count == 1:
            counts[signal] = 1
            self._short[signal] = self._long[signal] = latency_s
            return
        if count <= WARMUP_SAMPLES:  # counted no further: all it decides is the warm-up
            counts[signal] = count
            long_weight = 1.0 / count
            short_weight = long_weight if long_weight > self._short_alpha else self._short_alpha
        else:
            long_weight, short_weight = self._long_alpha, self._short_alpha
        short = self._short[signal]
        short += short_weight * (latency_s - short)
        long = self._long[signal]
        long += long_weight * (latency_s - long)
        if long > 2.0 * short:
            long *= 0.95  # latency is back to well below a baseline that overload inflated
        self._short[signal] = short
        self._long[signal] = long
        gradient = self._tolerance * long / short
        if gradient >= 1.0:
            if in_flight is not None and 2 * in_flight < self._whole:
                return  # idle: room to grow, but nothing tested it
            gradient = 1.0
        elif gradient < 0.5:
            gradient = 0.5
        limit = self._limit
        # sqrt(limit) of headroom: room to find out whether more would do, small next to
        # the limit when it is large, and no floor under it when latency says shrink.
        self._set(limit + self._smoothing * (limit * gradient + math.sqrt(limit) - limit))

    def _set(self, value: float) -> None:
        if value > self.max_limit:
            value = float(self.max_limit)
        elif value < self.min_limit:
            value = float(self.min_limit)
        self._limit = value
        self._whole = int(value)
