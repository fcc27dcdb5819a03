from __future__ import annotations

import math
import random

import pytest

from policies.adaptive import AdaptiveLimit, Signal, latency_sample


def feed(limit: AdaptiveLimit, seconds: float, count: int, *, seed: int = 0, **kw: object) -> None:
    """`count` samples around `seconds` (±10% noise, as real latency has)."""
    draw = random.Random(seed)
    for _ in range(count):
        limit.on_sample(seconds * draw.uniform(0.9, 1.1), **kw)  # type: ignore[arg-type]


def test_converges_up_to_the_ceiling_under_steady_latency() -> None:
    limit = AdaptiveLimit(max_limit=256)
    assert limit.limit == 20  # a cautious start, not the ceiling
    seen = [limit.limit]
    for step in range(8):
        feed(limit, 0.4, 50, seed=step)
        seen.append(limit.limit)
    assert seen == sorted(seen) and seen[-1] == 256


def test_backs_off_when_latency_doubles_and_recovers_when_it_returns() -> None:
    limit = AdaptiveLimit(max_limit=256, initial_limit=256)
    feed(limit, 1.0, 300)
    assert limit.limit == 256
    feed(limit, 2.0, 30, seed=1)
    backed_off = limit.limit
    assert backed_off < 256 * 0.6
    feed(limit, 2.0, 30, seed=2)
    assert limit.limit < backed_off  # still shrinking while latency stays up
    low = limit.limit
    feed(limit, 1.0, 400, seed=3)
    assert limit.limit == 256 and low < 128


def test_a_latency_that_stays_high_becomes_the_new_baseline() -> None:
    limit = AdaptiveLimit(max_limit=100, initial_limit=100, long_window=100)
    feed(limit, 1.0, 200)
    feed(limit, 3.0, 20, seed=1)
    assert limit.limit < 60
    feed(limit, 3.0, 400, seed=2)
    assert limit.limit == 100


def test_drops_halve_the_limit_once_per_window() -> None:
    limit = AdaptiveLimit(max_limit=100, initial_limit=100)
    limit.on_sample(0.0, dropped=True)
    assert limit.limit == 50
    for _ in range(99):  # the rest of the requests that were out when the first timed out
        limit.on_sample(30.0, dropped=True)
    assert limit.limit == 50
    limit.on_sample(30.0, dropped=True)  # a window later: still dropping
    assert limit.limit == 25


def test_stays_within_bounds() -> None:
    limit = AdaptiveLimit(max_limit=8, min_limit=2, initial_limit=100)
    assert limit.limit == 8
    for _ in range(10):
        for _ in range(limit.limit):
            limit.on_sample(30.0, dropped=True)
    assert limit.limit == 2
    draw = random.Random(7)
    for _ in range(5000):
        limit.on_sample(
            draw.choice((0.01, 1.0, 10.0)) * draw.random(), dropped=draw.random() < 0.05
        )
        assert 2 <= limit.limit <= 8
    feed(limit, 0.01, 1000)
    assert limit.limit == 8
    assert AdaptiveLimit(max_limit=4, min_limit=3, initial_limit=1).limit == 3


def test_does_not_grow_while_idle() -> None:
    limit = AdaptiveLimit(max_limit=256)
    feed(limit, 0.5, 500, in_flight=3)  # 3 in flight never tests a limit of 20
    assert limit.limit == 20
    feed(limit, 0.5, 50, in_flight=15)
    assert limit.limit > 20


def test_signals_keep_their_own_baselines() -> None:
    limit = AdaptiveLimit(max_limit=64, initial_limit=64)
    # Interleaved: streams' time to first token (~0.2 s) and non-streams' time per token
    # (~0.02 s). One shared baseline would read every first-token sample as a 10x slowdown.
    draw = random.Random(1)
    for _ in range(500):
        limit.on_sample(0.2 * draw.uniform(0.9, 1.1), signal=Signal.FIRST_TOKEN)
        limit.on_sample(0.02 * draw.uniform(0.9, 1.1), signal=Signal.PER_TOKEN)
    assert limit.limit == 64
    for _ in range(20):  # first tokens slow down (queueing) while decode speed holds
        limit.on_sample(0.6, signal=Signal.FIRST_TOKEN)
        limit.on_sample(0.02, signal=Signal.PER_TOKEN)
    assert limit.limit < 40


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_ignores_meaningless_samples(bad: float) -> None:
    limit = AdaptiveLimit(max_limit=64)
    feed(limit, 0.1, 10)
    before = limit.limit
    limit.on_sample(bad)
    assert limit.limit == before


def test_latency_sample_normalises_by_what_is_known() -> None:
    assert latency_sample(0.3, stream=True, completion_tokens=50) == (0.3, Signal.FIRST_TOKEN)
    assert latency_sample(2.0, stream=False, completion_tokens=100) == (0.02, Signal.PER_TOKEN)
    assert latency_sample(2.0, stream=False, completion_tokens=0) == (2.0, Signal.TOTAL)
    assert latency_sample(2.0, stream=False) == (2.0, Signal.TOTAL)


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        AdaptiveLimit(max_limit=4, min_limit=5)
    with pytest.raises(ValueError):
        AdaptiveLimit(max_limit=4, min_limit=0)
    with pytest.raises(ValueError):
        AdaptiveLimit(max_limit=4, tolerance=0.5)
    with pytest.raises(ValueError):
        AdaptiveLimit(max_limit=4, short_window=10, long_window=10)
