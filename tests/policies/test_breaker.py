from __future__ import annotations

import time

import pybreaker
import pytest

from gateway.config import BreakerConfig
from gateway.errors import BreakerOpen, InvalidRequest, NoLiveBackend, UpstreamError
from policies.breaker import BackendBreaker
from policies.retry import AttemptFailed


def fail(breaker: BackendBreaker, backend_fault: bool = True) -> None:
    error = UpstreamError("boom") if backend_fault else InvalidRequest("bad")
    with pytest.raises(AttemptFailed), breaker.attempt():
        raise AttemptFailed(error, backend="b", retryable=True, backend_fault=backend_fault)


def succeed(breaker: BackendBreaker) -> None:
    with breaker.attempt():
        pass


def config(**overrides: float) -> BreakerConfig:
    return BreakerConfig(
        **{"consecutive_failures": 3, "open_s": 0.05, "min_requests": 1000, **overrides}
    )


def wait_until_cooled(breaker: BackendBreaker, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not breaker.allows():
        assert time.monotonic() < deadline, "breaker never cooled down"
        time.sleep(0.005)


def test_consecutive_failures_open_then_a_probe_closes() -> None:
    changes: list[tuple[str, str]] = []
    breaker = BackendBreaker(
        "b", config(), on_change=lambda name, old, new: changes.append((old, new))
    )
    fail(breaker)
    succeed(breaker)  # a success resets the consecutive count
    for _ in range(3):
        fail(breaker)
    assert breaker.state == "open" and not breaker.allows()
    ran = False
    with pytest.raises(BreakerOpen) as refused, breaker.attempt():
        ran = True
    assert not ran and refused.value.backend == "b"
    assert isinstance(refused.value, NoLiveBackend) and refused.value.status == 503
    assert not isinstance(refused.value, pybreaker.CircuitBreakerError)
    wait_until_cooled(breaker)
    succeed(breaker)  # the probe
    assert breaker.state == "closed" and breaker.allows()
    assert ("closed", "open") in changes and ("half-open", "closed") in changes


def test_a_failure_that_ends_after_another_opened_the_breaker_stays_its_own() -> None:
    breaker = BackendBreaker("b", config(consecutive_failures=1, open_s=60))
    failure = AttemptFailed(UpstreamError("late"), backend="b", retryable=True, backend_fault=True)
    with pytest.raises(AttemptFailed) as caught, breaker.attempt():  # closed: unguarded
        fail(breaker)  # meanwhile another attempt fails and opens it
        raise failure
    assert caught.value is failure  # not the breaker refusing to hear of it
    assert breaker.state == "open"


def test_failed_probe_reopens() -> None:
    breaker = BackendBreaker("b", config(consecutive_failures=1))
    fail(breaker)
    wait_until_cooled(breaker)
    fail(breaker)
    assert breaker.state == "open" and not breaker.allows()


def test_half_open_admits_a_bounded_number_of_probes() -> None:
    breaker = BackendBreaker("b", config(consecutive_failures=1, half_open_probes=1))
    fail(breaker)
    wait_until_cooled(breaker)
    with breaker.attempt():
        assert not breaker.allows()  # one probe in flight: nobody else
    assert breaker.allows()


def test_failure_ratio_opens_without_consecutive_failures() -> None:
    breaker = BackendBreaker(
        "b", config(consecutive_failures=100, min_requests=10, failure_ratio=0.5)
    )
    for _ in range(5):
        succeed(breaker)
        assert breaker.state == "closed"
        fail(breaker)
    assert breaker.state == "open"


def test_client_errors_do_not_count() -> None:
    breaker = BackendBreaker("b", config(consecutive_failures=2, min_requests=1))
    for _ in range(10):
        fail(breaker, backend_fault=False)
    assert breaker.state == "closed"
