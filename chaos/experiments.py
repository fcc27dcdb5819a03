"""One chaos experiment as it runs: its window, the requests it targets, and which it hits.

What an experiment is (`gateway.config.ChaosExperiment`) is configuration; what it has done
so far (its start, its counts, its jitter's draws) lives here, one `Experiment` per run.
Starting an experiment again by name starts a new run, from nothing.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Any

from gateway.config import ChaosExperiment


class Share:
    """Picks exactly floor(N * rate) of the first N requests it is asked about, spread out:
    request n (from 0) is picked when floor((n + 1) * rate) > floor(n * rate), the simulated
    worker's rule (chaos.faults.FaultInjector), so a rate of 0.5 picks every second one."""

    __slots__ = ("_denominator", "_numerator", "asked")

    def __init__(self, rate: float) -> None:
        # Exact arithmetic, so 0.29 picks 29 of every 100 and never 28 through rounding.
        fraction = Fraction(rate).limit_denominator(1_000_000)
        self._numerator = fraction.numerator
        self._denominator = fraction.denominator
        self.asked = 0

    def pick(self) -> bool:
        """Count one request; whether it is picked."""
        n = self.asked
        self.asked = n + 1
        numerator, denominator = self._numerator, self._denominator
        return (n + 1) * numerator // denominator > n * numerator // denominator


class Experiment:
    """One run of an experiment, from `started` (the clock's seconds).

    `matched` counts the requests it targeted while in its window, `picked` those its rate
    chose, `injected` the faults that took effect (a stream fault only does once the
    stream gets that far: a cut after 50 events never happens to a 20-event answer).
    """

    __slots__ = (
        "_backends",
        "_keys",
        "_random",
        "_routes",
        "_share",
        "closes",
        "config",
        "injected",
        "label",
        "matched",
        "opens",
        "picked",
        "started",
    )

    def __init__(self, config: ChaosExperiment, started: float) -> None:
        self.config = config
        self.label = f"{config.name}:{config.fault.kind}"  # as logs and reports name it
        self.started = started
        self.opens = started + config.start_after_s
        self.closes = math.inf if config.duration_s is None else self.opens + config.duration_s
        self.matched = 0
        self.picked = 0
        self.injected = 0
        self._routes = frozenset(config.routes)
        self._backends = frozenset(config.backends)
        self._keys = frozenset(config.keys)
        self._share = Share(config.rate)
        self._random = random.Random(config.seed)

    def active(self, now: float) -> bool:
        """Whether `now` is within the experiment's window."""
        return self.opens <= now < self.closes

    def targets(self, route: str, backend: str, caller: str | None) -> bool:
        """Whether a request from `caller` to `backend` of `route` is one it aims at."""
        return (
            (not self._routes or route in self._routes)
            and (not self._backends or backend in self._backends)
            and (not self._keys or caller in self._keys)
        )

    def pick(self) -> bool:
        """Count a targeted request in the window; whether the rate chooses it."""
        self.matched += 1
        if self._share.pick():
            self.picked += 1
            return True
        return False

    def delay_s(self) -> float:
        """The fault's delay for one request (or one event): latency_ms plus the jitter."""
        fault = self.config.fault
        jitter = self._random.random() * fault.jitter_ms if fault.jitter_ms else 0.0
        return (fault.latency_ms + jitter) / 1000

    def report(self, now: float) -> dict[str, Any]:
        """The experiment's configuration and how it went, as GET /admin/chaos shows it."""
        return {
            **self.config.model_dump(mode="json"),
            "active": self.active(now),
            "matched": self.matched,
            "picked": self.picked,
            "injected": self.injected,
            "started_s_ago": now - self.started,
        }
