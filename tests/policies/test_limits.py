"""Per-key limits in one process (`LocalLimits`), with a clock the tests move: no sleeps.

The arithmetic is the one the Redis script does (test_limits_redis.py runs the same kind
of sequences on both and compares)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import LimitsConfig, load_config
from gateway.errors import (
    ConfigError,
    LimitExceeded,
    LimitsUnavailable,
    QuotaExceeded,
    TokenLimitExceeded,
)
from gateway.wire.headers import retry_after
from policies.limits import (
    ALLOWED,
    CONCURRENCY,
    DAY_US,
    MAX_LIMIT,
    REQUESTS,
    TOKENS,
    TOKENS_PER_DAY,
    KeyLimits,
    Verdict,
    estimate_tokens,
    format_duration,
    ratelimit_headers,
    unavailable,
)
from policies.limits_local import LocalLimits

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def headers(verdict: Verdict) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in verdict.headers}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> LocalLimits:
    return LocalLimits(clock=clock)


async def admit_many(store: LocalLimits, limits: KeyLimits, n: int, tokens: int = 0) -> int:
    allowed = 0
    for _ in range(n):
        allowed += (await store.admit("k", limits, tokens)).allowed
    return allowed


# Requests per minute (GCRA).


async def test_rpm_admits_exactly_the_limit_then_429_with_retry_after(
    store: LocalLimits,
) -> None:
    limits = KeyLimits(rpm=5)
    assert await admit_many(store, limits, 5) == 5
    refused = await store.admit("k", limits, 0)
    assert not refused.allowed and refused.status == 429
    assert refused.code == "rate_limit_exceeded" and refused.limit == REQUESTS
    assert refused.error().type == "requests"
    assert refused.retry_after_s == pytest.approx(12.0)  # one request every 60/5 s
    assert headers(refused)["retry-after"] == "12"
    assert refused.ticket is None


async def test_refusals_charge_nothing(store: LocalLimits, clock: Clock) -> None:
    limits = KeyLimits(rpm=5)
    assert await admit_many(store, limits, 5) == 5
    assert await admit_many(store, limits, 1000) == 0  # hammering does not push it back
    clock.advance(12.0)
    assert await admit_many(store, limits, 10) == 1


async def test_rpm_refills_smoothly_and_resets_after_a_minute(
    store: LocalLimits, clock: Clock
) -> None:
    limits = KeyLimits(rpm=60)
    assert await admit_many(store, limits, 100) == 60
    clock.advance(0.999)
    assert await admit_many(store, limits, 10) == 0
    clock.advance(0.001)
    assert await admit_many(store, limits, 10) == 1  # one per second
    clock.advance(10.0)
    assert await admit_many(store, limits, 100) == 10
    clock.advance(60.0)  # reset: the full minute's allowance again, no more
    assert await admit_many(store, limits, 100) == 60


async def test_no_double_burst_at_a_window_edge(store: LocalLimits, clock: Clock) -> None:
    """Fixed windows let `limit` through at 0:59 and `limit` again at 1:00; GCRA lets
    through at most limit * (1 + t/60) in any t seconds."""
    limits = KeyLimits(rpm=60)
    clock.now = (T0 // 60) * 60 + 59.5  # half a second before a minute boundary
    assert await admit_many(store, limits, 60) == 60
    clock.advance(0.5)  # the boundary
    assert await admit_many(store, limits, 60) == 0
    clock.advance(0.5)
    assert await admit_many(store, limits, 60) == 1
    clock.advance(59.0)  # a whole minute after the burst: 60 more over that minute
    assert await admit_many(store, limits, 100) == 59


async def test_rpm_headers(store: LocalLimits, clock: Clock) -> None:
    limits = KeyLimits(rpm=300)
    first = await store.admit("k", limits, 0)
    assert headers(first) == {
        "x-ratelimit-limit-requests": "300",
        "x-ratelimit-remaining-requests": "299",
        "x-ratelimit-reset-requests": "200ms",
    }
    await admit_many(store, limits, 299)
    last = await store.admit("k", limits, 0)
    assert headers(last)["x-ratelimit-remaining-requests"] == "0"
    assert headers(last)["x-ratelimit-reset-requests"] == "1m0s"
    assert headers(last)["retry-after"] == "1"  # 200 ms, rounded up to a whole second
    assert last.retry_after_s == pytest.approx(0.2)
    clock.advance(30.1)  # 150.5 requests' worth drained, then one more charged
    later = await store.admit("k", limits, 0)
    assert headers(later)["x-ratelimit-remaining-requests"] == "149"
    assert headers(later)["x-ratelimit-reset-requests"] == "30.1s"


# Tokens per minute: charged from the estimate, reconciled with usage.


async def test_tpm_charges_the_estimate_and_is_exact(store: LocalLimits, clock: Clock) -> None:
    limits = KeyLimits(tpm=1000)
    assert await admit_many(store, limits, 20, tokens=100) == 10
    refused = await store.admit("k", limits, 100)
    assert refused.status == 429 and refused.limit == TOKENS
    assert refused.error().type == "tokens"
    assert refused.retry_after_s == pytest.approx(6.0)  # 100 tokens at 1000 per minute
    clock.advance(6.0)
    assert await admit_many(store, limits, 5, tokens=100) == 1
    clock.advance(60.0)
    assert await admit_many(store, limits, 5, tokens=1) == 5


async def test_tpm_headers(store: LocalLimits) -> None:
    verdict = await store.admit("k", KeyLimits(rpm=10, tpm=40_000), 400)
    assert headers(verdict) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "6s",
        "x-ratelimit-limit-tokens": "40000",
        "x-ratelimit-remaining-tokens": "39600",
        "x-ratelimit-reset-tokens": "600ms",
    }


async def test_a_request_larger_than_tpm_is_refused_with_retry_after(store: LocalLimits) -> None:
    verdict = await store.admit("k", KeyLimits(tpm=1000), 1001)
    assert verdict.status == 429 and verdict.limit == TOKENS
    assert "Request too large" in verdict.message
    assert headers(verdict)["retry-after"] == "60"
    assert (await store.admit("k", KeyLimits(tpm=1000), 1000)).allowed


async def test_settle_gives_back_what_usage_did_not_use(store: LocalLimits) -> None:
    limits = KeyLimits(tpm=1000)
    verdict = await store.admit("k", limits, 600)
    assert verdict.ticket is not None
    assert not (await store.admit("k", limits, 600)).allowed
    await store.settle(verdict.ticket, 100, failed=False)  # used 100 of 600
    after = await store.admit("k", limits, 600)
    assert after.allowed
    assert headers(after)["x-ratelimit-remaining-tokens"] == "300"  # 1000 - 100 - 600


async def test_settle_takes_what_usage_used_beyond_the_estimate(
    store: LocalLimits, clock: Clock
) -> None:
    limits = KeyLimits(tpm=1000)
    verdict = await store.admit("k", limits, 100)
    assert verdict.ticket is not None
    await store.settle(verdict.ticket, 1500, failed=False)  # 1400 more than estimated
    refused = await store.admit("k", limits, 1)
    assert not refused.allowed
    # 1500 tokens in the bucket: back to a full minute's allowance 90 s later.
    assert refused.retry_after_s == pytest.approx(30.06)
    assert headers(refused)["x-ratelimit-remaining-tokens"] == "0"
    clock.advance(30.06)
    assert (await store.admit("k", limits, 1)).allowed


async def test_debt_is_capped_at_one_extra_minute(store: LocalLimits, clock: Clock) -> None:
    limits = KeyLimits(tpm=1000)
    verdict = await store.admit("k", limits, 10)
    assert verdict.ticket is not None
    await store.settle(verdict.ticket, 1_000_000, failed=False)
    clock.advance(60.0)  # two minutes' worth at most: one drained, one to go
    assert headers(await store.admit("k", limits, 1))["x-ratelimit-reset-tokens"] == "1m0s"
    clock.advance(0.06)
    assert (await store.admit("k", limits, 1)).allowed


async def test_unknown_usage_keeps_the_estimate(store: LocalLimits) -> None:
    limits = KeyLimits(tpm=1000)
    verdict = await store.admit("k", limits, 600)
    assert verdict.ticket is not None
    await store.settle(verdict.ticket, None, failed=False)
    assert not (await store.admit("k", limits, 600)).allowed


async def test_a_failed_request_gets_everything_back(store: LocalLimits) -> None:
    limits = KeyLimits(rpm=2, tpm=1000, tokens_per_day=1000, max_concurrent=1)
    verdict = await store.admit("k", limits, 1000)
    assert verdict.ticket is not None
    assert headers(verdict)["x-ratelimit-remaining-requests"] == "1"
    await store.settle(verdict.ticket, None, failed=True)
    again = await store.admit("k", limits, 1000)
    assert again.allowed, again.message
    assert headers(again)["x-ratelimit-remaining-requests"] == "1"  # not 0: refunded
    assert headers(again)["x-ratelimit-remaining-tokens"] == "0"


async def test_a_failure_after_some_tokens_reached_the_client_charges_those(
    store: LocalLimits,
) -> None:
    limits = KeyLimits(rpm=10, tpm=1000)
    verdict = await store.admit("k", limits, 500)
    assert verdict.ticket is not None
    await store.settle(verdict.ticket, 200, failed=True)
    after = await store.admit("k", limits, 0)
    assert headers(after)["x-ratelimit-remaining-tokens"] == "800"
    assert headers(after)["x-ratelimit-remaining-requests"] == "9"  # the failed one refunded


async def test_settle_is_once(store: LocalLimits) -> None:
    limits = KeyLimits(tpm=1000, max_concurrent=1)
    verdict = await store.admit("k", limits, 500)
    assert verdict.ticket is not None
    await store.settle(verdict.ticket, None, failed=True)
    await store.settle(verdict.ticket, None, failed=True)  # again: no second refund
    store.settle_nowait(verdict.ticket, 0, failed=False)
    first = await store.admit("k", limits, 500)
    second = await store.admit("k", limits, 1)
    assert first.allowed and not second.allowed  # one slot, not two
    assert headers(first)["x-ratelimit-remaining-tokens"] == "500"


# Tokens per day: a quota, 403.


async def test_day_quota_is_403_insufficient_quota_and_resets_at_utc_midnight(
    store: LocalLimits, clock: Clock
) -> None:
    limits = KeyLimits(tokens_per_day=1000)
    assert await admit_many(store, limits, 20, tokens=100) == 10
    refused = await store.admit("k", limits, 100)
    assert refused.status == 403 and refused.code == "insufficient_quota"
    assert refused.limit == TOKENS_PER_DAY and refused.error().type == "insufficient_quota"
    assert "retry-after" not in headers(refused)
    midnight = (T0 * 1_000_000 // DAY_US + 1) * DAY_US / 1_000_000
    assert refused.retry_after_s == pytest.approx(midnight - T0)
    clock.now = midnight - 0.001
    assert not (await store.admit("k", limits, 1)).allowed
    clock.now = midnight
    assert await admit_many(store, limits, 20, tokens=100) == 10


async def test_day_quota_is_reconciled_and_refunded(store: LocalLimits) -> None:
    limits = KeyLimits(tokens_per_day=1000)
    first = await store.admit("k", limits, 600)
    assert first.ticket is not None
    assert not (await store.admit("k", limits, 600)).allowed
    await store.settle(first.ticket, 300, failed=False)
    second = await store.admit("k", limits, 600)
    assert second.ticket is not None
    assert not (await store.admit("k", limits, 101)).allowed  # 900 used
    await store.settle(second.ticket, None, failed=True)
    assert (await store.admit("k", limits, 700)).allowed  # 300 + 700


async def test_a_settle_after_midnight_leaves_the_new_day_alone(
    store: LocalLimits, clock: Clock
) -> None:
    limits = KeyLimits(tokens_per_day=1000)
    verdict = await store.admit("k", limits, 900)
    assert verdict.ticket is not None
    clock.advance(86_400)
    fresh = await store.admit("k", limits, 500)
    await store.settle(verdict.ticket, 0, failed=False)  # yesterday's charge
    assert fresh.allowed
    assert not (await store.admit("k", limits, 501)).allowed


async def test_the_quota_is_checked_before_the_rate_limits(store: LocalLimits) -> None:
    limits = KeyLimits(rpm=1, tokens_per_day=100)
    assert (await store.admit("k", limits, 50)).allowed
    assert (await store.admit("k", limits, 60)).status == 403  # not 429: waiting won't help


# Concurrency.


async def test_concurrency_slots_are_released_by_settle(store: LocalLimits) -> None:
    limits = KeyLimits(max_concurrent=2)
    first = await store.admit("k", limits, 0)
    second = await store.admit("k", limits, 0)
    third = await store.admit("k", limits, 0)
    assert first.allowed and second.allowed
    assert third.status == 429 and third.limit == CONCURRENCY
    assert third.code == "concurrency_limit_exceeded" and headers(third)["retry-after"] == "1"
    assert first.ticket is not None
    store.settle_nowait(first.ticket, 10, failed=False)
    assert (await store.admit("k", limits, 0)).allowed
    assert not (await store.admit("k", limits, 0)).allowed


async def test_retry_after_is_the_longest_wait_of_the_limits_that_refuse(
    store: LocalLimits,
) -> None:
    limits = KeyLimits(rpm=1, tpm=600, max_concurrent=1)
    assert (await store.admit("k", limits, 600)).allowed
    refused = await store.admit("k", limits, 600)
    assert refused.retry_after_s == pytest.approx(60.0)
    assert refused.limit in (REQUESTS, TOKENS)


async def test_keys_are_independent(store: LocalLimits) -> None:
    limits = KeyLimits(rpm=1)
    assert (await store.admit("a", limits, 0)).allowed
    assert (await store.admit("b", limits, 0)).allowed
    assert not (await store.admit("a", limits, 0)).allowed


async def test_usage_reports_the_state_without_charging(store: LocalLimits, clock: Clock) -> None:
    limits = KeyLimits(rpm=10, tpm=1000, tokens_per_day=5000, max_concurrent=3)
    fresh = await store.usage("k", limits)
    assert fresh == {
        "source": "local",
        "requests_remaining": 10,
        "tokens_remaining": 1000,
        "tokens_today": 0,
        "tokens_per_day_remaining": 5000,
        "in_flight": 0,
    }
    assert len(store) == 0  # asking remembers nothing
    verdicts = [await store.admit("k", limits, 100) for _ in range(3)]
    tickets = [verdict.ticket for verdict in verdicts]
    held = await store.usage("k", limits)
    assert held == {
        **fresh,
        "requests_remaining": 7,
        "tokens_remaining": 700,
        "tokens_today": 300,
        "tokens_per_day_remaining": 4700,
        "in_flight": 3,
    }
    last = headers(verdicts[-1])  # as the headers say
    assert last["x-ratelimit-remaining-requests"] == "7"
    assert last["x-ratelimit-remaining-tokens"] == "700"
    assert await store.usage("k", limits) == held  # asking charges nothing
    first, second, third = tickets
    assert first and second and third
    await store.settle(first, 40, failed=False)  # reconciled with the real usage
    await store.settle(second, None, failed=True)  # failed: everything back
    clock.advance(6.0)  # one request's worth of rpm, 100 tokens' worth of tpm
    after = await store.usage("k", limits)
    assert after["requests_remaining"] == 9  # 3 - 1 failed - 1 drained
    assert after["tokens_remaining"] == 1000 - 140 + 100
    assert (after["tokens_today"], after["tokens_per_day_remaining"]) == (140, 4860)
    assert after["in_flight"] == 1
    only_rpm = await store.usage("k", KeyLimits(rpm=10))
    assert only_rpm["tokens_remaining"] is None and only_rpm["tokens_today"] is None
    assert only_rpm["tokens_per_day_remaining"] is None and only_rpm["in_flight"] is None
    clock.advance(86_400)
    assert (await store.usage("k", limits))["tokens_today"] == 0  # a new UTC day


async def test_a_key_without_limits_costs_nothing(store: LocalLimits) -> None:
    assert await store.admit("k", KeyLimits(), 10**9) is ALLOWED
    assert len(store) == 0


# Bounded memory (LESSONS 6).


async def test_idle_keys_are_forgotten_without_a_timer(clock: Clock) -> None:
    store = LocalLimits(clock=clock)
    for index in range(100):
        verdict = await store.admit(f"k{index}", KeyLimits(rpm=60), 0)
        assert verdict.ticket is not None
        store.settle_nowait(verdict.ticket, 0, failed=False)
    assert len(store) == 100
    clock.advance(1.0)  # each bucket drained: nothing left to remember
    for _ in range(60):
        await store.admit("busy", KeyLimits(rpm=600), 0)
    assert len(store) == 1  # two idle states dropped per admit: only "busy" is left


async def test_state_is_capped(clock: Clock) -> None:
    store = LocalLimits(clock=clock, max_keys=10)
    for index in range(1000):
        await store.admit(f"k{index}", KeyLimits(rpm=5), 0)
    assert len(store) == 10
    assert store.evicted_active == 990


async def test_a_key_in_flight_is_not_forgotten(clock: Clock) -> None:
    store = LocalLimits(clock=clock)
    limits = KeyLimits(max_concurrent=1)
    held = await store.admit("held", limits, 0)
    assert held.allowed
    clock.advance(3600)
    for index in range(50):
        await store.admit(f"k{index}", KeyLimits(rpm=60), 0)
    assert not (await store.admit("held", limits, 0)).allowed


# The verdict as an error, and the wire format.


async def test_a_refusal_as_the_gateways_error(store: LocalLimits) -> None:
    await store.admit("k", KeyLimits(rpm=1), 0)
    error = (await store.admit("k", KeyLimits(rpm=1), 0)).error()
    assert isinstance(error, LimitExceeded)
    assert error.status == 429 and error.code == "rate_limit_exceeded"
    assert error.payload()["error"]["type"] == "requests"
    assert error.headers["retry-after"] == "60"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    closed = unavailable(0.2).error()
    assert isinstance(closed, LimitsUnavailable)
    assert closed.status == 503 and closed.code == "rate_limits_unavailable"
    assert closed.payload()["error"]["type"] == "service_unavailable"
    assert closed.headers == {"retry-after": "1"}
    quota = Verdict(False, 403, "insufficient_quota", "no", None, [], None, TOKENS_PER_DAY)
    assert isinstance(quota.error(), QuotaExceeded)
    assert quota.error().payload()["error"]["type"] == "insufficient_quota"


@pytest.mark.parametrize(
    ("limits", "tokens", "refusal"),
    [
        (KeyLimits(rpm=1), 0, LimitExceeded),
        (KeyLimits(max_concurrent=1), 0, LimitExceeded),
        (KeyLimits(tpm=100), 60, TokenLimitExceeded),
        (KeyLimits(tokens_per_day=100), 60, QuotaExceeded),
    ],
)
async def test_each_refusal_is_told_by_its_own_class_with_the_verdicts_status(
    store: LocalLimits, limits: KeyLimits, tokens: int, refusal: type[LimitExceeded]
) -> None:
    assert (await store.admit("k", limits, tokens)).allowed
    refused = await store.admit("k", limits, tokens)
    error = refused.error()
    assert type(error) is refusal
    assert error.status == refused.status and error.code == refused.code
    assert error.message == refused.message


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0000001, "1ms"),
        (0.02, "20ms"),
        (0.2, "200ms"),
        (0.9994, "1s"),
        (1, "1s"),
        (8.64, "8.64s"),
        (59.999, "59.999s"),
        (60, "1m0s"),
        (91.2, "1m31.2s"),
        (360, "6m0s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_durations_are_written_as_openai_does(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("seconds", "value"), [(0, "1"), (0.001, "1"), (1, "1"), (1.0001, "2"), (59.2, "60")]
)
def test_retry_after_is_whole_seconds_rounded_up_at_least_one(seconds: float, value: str) -> None:
    assert retry_after(seconds) == value


def test_headers_only_for_the_limits_a_key_has() -> None:
    assert ratelimit_headers(KeyLimits(max_concurrent=3), 0, 0, 0, 0) == []
    names = [name for name, _ in ratelimit_headers(KeyLimits(tpm=5), 1, 0.5, 2, 0.5, 3)]
    assert names == [
        b"x-ratelimit-limit-tokens",
        b"x-ratelimit-remaining-tokens",
        b"x-ratelimit-reset-tokens",
        b"retry-after",
    ]


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="rpm"):
        KeyLimits(rpm=0)
    assert KeyLimits(tpm=MAX_LIMIT * 10).tpm == MAX_LIMIT * 10  # enforced as MAX_LIMIT


async def test_a_limit_beyond_max_limit_is_enforced_as_max_limit(store: LocalLimits) -> None:
    limits = KeyLimits(tpm=MAX_LIMIT * 10)
    assert (await store.admit("k", limits, MAX_LIMIT)).allowed
    assert not (await store.admit("k", limits, 1)).allowed


# Estimating tokens.


@pytest.mark.parametrize(
    ("payload", "endpoint", "expected"),
    [
        # 4 per message + ceil(chars / 4) + max_tokens
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}, "chat", 4 + 1 + 10),
        (
            {"messages": [{"role": "user", "content": "x" * 9}], "max_completion_tokens": 5},
            "/v1/chat/completions",
            4 + 3 + 5,
        ),
        ({"messages": [{"role": "user", "content": "abcd"}]}, "chat", 4 + 1 + 256),  # default
        ({"messages": [{"role": "user", "content": "abcd"}], "n": 3, "max_tokens": 10}, "chat", 35),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "abcdefgh"},
                            {"type": "image_url", "image_url": {"url": "data:..."}},
                        ],
                    }
                ],
                "max_tokens": 1,
            },
            "chat",
            4 + 2 + 85 + 1,
        ),
        ({"prompt": "abcdefgh", "max_tokens": 7}, "/v1/completions", 2 + 7),
        ({"prompt": ["abcd", "abcd"], "max_tokens": 1}, "/v1/completions", 2 + 1),
        ({"prompt": [1, 2, 3], "max_tokens": 1}, "/v1/completions", 3 + 1),
        ({"input": "abcdefgh"}, "/v1/embeddings", 2),
        ({"input": [[1, 2], [3]]}, "/v1/embeddings", 3),
        ({"input": ["abcd", "ab"]}, "/v1/embeddings", 2),
    ],
)
def test_estimate_tokens(payload: dict[str, Any], endpoint: str, expected: int) -> None:
    assert estimate_tokens(payload, endpoint) == expected


def test_estimate_counts_tools_and_uses_the_configured_default() -> None:
    payload: dict[str, Any] = {"messages": [{"role": "user", "content": ""}]}
    assert estimate_tokens(payload, "chat", default_max_tokens=0) == 4
    tools = [{"type": "function", "function": {"name": "f" * 40}}]
    assert estimate_tokens({**payload, "tools": tools}, "chat", default_max_tokens=0) > 14


# The `limits:` section of the gateway's configuration.


def test_limits_config(tmp_path: Path) -> None:
    raw = {
        "keys": {"file": "keys.yaml"},
        "models": [
            {"name": "m", "backends": [{"name": "b", "provider": "vllm", "url": "http://h:1"}]}
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    defaults = load_config(path, environ={}).limits
    assert defaults == LimitsConfig()
    assert defaults.redis_failure == "open" and defaults.default_max_tokens_estimate == 256
    overridden = load_config(path, environ={"VGATE_LIMITS__REDIS_FAILURE": "closed"}).limits
    assert overridden.redis_failure == "closed"
    path.write_text(yaml.safe_dump({**raw, "limits": {"redis_failure": "maybe"}}))
    with pytest.raises(ConfigError, match=r"limits\.redis_failure"):
        load_config(path, environ={})
