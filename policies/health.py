"""Active health checks: probe each backend's health endpoint, eject and readmit it.

A backend is ejected after `unhealthy_after` failed probes in a row and readmitted after
`healthy_after` good ones, so one slow probe does not flap it. Passive detection from live
traffic is the circuit breaker's and the connect-failure ejection's job; this one finds a
backend that is down (or back) while no traffic reaches it.

The first probe (the round before the gateway serves) decides outright when its answer is
clear: a 200, or a failure that came before its timeout (refused, reset, another status).
A first probe that timed out says only that the backend is slow, perhaps busy: it counts as
one failure, as any later one does, and the backend stays in rotation until
`unhealthy_after` of them in a row.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from gateway.config import HealthConfig
from policies.background import stop_task

logger = logging.getLogger("vgate.health")

_GRACE_S = 1.0  # beyond a probe's own timeout, before the checker gives up on it
_CLOCK_SLACK_S = 0.001  # asyncio may fire a timeout up to its clock's resolution early


@dataclass(slots=True)
class HealthState:
    healthy: bool = True  # until the first probe says otherwise
    probed: bool = False
    failures: int = 0
    successes: int = 0

    def record(self, ok: bool, config: HealthConfig, *, timed_out: bool = False) -> bool:
        """Count one probe; True when it changed `healthy`."""
        if not self.probed and not timed_out:
            # The first clear answer decides outright: nothing is known to hold a state against.
            self.probed = True
            self.failures, self.successes = (0, 1) if ok else (1, 0)
            changed, self.healthy = self.healthy != ok, ok
            return changed
        if ok:
            self.failures = 0
            self.successes += 1
            if not self.healthy and self.successes >= config.healthy_after:
                self.healthy = True
                return True
        else:
            self.probed = True
            self.successes = 0
            self.failures += 1
            if self.healthy and self.failures >= config.unhealthy_after:
                self.healthy = False
                return True
        return False


@dataclass(slots=True)
class Probe:
    name: str
    config: HealthConfig
    check: Callable[[float], Awaitable[bool]]
    state: HealthState
    next_due: float = 0.0


class HealthChecker:
    """Probes every backend on its route's interval, in one background task."""

    def __init__(
        self, probes: Sequence[Probe], *, on_change: Callable[[str, bool], None] | None = None
    ) -> None:
        self._probes = [probe for probe in probes if probe.config.enabled]
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self._started = False

    def replace_probes(self, probes: Sequence[Probe]) -> None:
        """Probe `probes` from now on (a config reload). A probe of the same backend, state
        and settings as one before keeps its schedule; a new one is due one interval on."""
        before = {(probe.name, id(probe.state)): probe for probe in self._probes}
        now = asyncio.get_running_loop().time() if self._started else 0.0
        kept = []
        for probe in probes:
            if not probe.config.enabled:
                continue
            old = before.get((probe.name, id(probe.state)))
            if old is not None and old.config == probe.config and old.state is probe.state:
                probe.next_due = old.next_due
            else:
                probe.next_due = now + probe.config.interval_s
            kept.append(probe)
        self._probes = kept
        if self._started and self._task is None and kept:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def check_all(self) -> None:
        """One round over every probe, concurrently."""
        await asyncio.gather(*(self._check(probe) for probe in self._probes))

    async def check_due(self, now: float) -> None:
        """A round over the probes whose interval has elapsed."""
        due = [probe for probe in self._probes if probe.next_due <= now]
        for probe in due:
            probe.next_due = now + probe.config.interval_s
        await asyncio.gather(*(self._check(probe) for probe in due))

    async def _check(self, probe: Probe) -> None:
        timeout_s = probe.config.timeout_s
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            # The probe bounds itself by `timeout_s`; this bound is for one that does not,
            # which would otherwise stall every later round.
            async with asyncio.timeout(timeout_s + _GRACE_S):
                ok = await probe.check(timeout_s)
        except TimeoutError:
            ok = False
        except Exception:  # a probe that blows up is a failed probe, never a dead checker
            logger.exception("health probe of %s failed unexpectedly", probe.name)
            ok = False
        # A failure that took the whole timeout is a slow backend, not a refusal.
        timed_out = not ok and loop.time() - started >= timeout_s - _CLOCK_SLACK_S
        if probe.state.record(ok, probe.config, timed_out=timed_out):
            healthy = probe.state.healthy
            logger.warning("backend %s is %s", probe.name, "healthy" if healthy else "unhealthy")
            if self._on_change is not None:
                self._on_change(probe.name, healthy)

    async def start(self) -> None:
        self._started = True
        loop = asyncio.get_running_loop()
        for probe in self._probes:
            probe.next_due = loop.time() + probe.config.interval_s
        if self._probes:
            self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Read each round: a config reload may have replaced the probes.
            await asyncio.sleep(min((p.config.interval_s for p in self._probes), default=1.0))
            await self.check_due(loop.time())

    async def aclose(self) -> None:
        self._started = False
        await stop_task(self._task)
        self._task = None
