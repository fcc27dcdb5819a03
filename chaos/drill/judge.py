"""A drill's verdicts: the config's SLOs, judged on what the load saw, phase by phase.

The objectives are the `slos:` section's (the same definitions as the alert rules and
dashboards), measured on the client's side of the gateway over a phase instead of 28 days:

- availability: of the requests not refused as the client's own fault (a 4xx), the share
  that did not fail (a 5xx, a broken stream, lost);
- latency of the whole request (`of: request`, every answered request), of the time to
  first token (`of: ttft`, answered streams) or per output token after the first (`of: tpot`,
  answered streams of more than one token): the share within the threshold;

and one the drill adds, `requests_lost`: no request may end without an answer or a clean
error, in any phase. A request belongs to the phase it started in. A phase with no request
an objective applies to cannot be judged: its verdict says so (measured None) and holds;
`requests_lost` fails on a phase with no request at all, which means the load never ran.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from chaos.drill.results import Phase, PhaseName, RequestResult, Verdict
from gateway.config import SloObjective

LOST = "requests_lost"


def judge(
    slos: Sequence[SloObjective],
    requests: Sequence[RequestResult],
    phases: Sequence[Phase],
    waived: Mapping[PhaseName, frozenset[str]],
) -> list[Verdict]:
    """A verdict per objective and phase, then `requests_lost` over the whole drill."""
    verdicts: list[Verdict] = []
    for phase in phases:
        in_phase = [r for r in requests if phase.holds(r.started)]
        waive = waived.get(phase.name, frozenset())
        for slo in slos:
            verdicts.append(_slo_verdict(slo, phase.name, in_phase, slo.name in waive))
        verdicts.append(_lost_verdict(phase.name, in_phase, LOST in waive))
    verdicts.append(_lost_verdict("all", requests, waived=False))
    return verdicts


def describe(slo: SloObjective) -> str:
    if slo.latency is None:
        return f"availability >= {_percent(slo.target)}"
    what = {"ttft": "time to first token", "tpot": "time per output token"}.get(
        slo.latency.of, "request"
    )
    return f"{what} <= {slo.latency.threshold_s:g}s for >= {_percent(slo.target)}"


def objective_names(slos: Iterable[SloObjective]) -> frozenset[str]:
    """The names a drill file may waive."""
    return frozenset(slo.name for slo in slos) | {LOST}


def _slo_verdict(
    slo: SloObjective, phase: PhaseName, requests: Sequence[RequestResult], waived: bool
) -> Verdict:
    routes = frozenset(slo.routes)
    mine = [r for r in requests if not routes or r.route in routes]
    if slo.latency is None:
        counted = [r for r in mine if not _clients_own(r)]
        good = sum(not r.failed for r in counted)
    else:
        threshold = slo.latency.threshold_s
        if slo.latency.of == "ttft":
            counted = [r for r in mine if r.kind == "stream" and r.outcome == "ok"]
            good = sum(r.ttft_s is not None and r.ttft_s <= threshold for r in counted)
        elif slo.latency.of == "tpot":
            counted = [r for r in mine if r.outcome == "ok" and r.tpot_s is not None]
            good = sum(r.tpot_s is not None and r.tpot_s <= threshold for r in counted)
        else:
            counted = [r for r in mine if r.outcome == "ok"]
            good = sum(r.duration_s <= threshold for r in counted)
    measured = good / len(counted) if counted else None
    return Verdict(
        objective=slo.name,
        phase=phase,
        description=describe(slo),
        target=slo.target,
        measured=measured,
        requests=len(counted),
        holds=measured is None or measured >= slo.target,
        waived=waived,
    )


def _lost_verdict(
    phase: PhaseName | str, requests: Sequence[RequestResult], waived: bool
) -> Verdict:
    lost = sum(r.outcome == "lost" for r in requests)
    return Verdict(
        objective=LOST,
        phase=phase,  # type: ignore[arg-type]
        description="no request lost (each ends in an answer or a clean error)",
        target=0,
        measured=float(lost),
        requests=len(requests),
        holds=lost == 0 and bool(requests),
        waived=waived,
    )


def _clients_own(request: RequestResult) -> bool:
    return request.outcome == "error" and request.status is not None and 400 <= request.status < 500


def _percent(share: float) -> str:
    return f"{share * 100:.10g}%"
