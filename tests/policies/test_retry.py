from __future__ import annotations

import asyncio
import statistics

import pytest

from gateway.config import RetryConfig
from gateway.errors import InvalidRequest, UpstreamError
from policies.retry import AttemptFailed, RetryBudget, RetryPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def failure(retryable: bool = True, retry_after_s: float | None = None) -> AttemptFailed:
    return AttemptFailed(
        UpstreamError("boom"),
        backend="b",
        retryable=retryable,
        backend_fault=True,
        retry_after_s=retry_after_s,
    )


def policy(budget: RetryBudget | None = None, **config: float) -> RetryPolicy:
    settings = RetryConfig(**{"backoff_initial_s": 0.001, "backoff_max_s": 0.002, **config})
    return RetryPolicy(settings, budget or RetryBudget(1.0, 10, 100))


def far() -> float:
    return asyncio.get_running_loop().time() + 60


async def test_success_needs_one_attempt() -> None:
    calls: list[int] = []

    async def attempt(number: int) -> str:
        calls.append(number)
        return "ok"

    assert await policy(max_retries=2).run(attempt, deadline=far()) == "ok"
    assert calls == [0]


async def test_retryable_failures_are_retried_until_success() -> None:
    calls: list[int] = []
    delays: list[float] = []

    async def attempt(number: int) -> str:
        calls.append(number)
        if number < 2:
            raise failure()
        return "third time"

    result = await policy(max_retries=2).run(
        attempt, deadline=far(), on_retry=lambda f, delay: delays.append(delay)
    )
    assert result == "third time" and calls == [0, 1, 2]
    # Within each retry's window (its spread is test_backoff_is_full_jitter...'s).
    assert len(delays) == 2 and 0 <= delays[0] <= 0.001 and 0 <= delays[1] <= 0.002


async def test_backoff_is_full_jitter_uniform_from_zero_to_a_doubling_cap() -> None:
    """Retry n waits uniform(0, min(backoff_max_s, backoff_initial_s * 2**(n - 1))).

    Many draws per retry number: plain exponential backoff (always the cap), equal jitter
    (cap/2 + uniform(0, cap/2)) or a window that does not widen would each fail. Every
    statistical bound is at least 6 standard deviations wide for 400 uniform draws, so a
    false failure is below one in a billion.
    """
    initial, ceiling = 1e-5, 3e-5  # tiny: the test does not wait for its 1200 sleeps
    caps = [initial, 2 * initial, ceiling]  # retries 1, 2 (doubled), 3 (held at the max)
    samples = 400
    retry = policy(
        RetryBudget(1.0, 10, 1e6),
        max_retries=len(caps),
        backoff_initial_s=initial,
        backoff_max_s=ceiling,
    )
    waits: list[float] = []

    async def attempt(number: int) -> str:
        raise failure()

    for _ in range(samples):
        with pytest.raises(AttemptFailed):
            await retry.run(attempt, deadline=far(), on_retry=lambda f, delay: waits.append(delay))
    assert len(waits) == samples * len(caps)
    drawn = [waits[number :: len(caps)] for number in range(len(caps))]  # per retry number

    for cap, delays in zip(caps, drawn, strict=True):
        assert all(0 <= d <= cap * (1 + 1e-9) for d in delays)
        assert len(set(delays)) > 0.9 * samples  # drawn afresh each time, not fixed
        assert min(delays) < 0.1 * cap and max(delays) > 0.9 * cap  # from 0 to the cap
        assert 0.4 * cap < statistics.fmean(delays) < 0.6 * cap  # uniform: mean cap/2
        quarters = [0, 0, 0, 0]
        for delay in delays:
            quarters[min(int(delay / cap * 4), 3)] += 1
        assert all(0.1 * samples < count < 0.4 * samples for count in quarters)


async def test_retries_are_bounded_and_the_last_failure_is_raised() -> None:
    calls: list[int] = []

    async def attempt(number: int) -> str:
        calls.append(number)
        raise failure()

    with pytest.raises(AttemptFailed):
        await policy(max_retries=2).run(attempt, deadline=far())
    assert calls == [0, 1, 2]


async def test_non_retryable_failure_is_not_retried() -> None:
    calls: list[int] = []

    async def attempt(number: int) -> str:
        calls.append(number)
        raise AttemptFailed(
            InvalidRequest("bad"), backend="b", retryable=False, backend_fault=False
        )

    with pytest.raises(AttemptFailed) as caught:
        await policy(max_retries=2).run(attempt, deadline=far())
    assert calls == [0] and isinstance(caught.value.error, InvalidRequest)


async def test_retry_after_is_honoured_up_to_the_cap() -> None:
    delays: list[float] = []

    async def attempt(number: int) -> str:
        if number == 0:
            raise failure(retry_after_s=7)
        return "ok"

    await policy(max_retries=1, retry_after_max_s=0.01).run(
        attempt, deadline=far(), on_retry=lambda f, delay: delays.append(delay)
    )
    assert delays == [0.01]


async def test_no_retry_that_would_end_past_the_deadline() -> None:
    calls: list[int] = []

    async def attempt(number: int) -> str:
        calls.append(number)
        raise failure(retry_after_s=5)

    deadline = asyncio.get_running_loop().time() + 1.0
    with pytest.raises(AttemptFailed):
        await policy(max_retries=4, retry_after_max_s=5).run(attempt, deadline=deadline)
    assert calls == [0]


async def test_an_empty_budget_stops_retries() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.0, window_s=10, min_per_s=0.0, clock=clock)
    calls: list[int] = []

    async def attempt(number: int) -> str:
        calls.append(number)
        raise failure()

    with pytest.raises(AttemptFailed):
        await policy(budget, max_retries=3).run(attempt, deadline=far())
    assert calls == [0]


def test_budget_allows_a_share_of_requests_over_the_window() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, window_s=10, min_per_s=0.0, clock=clock)
    for _ in range(10):
        budget.record_request()
    assert budget.can_spend()
    budget.spend()
    budget.spend()
    assert not budget.can_spend()  # 2 retries for 10 requests is the 20% share
    clock.now += 5
    for _ in range(5):
        budget.record_request()
    assert budget.can_spend()  # 15 requests in the window now allow 3
    budget.spend()
    assert not budget.can_spend()
    clock.now += 11  # everything above has left the window
    assert not budget.can_spend()
    budget.record_request()
    budget.record_request()
    budget.record_request()
    budget.record_request()
    budget.record_request()
    assert budget.can_spend()


def test_budget_floor_allows_retries_when_traffic_is_low() -> None:
    budget = RetryBudget(ratio=0.0, window_s=10, min_per_s=0.3, clock=Clock())
    for _ in range(3):
        assert budget.can_spend()
        budget.spend()
    assert not budget.can_spend()


async def test_no_retries_means_one_attempt() -> None:
    calls: list[int] = []

    async def attempt(number: int) -> str:
        calls.append(number)
        raise failure()

    with pytest.raises(AttemptFailed):
        await policy(max_retries=0).run(attempt, deadline=far())
    assert calls == [0]


async def test_the_deprecated_attempts_counts_the_first_attempt() -> None:
    calls: list[int] = []

    async def attempt(number: int) -> str:
        calls.append(number)
        raise failure()

    with pytest.raises(AttemptFailed):
        await policy(attempts=2).run(attempt, deadline=far())
    assert calls == [0, 1]  # attempts: 2 is max_retries: 1
