"""What a drill recorded and concluded: the value objects its load, its judge and its
report share. Times are seconds from the drill's start (its monotonic clock)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RequestKind = Literal["chat", "stream", "embed"]
# ok: a whole answer. error: a clean refusal (an HTTP error status with an OpenAI error
# body, or a stream's error event). lost: anything else (no answer, a reset, a client
# timeout, a stream that ended without its end): the one outcome a drill never tolerates.
RequestOutcome = Literal["ok", "error", "lost"]


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One request the drill's load sent, and how it ended."""

    kind: RequestKind
    model: str  # as asked for
    route: str | None  # the model route it names in the config, None if none
    started: float
    duration_s: float  # to the end of the answer (a stream's last event)
    ttft_s: float | None  # streams: to the first event with a choice (the gateway's TTFT)
    # The HTTP status; None where no response came, or where a stream broke after its start
    # (an error event after a 200: a failure, not a refusal).
    status: int | None
    outcome: RequestOutcome
    error: str | None = None  # the error's code or type, or why it was lost
    backend: str | None = None  # X-VGate-Backend, where the gateway said
    # Streams of more than one token: (end - first event) / (completion tokens - 1), as
    # vgate_tpot_seconds measures it.
    tpot_s: float | None = None

    @property
    def ended(self) -> float:
        return self.started + self.duration_s

    @property
    def failed(self) -> bool:
        """Failed through the gateway's or an upstream's fault (the availability SLO's
        failures): lost, or refused with a 5xx. A 4xx is the client's own (not counted)."""
        return self.outcome == "lost" or (
            self.outcome == "error" and (self.status is None or self.status >= 500)
        )


PhaseName = Literal["before", "during", "after"]


@dataclass(frozen=True, slots=True)
class Phase:
    """A span of the drill judged on its own: before the fault, during it, after it."""

    name: PhaseName
    start: float
    end: float

    def holds(self, at: float) -> bool:
        return self.start <= at < self.end


@dataclass(frozen=True, slots=True)
class Mark:
    """Something the drill did, at a moment: an action, a probe, a rollback."""

    at: float
    label: str
    kind: Literal["action", "probe", "rollback"] = "action"
    ok: bool = True  # whether it succeeded


@dataclass(frozen=True, slots=True)
class Verdict:
    """One objective judged over one phase ("all" for the whole drill)."""

    objective: str  # an SLO's name, or "requests_lost"
    phase: PhaseName | Literal["all"]
    description: str  # e.g. "availability >= 99.9%", "p99 ttft <= 1 s"
    target: float  # the share required (lost: 0, the count allowed)
    measured: float | None  # the share measured (lost: the count); None: no requests
    requests: int  # the requests it was judged on
    holds: bool
    waived: bool = False  # the drill file said not to judge it in this phase


@dataclass(slots=True)
class DrillResult:
    """A whole drill: what it ran, what the load saw, and the verdicts."""

    name: str  # the drill file's stem, e.g. "provider-outage"
    title: str
    file: str
    started_at: str  # wall clock, ISO 8601 UTC
    duration_s: float
    status: str  # Chaos Toolkit's journal status: completed, failed, interrupted, aborted
    phases: list[Phase] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    requests: list[RequestResult] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Chaos Toolkit completed the run, every action and probe did what it was meant to
        (an action that failed would leave the fault it should have made out of the drill),
        and every verdict holds (waived ones aside)."""
        return (
            self.status == "completed"
            and all(mark.ok for mark in self.marks)
            and all(v.holds or v.waived for v in self.verdicts)
        )
