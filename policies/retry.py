"""Retries: whether, when and how often an attempt that failed before the first byte is tried again.

tenacity owns the policy (what is retryable, full-jitter exponential backoff, an upstream's
Retry-After honoured up to a cap, max_retries and the request's deadline as stop conditions).
It costs about 38 µs a request even when nothing fails, so the first attempt runs bare and
tenacity takes over only after a retryable failure, replaying that failure as its first attempt.

A retry budget bounds retries to a share of requests over a sliding window, so that when a
backend struggles, retries from every client cannot finish it off (LESSONS.md 5).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from gateway.config import RetryConfig
from gateway.errors import GatewayError
from policies.window import SlidingPair

T = TypeVar("T")


class AttemptFailed(Exception):
    """One attempt failed before anything reached the client.

    `error` is what the client is told if nothing else works; `retryable` says whether
    another attempt is worth it; `backend_fault` whether the backend is to blame (its
    circuit breaker counts those; a 429 or a client's 400 are not the backend's fault).
    A signal between the router and its policies, outside `gateway.errors`' tree: what a
    client may be told is `error`.
    """

    def __init__(
        self,
        error: GatewayError,
        *,
        backend: str,
        retryable: bool,
        backend_fault: bool,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.backend = backend
        self.retryable = retryable
        self.backend_fault = backend_fault
        self.retry_after_s = retry_after_s


class RetryBudget:
    """At most `ratio` retries per request over `window_s`, plus `min_per_s` always allowed."""

    __slots__ = ("_counts", "_min_retries", "_ratio")

    def __init__(
        self,
        ratio: float,
        window_s: float,
        min_per_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ratio = ratio
        self._min_retries = min_per_s * window_s
        self._counts = SlidingPair(window_s, clock)  # requests, retries

    def record_request(self) -> None:
        self._counts.add_first()

    def can_spend(self) -> bool:
        requests, retries = self._counts.totals()
        return retries < max(self._min_retries, self._ratio * requests)

    def spend(self) -> None:
        self._counts.add_second()


class RetryPolicy:
    @classmethod
    def from_config(cls, config: RetryConfig) -> RetryPolicy:
        """The route's policy with a budget of its own."""
        budget = RetryBudget(config.budget_ratio, config.budget_window_s, config.budget_min_per_s)
        return cls(config, budget)

    def __init__(self, config: RetryConfig, budget: RetryBudget) -> None:
        self.config = config
        self.budget = budget
        self._jitter = wait_random_exponential(
            multiplier=config.backoff_initial_s, max=config.backoff_max_s
        )

    async def run(
        self,
        attempt: Callable[[int], Awaitable[T]],
        *,
        deadline: float,
        on_retry: Callable[[AttemptFailed, float], None] | None = None,
    ) -> T:
        """Run `attempt(0)`, then `attempt(1)`... while failures are retryable and allowed.

        Raises the last `AttemptFailed` when one is not retryable or when the attempts,
        the budget or the time up to `deadline` (event-loop time) run out.
        """
        self.budget.record_request()
        try:
            return await attempt(0)
        except AttemptFailed as failure:
            if not failure.retryable or self.config.max_retries == 0:
                raise
            first = failure

        loop = asyncio.get_running_loop()

        def worth_retrying(exc: BaseException) -> bool:
            return isinstance(exc, AttemptFailed) and exc.retryable and self.budget.can_spend()

        def before_sleep(state: RetryCallState) -> None:
            self.budget.spend()
            failure = _failure_of(state)
            if on_retry is not None and failure is not None:
                on_retry(failure, state.upcoming_sleep)

        attempts = self.config.max_retries + 1  # tenacity counts the first attempt too
        retrying = AsyncRetrying(
            stop=stop_any(stop_after_attempt(attempts), stop_at(deadline, loop.time)),
            wait=self._wait,
            retry=retry_if_exception(worth_retrying),
            before_sleep=before_sleep,
            reraise=True,
        )
        async for trial in retrying:
            with trial:
                number = trial.retry_state.attempt_number - 1
                if number == 0:
                    raise first  # replayed: tenacity decides on it like any other
                return await attempt(number)
        raise AssertionError("unreachable: tenacity either returns or raises")

    def _wait(self, state: RetryCallState) -> float:
        failure = _failure_of(state)
        if failure is not None and failure.retry_after_s is not None:
            return min(failure.retry_after_s, self.config.retry_after_max_s)
        return float(self._jitter(state))


class stop_at(stop_base):
    """Stop when the next wait would end at or after `deadline` on `clock`."""

    def __init__(self, deadline: float, clock: Callable[[], float]) -> None:
        self.deadline = deadline
        self.clock = clock

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.clock() + retry_state.upcoming_sleep >= self.deadline


def _failure_of(state: RetryCallState) -> AttemptFailed | None:
    outcome = state.outcome
    if outcome is None or not outcome.failed:
        return None
    exc = outcome.exception()
    return exc if isinstance(exc, AttemptFailed) else None
