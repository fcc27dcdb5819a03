"""The drill's load as numbers: per second (the report's chart), per phase (its counts) and
over the last few seconds (the runner's progress line). Pure arithmetic over RequestResults,
no drawing, so the runner can import it without matplotlib."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from chaos.drill.results import RequestResult

PROGRESS_WINDOW_S = 5.0  # the progress line's rate and p99: recent enough to show a fault


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank q-th percentile (0 < q <= 100): a value some request really took,
    never an interpolation between two; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = math.ceil(q / 100.0 * len(ordered))
    return ordered[max(rank, 1) - 1]


def refused_by_server(request: RequestResult) -> bool:
    """A clean refusal that is the gateway's or an upstream's (a 5xx, or a stream's error
    event, which has no status): the refusals RequestResult.failed counts."""
    return request.outcome == "error" and (request.status is None or request.status >= 500)


def refused_as_client(request: RequestResult) -> bool:
    """A clean refusal that is the client's own (a 4xx: a bad request, a key's quota)."""
    return request.outcome == "error" and request.status is not None and request.status < 500


@dataclass(frozen=True, slots=True)
class Second:
    """The requests that ended within one second [at, at + 1) of the drill. Binned by when
    they ended, as a scrape of the gateway's metrics would see them: a request stuck for 30 s
    shows at the end of its 30 s, where it hurt."""

    at: int
    requests: int
    ok: int
    errors_4xx: int
    errors_5xx: int  # a stream's error event (no status) included: see refused_by_server
    lost: int
    # Latency of whole answers (ok) only: a fast 503 would otherwise pull the percentiles
    # down in the very seconds a fault makes them interesting; errors have their own panel.
    p50_s: float | None
    p99_s: float | None
    ttft_p99_s: float | None  # streams answered whole
    backends: dict[str, int]  # whole answers per backend ("unknown": the gateway didn't say)

    @property
    def share_5xx(self) -> float | None:
        return self.errors_5xx / self.requests if self.requests else None

    @property
    def share_4xx(self) -> float | None:
        return self.errors_4xx / self.requests if self.requests else None


def seconds_covered(requests: Iterable[RequestResult], duration_s: float) -> int:
    """How many whole seconds the timeline spans: the drill's duration, or longer where a
    request ended after it (a client timeout that outlived the drill); at least one."""
    ends = [r.ended for r in requests]
    last_second = math.floor(max(ends)) + 1 if ends else 0  # the second a request ended in
    return max(1, math.ceil(duration_s), last_second)


def per_second(requests: Sequence[RequestResult], duration_s: float) -> list[Second]:
    """One Second per second of the drill, empty seconds included (gaps are news)."""
    count = seconds_covered(requests, duration_s)
    bins: list[list[RequestResult]] = [[] for _ in range(count)]
    for request in requests:
        # A request that ended before the drill's clock started (none should) goes in 0.
        index = min(max(math.floor(request.ended), 0), count - 1)
        bins[index].append(request)
    return [_second(at, in_bin) for at, in_bin in enumerate(bins)]


def _second(at: int, requests: Sequence[RequestResult]) -> Second:
    answered = [r for r in requests if r.outcome == "ok"]
    ttfts = [r.ttft_s for r in answered if r.kind == "stream" and r.ttft_s is not None]
    durations = [r.duration_s for r in answered]
    return Second(
        at=at,
        requests=len(requests),
        ok=len(answered),
        errors_4xx=sum(1 for r in requests if refused_as_client(r)),
        errors_5xx=sum(1 for r in requests if refused_by_server(r)),
        lost=sum(1 for r in requests if r.outcome == "lost"),
        p50_s=percentile(durations, 50),
        p99_s=percentile(durations, 99),
        ttft_p99_s=percentile(ttfts, 99),
        backends=dict(Counter(r.backend or "unknown" for r in answered)),
    )


@dataclass(frozen=True, slots=True)
class Counts:
    """The requests sent within one phase (or the whole drill), counted several ways."""

    requests: int
    outcome: dict[str, int]  # ok, error, lost: always all three
    kind: dict[str, int]
    status: dict[str, int]  # "200", "503", ...; "none" where no response came
    backend: dict[str, int]  # every request the gateway named a backend for; "none" if not
    errors: dict[str, int]  # refusals' codes and lost requests' reasons; "unknown" if unsaid


def count(requests: Iterable[RequestResult]) -> Counts:
    chosen = list(requests)
    outcome = {"ok": 0, "error": 0, "lost": 0}
    outcome.update(Counter(r.outcome for r in chosen))
    return Counts(
        requests=len(chosen),
        outcome=outcome,
        kind=_sorted(Counter(r.kind for r in chosen)),
        status=_sorted(Counter("none" if r.status is None else str(r.status) for r in chosen)),
        backend=_sorted(Counter(r.backend or "none" for r in chosen)),
        errors=_sorted(Counter(r.error or "unknown" for r in chosen if r.outcome != "ok")),
    )


def _sorted(counter: Counter[str]) -> dict[str, int]:
    return dict(sorted(counter.items()))


def progress_line(elapsed_s: float, requests: Sequence[RequestResult], phase: str) -> str:
    """One short line for the runner to redraw: where the drill is, the rate and p99 of the
    last few seconds, and the totals so far, e.g.
    `  42.0 s  during   38.2 req/s  ok 1520  error 12  lost 0  p99 0.41 s`."""
    window = min(PROGRESS_WINDOW_S, elapsed_s)
    recent = [r for r in requests if elapsed_s - window <= r.ended <= elapsed_s]
    rate = len(recent) / window if window > 0 else 0.0
    p99 = percentile([r.duration_s for r in recent if r.outcome == "ok"], 99)
    totals = Counter(r.outcome for r in requests)
    p99_text = "-" if p99 is None else f"{p99:.2f} s"
    return (
        f"{elapsed_s:6.1f} s  {phase:<7} {rate:6.1f} req/s  ok {totals['ok']}"
        f"  error {totals['error']}  lost {totals['lost']}  p99 {p99_text}"
    )
