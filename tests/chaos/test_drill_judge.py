"""The drill's verdicts: the config's SLOs judged per phase on what the load saw."""

from __future__ import annotations

from typing import Any

from chaos.drill.judge import LOST, judge
from chaos.drill.results import DrillResult, Mark, Phase, RequestResult, Verdict
from gateway.config import SloObjective

BEFORE, DURING, AFTER = Phase("before", 0, 10), Phase("during", 10, 20), Phase("after", 20, 30)
AVAILABILITY = SloObjective.model_validate({"name": "availability", "availability": 0.9})
TTFT = SloObjective.model_validate(
    {
        "name": "ttft",
        "routes": ["chat"],
        "latency": {"threshold_s": 0.5, "target": 0.5, "of": "ttft"},
    }
)
LATENCY = SloObjective.model_validate(
    {"name": "latency", "latency": {"threshold_s": 1, "target": 0.75}}
)
TPOT = SloObjective.model_validate(
    {"name": "tpot", "latency": {"threshold_s": 0.05, "target": 0.9, "of": "tpot"}}
)


def request(at: float, **fields: Any) -> RequestResult:
    values: dict[str, Any] = {
        "kind": "chat",
        "model": "chat",
        "route": "chat",
        "started": at,
        "duration_s": 0.1,
        "ttft_s": None,
        "status": 200,
        "outcome": "ok",
    }
    values.update(fields)
    return RequestResult(**values)


def verdict(verdicts: list[Verdict], objective: str, phase: str) -> Verdict:
    return next(v for v in verdicts if v.objective == objective and v.phase == phase)


def test_a_request_is_judged_in_the_phase_it_started_in() -> None:
    requests = [request(9.9, duration_s=5, status=503, outcome="error"), request(10.0)]
    verdicts = judge([AVAILABILITY], requests, [BEFORE, DURING], {})
    assert verdict(verdicts, "availability", "before").measured == 0.0
    assert verdict(verdicts, "availability", "during").measured == 1.0


def test_availability_counts_5xx_broken_and_lost_but_not_the_clients_4xx() -> None:
    requests = [
        *(request(1 + i / 100) for i in range(16)),
        request(2, status=503, outcome="error", error="no_backend"),
        request(2, status=None, outcome="error", error="upstream_broken"),  # broke mid-stream
        request(3, status=None, outcome="lost", error="timeout"),
        request(4, status=429, outcome="error", error="rate_limited"),
        request(4, status=400, outcome="error", error="invalid_value"),
    ]
    got = verdict(judge([AVAILABILITY], requests, [BEFORE], {}), "availability", "before")
    assert got.requests == 19  # the 429 and the 400 are the client's
    assert got.measured == 16 / 19
    assert not got.holds  # 0.84 < 0.9
    assert got.description == "availability >= 90%"


def test_latency_objectives_read_answered_requests_and_ttft_only_streams_of_their_routes() -> None:
    requests = [
        request(1, kind="stream", ttft_s=0.2),
        request(1, kind="stream", ttft_s=0.9),
        request(1, kind="stream", ttft_s=0.1, route="embed", model="embed"),  # not its route
        request(1, kind="stream", status=503, outcome="error"),  # failed: availability's
        request(1, duration_s=2.0),
        request(1, duration_s=0.5),
    ]
    verdicts = judge([TTFT, LATENCY], requests, [BEFORE], {})
    ttft = verdict(verdicts, "ttft", "before")
    assert (ttft.requests, ttft.measured, ttft.holds) == (2, 0.5, True)
    latency = verdict(verdicts, "latency", "before")
    assert latency.requests == 5
    assert latency.measured == 4 / 5
    assert latency.holds


def test_time_per_output_token_reads_the_answered_streams_that_have_one() -> None:
    requests = [
        request(1, kind="stream", ttft_s=0.1, tpot_s=0.01),
        request(1, kind="stream", ttft_s=0.1, tpot_s=0.2),
        request(1, kind="stream", ttft_s=0.1),  # one token: no time per token
        request(1, kind="stream", status=503, outcome="error", tpot_s=0.01),  # failed
    ]
    tpot = verdict(judge([TPOT], requests, [BEFORE], {}), "tpot", "before")
    assert (tpot.requests, tpot.measured, tpot.holds) == (2, 0.5, False)
    assert tpot.description == "time per output token <= 0.05s for >= 90%"


def test_a_lost_request_fails_its_phase_and_the_whole_drill_even_where_slos_are_waived() -> None:
    requests = [request(1), request(12, outcome="lost", status=None, error="reset"), request(22)]
    verdicts = judge(
        [AVAILABILITY], requests, [BEFORE, DURING, AFTER], {"during": frozenset({"availability"})}
    )
    assert verdict(verdicts, "availability", "during").waived
    assert verdict(verdicts, LOST, "before").holds
    lost_during = verdict(verdicts, LOST, "during")
    assert (lost_during.measured, lost_during.holds, lost_during.waived) == (1.0, False, False)
    assert not verdict(verdicts, LOST, "all").holds


def test_a_phase_without_requests_cannot_be_judged_and_one_without_any_load_fails() -> None:
    verdicts = judge([TTFT], [request(1)], [BEFORE, DURING], {})
    ttft = verdict(verdicts, "ttft", "before")  # no stream: nothing to judge
    assert (ttft.measured, ttft.requests, ttft.holds) == (None, 0, True)
    assert not verdict(verdicts, LOST, "during").holds  # the load sent nothing at all


def test_a_drill_passes_only_if_it_completed_every_action_worked_and_verdicts_hold() -> None:
    ok = judge([AVAILABILITY], [request(1), request(11), request(21)], [BEFORE, DURING, AFTER], {})

    def result(status: str = "completed", marks: list[Mark] | None = None) -> DrillResult:
        return DrillResult(
            "d",
            "d",
            "d.yaml",
            "2026-12-07T00:00:00+00:00",
            30,
            status,
            marks=marks or [],
            verdicts=ok,
        )

    assert result().passed
    assert not result("failed").passed
    assert not result("interrupted").passed
    assert not result(marks=[Mark(10, "start-fault", ok=False)]).passed
