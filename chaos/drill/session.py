"""One drill as it runs: its clock, its load, what it did, and its phases.

Chaos Toolkit runs the drill file; the vgate extension's actions and probes
(`chaos.drill.actions`, `chaos.drill.probes`) reach the session through the experiment's
configuration (`vgate_session`), and the session hears of the run's progress as a Chaos
Toolkit event handler: the method's start and end bound the "during" phase; the
steady-state probe (`probes.slos_hold`) observes the "before" and "after" phases.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from chaoslib.exceptions import ActivityFailed, InterruptExecution
from chaoslib.run import RunEventHandler

from chaos.drill.judge import judge
from chaos.drill.load import Load
from chaos.drill.results import Mark, Phase, PhaseName, RequestResult
from gateway.config import SloObjective

logger = logging.getLogger("vgate.drill")


@dataclass(frozen=True, slots=True)
class GatewayTarget:
    """The gateway a drill runs against, and what its actions may use."""

    url: str  # e.g. http://127.0.0.1:8000
    key: str  # the API key of the load
    admin_key: str | None = None  # for /admin/chaos and /admin/config/reload
    config_file: Path | None = None  # the file the gateway serves from (config swaps)


class DrillSession(RunEventHandler):  # type: ignore[misc]
    def __init__(
        self,
        *,
        target: GatewayTarget,
        slos: Sequence[SloObjective],
        waived: Mapping[PhaseName, frozenset[str]],
        drill_dir: Path,
        clock_origin: float | None = None,
    ) -> None:
        self.target = target
        self.drill_dir = drill_dir
        self._slos = tuple(slos)
        self._waived = dict(waived)
        self._origin = time.monotonic() if clock_origin is None else clock_origin
        self.marks: list[Mark] = []
        self.phases: list[Phase] = []
        self.load: Load | None = None
        self._lock = threading.Lock()
        self._method_started: float | None = None
        self._method_ended: float | None = None
        self._rolling_back = False
        self._activity_started: dict[int, float] = {}

    def now(self) -> float:
        """Seconds from the drill's start."""
        return time.monotonic() - self._origin

    @property
    def phase(self) -> str:
        """What the drill is doing now, in the words of its phases."""
        if self._rolling_back:
            return "rollbacks"
        if self._method_started is None:
            return "before"
        return "during" if self._method_ended is None else "after"

    def requests(self) -> list[RequestResult]:
        return [] if self.load is None else self.load.snapshot()

    def observe(self, observe_s: float, settle_s: float = 0.0) -> bool:
        """The steady-state probe: let the load run `settle_s` unjudged (recovery), then
        `observe_s` as the "before" or "after" phase; whether every objective held in it."""
        name: PhaseName = "before" if self._method_started is None else "after"
        time.sleep(settle_s)
        start = self.now()
        time.sleep(observe_s)
        phase = Phase(name, start, self.now())
        with self._lock:
            self.phases = [p for p in self.phases if p.name != name] + [phase]
        return all(v.holds or v.waived for v in self.verdicts([phase]))

    def verdicts(self, phases: Sequence[Phase] | None = None) -> list[Any]:
        chosen = self.all_phases() if phases is None else list(phases)
        return judge(self._slos, self.requests(), chosen, self._waived)

    def all_phases(self) -> list[Phase]:
        """before, during, after, as far as the drill got."""
        phases = list(self.phases)
        if self._method_started is not None:
            end = self._method_ended if self._method_ended is not None else self.now()
            phases.append(Phase("during", self._method_started, end))
        order = {"before": 0, "during": 1, "after": 2}
        return sorted(phases, key=lambda p: order[p.name])

    # Chaos Toolkit's events (called on its thread).

    def started(self, experiment: Any, journal: Any) -> None:
        # Chaos Toolkit's own SIGTERM handler (installed for the run, just before this)
        # raises an Exception, which its python provider turns into the failure of the
        # action it lands in: the drill then went on as if nothing had happened. A
        # KeyboardInterrupt, which the provider lets through, interrupts the run wherever
        # it is (rollbacks run; the report says interrupted), as Ctrl-C does.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _interrupt_on_sigterm)

    def start_method(self, experiment: Any) -> None:
        self._method_started = self.now()

    def method_completed(self, experiment: Any, state: Any = None) -> None:
        self._method_ended = self.now()

    def start_rollbacks(self, experiment: Any) -> None:
        if self._method_started is not None and self._method_ended is None:
            self._method_ended = self.now()  # interrupted mid-method
        self._rolling_back = True

    def rollbacks_completed(self, experiment: Any, journal: Any) -> None:
        self._rolling_back = False

    def start_activity(self, activity: Any) -> None:
        self._activity_started[id(activity)] = self.now()

    def activity_completed(self, activity: Any, run: Any) -> None:
        at = self._activity_started.pop(id(activity), self.now())
        kind = "rollback" if self._rolling_back else str(activity.get("type", "action"))
        ok = run.get("status") == "succeeded"
        with self._lock:
            self.marks.append(Mark(at, str(activity.get("name", "?")), kind, ok))  # type: ignore[arg-type]
        if "status" not in run:  # neither succeeded nor failed: a signal cut it short
            _go_on_interrupted()


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    logger.warning("SIGTERM: interrupting the drill (its rollbacks run)")
    raise KeyboardInterrupt("SIGTERM")


def _go_on_interrupted() -> None:
    """A signal that cut an activity short goes on at once. Chaos Toolkit calls this handler
    from the `finally` that then sleeps the activity's `pauses.after` even when a Ctrl-C
    (KeyboardInterrupt) or SIGTERM (its InterruptExecution) is on its way out: a signal
    that landed during an action's call waited out the whole pause (120 s in a drill the
    tests interrupt). Raising it here skips the pause; the registry swallows an Exception,
    so SIGTERM's goes on as a KeyboardInterrupt, which the run takes as an interruption
    too (rollbacks, status "interrupted")."""
    in_flight = sys.exc_info()[1]
    if isinstance(in_flight, KeyboardInterrupt | SystemExit):
        raise in_flight
    if isinstance(in_flight, InterruptExecution):
        raise KeyboardInterrupt(str(in_flight)) from in_flight


def session_of(configuration: Mapping[str, Any] | None) -> DrillSession:
    """The session `vgate drill` put in the experiment's configuration, for its actions."""
    session = (configuration or {}).get("vgate_session")
    if not isinstance(session, DrillSession):
        raise ActivityFailed("run vgate's actions with `vgate drill`, which gives them its session")
    return session
