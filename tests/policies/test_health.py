from __future__ import annotations

import asyncio
from collections import deque

from gateway.config import HealthConfig
from policies.health import HealthChecker, HealthState, Probe

CONFIG = HealthConfig(unhealthy_after=2, healthy_after=3, interval_s=1)


def scripted(results: list[bool]) -> tuple[Probe, list[float]]:
    answers = deque(results)
    timeouts: list[float] = []

    async def check(timeout_s: float) -> bool:
        timeouts.append(timeout_s)
        return answers.popleft()

    return Probe("b", CONFIG, check, HealthState()), timeouts


def test_first_probe_decides_then_thresholds_hold() -> None:
    state = HealthState()
    assert state.record(False, CONFIG) and not state.healthy  # down at once on the first probe
    assert not state.record(True, CONFIG) and not state.healthy
    assert not state.record(True, CONFIG) and not state.healthy
    assert state.record(True, CONFIG) and state.healthy  # third good probe in a row readmits
    assert not state.record(False, CONFIG) and state.healthy  # one failure does not eject
    assert not state.record(True, CONFIG)
    assert not state.record(False, CONFIG)
    assert state.record(False, CONFIG) and not state.healthy  # two in a row do


async def test_checker_reports_changes_and_survives_a_crashing_probe() -> None:
    changes: list[tuple[str, bool]] = []
    probe, timeouts = scripted([True, False, False, True, True, True])
    checker = HealthChecker(
        [probe], on_change=lambda name, healthy: changes.append((name, healthy))
    )
    for _ in range(6):
        await checker.check_all()
    assert changes == [("b", False), ("b", True)]
    assert timeouts == [CONFIG.timeout_s] * 6

    async def crash(timeout_s: float) -> bool:
        raise RuntimeError("probe bug")

    broken = Probe("c", CONFIG, crash, HealthState())
    await HealthChecker([broken]).check_all()
    assert not broken.state.healthy


async def test_only_due_probes_run_and_disabled_ones_never() -> None:
    calls: list[str] = []

    def probe(name: str, interval_s: float, enabled: bool = True) -> Probe:
        async def check(timeout_s: float) -> bool:
            calls.append(name)
            return True

        config = HealthConfig(interval_s=interval_s, enabled=enabled)
        return Probe(name, config, check, HealthState())

    checker = HealthChecker([probe("fast", 1), probe("slow", 5), probe("off", 1, enabled=False)])
    for now in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0):
        await checker.check_due(now)
    assert calls.count("fast") == 6 and calls.count("slow") == 2 and "off" not in calls


def test_a_first_probe_that_timed_out_counts_as_one_failure_not_a_verdict() -> None:
    state = HealthState()
    assert not state.record(False, CONFIG, timed_out=True) and state.healthy  # slow, not down
    assert state.record(False, CONFIG, timed_out=True) and not state.healthy  # two in a row
    one = HealthConfig(unhealthy_after=1)
    assert HealthState().record(False, one, timed_out=True)  # as configured: one is enough


async def test_a_probe_that_ignores_its_timeout_is_still_bounded() -> None:
    """A check that never returns must not hold up every later round."""

    async def hang(timeout_s: float) -> bool:
        await asyncio.Event().wait()
        return True

    config = HealthConfig(timeout_s=0.05, unhealthy_after=1)
    hung = Probe("h", config, hang, HealthState())
    async with asyncio.timeout(30):  # the checker's own bound is timeout_s plus a second
        await HealthChecker([hung]).check_all()
    assert not hung.state.healthy
