"""Upstream load: what each vLLM worker's own /metrics say it is working on.

This gateway knows only its own requests in flight. A worker shared with other gateway
replicas, other routes or direct clients can be far busier than that, and vLLM says so in
two gauges: `vllm:num_requests_running` (in the batch) and `vllm:num_requests_waiting` (queued).
`LoadScraper` reads them from every backend in the background; `UpstreamLoad` keeps each
backend's latest `LoadReport` and turns it into the one number the selectors read:

    load = in_flight + extra
    extra = max(0, running + waiting - in_flight at the time of the scrape)

"At the time of the scrape" is a moment inside the fetch, when the worker rendered its
metrics; the gateway can only read its own count before and after. Its requests that end
during a slow fetch were counted by the worker but not after it, and those that start were
counted after but maybe not by the worker: either way one reading would turn the gateway's
own requests into others' work, a phantom load that steers traffic away from a worker for a
whole interval. The larger of the two readings never does; what it can miss (requests sent
during the fetch that the worker had not yet seen) only makes `extra` a little low.

`extra` is the work others gave the worker. It is fixed between scrapes while `in_flight`
moves with every request, so each request this gateway sends counts at once; the simpler
`max(in_flight, running + waiting)` would let requests pile onto a worker that others keep
busy until the next scrape. Without a fresh report (never scraped, scrape failing for
`stale_after` intervals, no /metrics at all) `extra` is 0 and load is plain `in_flight`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from gateway.config import LoadScrapeConfig
from policies.background import stop_task

logger = logging.getLogger("vgate.load")

RUNNING = b"vllm:num_requests_running"
WAITING = b"vllm:num_requests_waiting"
MAX_SERIES = 256  # per gauge: one per served model and engine; more is not a vLLM worker
MAX_COUNT = 1_000_000  # requests in one sample: more is not a vLLM worker either

Fetch = Callable[[], Awaitable[bytes | None]]  # a /metrics body, or None where there is none


@dataclass(frozen=True, slots=True)
class LoadReport:
    running: int
    waiting: int
    at: float  # loop time of the scrape


class UpstreamLoad:
    """One backend's latest report, and the load it adds to this gateway's own."""

    __slots__ = ("extra", "report")

    def __init__(self) -> None:
        self.report: LoadReport | None = None
        self.extra = 0  # what selectors add to in_flight: a plain attribute, read per pick

    def update(self, report: LoadReport, own_in_flight: int) -> None:
        self.report = report
        self.extra = max(0, report.running + report.waiting - own_in_flight)

    def expire(self, now: float, max_age_s: float) -> None:
        """Forget a report older than `max_age_s`: stale numbers steer worse than none."""
        if self.report is not None and now - self.report.at > max_age_s:
            self.report = None
            self.extra = 0


def parse_load(body: bytes) -> tuple[int, int] | None:
    """(running, waiting) summed over every label set, or None if neither gauge is there.

    Reads only the two gauges' sample lines, by search rather than by splitting the body
    into lines, so a large body costs little; anything unparsable is skipped.
    """
    running = _gauge_sum(body, RUNNING)
    waiting = _gauge_sum(body, WAITING)
    if running is None and waiting is None:
        return None
    return running or 0, waiting or 0


def _gauge_sum(body: bytes, name: bytes) -> int | None:
    total = 0.0
    series = 0
    needle = b"\n" + name
    start = 0 if body.startswith(name) else _next_line(body.find(needle))
    for _ in range(MAX_SERIES):
        if start == -1:
            break
        end = body.find(b"\n", start)
        if end == -1:
            end = len(body)
        rest = body[start + len(name) : end]
        start = _next_line(body.find(needle, end))
        if rest[:1] == b"{":
            # Label values may hold anything but a raw newline; the sample's value and
            # timestamp hold no "}", so the last one closes the labels.
            rest = rest[rest.rfind(b"}") + 1 :] if b"}" in rest else b""
        elif rest[:1] not in (b" ", b"\t"):
            continue  # a longer name that starts with this one (..._running_total)
        fields = rest.split()
        try:
            value = float(fields[0]) if fields else math.nan
        except ValueError:
            continue
        if 0 <= value <= MAX_COUNT:  # False for NaN; no sum of these overflows
            total += value
            series += 1
    return round(total) if series else None


def _next_line(newline: int) -> int:
    return -1 if newline == -1 else newline + 1


@dataclass(slots=True)
class ScrapeTarget:
    name: str
    fetch: Fetch
    upstream: UpstreamLoad
    in_flight: Callable[[], int]  # this gateway's requests on it now
    next_due: float = 0.0
    failing: bool = False


class LoadScraper:
    """Scrapes every target's /metrics every `interval_s`, in one background task.

    At most `max_concurrency` scrapes run at once, each for at most `timeout_s`. A target
    without metrics (its fetch gives None, as for OpenAI's 404, or a body without vLLM's
    gauges) is tried again only after `absent_retry_s`. A failing scrape leaves the last
    report in place until it is `stale_after` intervals old.
    """

    @classmethod
    def from_config(cls, targets: Sequence[ScrapeTarget], scrape: LoadScrapeConfig) -> LoadScraper:
        return cls(
            targets,
            interval_s=scrape.interval_s,
            timeout_s=scrape.timeout_s,
            stale_after=scrape.stale_after,
            max_concurrency=scrape.max_concurrency,
            absent_retry_s=scrape.absent_retry_s,
        )

    def __init__(
        self,
        targets: Sequence[ScrapeTarget],
        *,
        interval_s: float = 1.0,
        timeout_s: float = 0.5,
        stale_after: int = 3,
        max_concurrency: int = 8,
        absent_retry_s: float = 300.0,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0 or stale_after < 1 or max_concurrency < 1:
            raise ValueError("interval_s, timeout_s, stale_after and max_concurrency must be > 0")
        self.targets = tuple(targets)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.max_age_s = stale_after * interval_s
        self.absent_retry_s = absent_retry_s
        self._slots = asyncio.Semaphore(max_concurrency)
        self._task: asyncio.Task[None] | None = None
        self._started = False

    def replace_targets(self, targets: Sequence[ScrapeTarget]) -> None:
        """Scrape `targets` from now on (a config reload); one of the same backend and
        load as before keeps its schedule and failing state."""
        before = {(target.name, id(target.upstream)): target for target in self.targets}
        kept = []
        for target in targets:
            old = before.get((target.name, id(target.upstream)))
            kept.append(old if old is not None and old.upstream is target.upstream else target)
        self.targets = tuple(kept)
        if self._started and self.targets and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def scrape_due(self, now: float) -> None:
        """One round: scrape the targets that are due, then forget stale reports."""
        due = [target for target in self.targets if target.next_due <= now]
        for target in due:
            target.next_due = now + self.interval_s
        if due:
            await asyncio.gather(*(self._scrape(target, now) for target in due))
        for target in self.targets:
            target.upstream.expire(now, self.max_age_s)

    async def _scrape(self, target: ScrapeTarget, now: float) -> None:
        async with self._slots:
            own_before = target.in_flight()  # see the module's note on the two readings
            try:
                async with asyncio.timeout(self.timeout_s):
                    body = await target.fetch()
                counts = None if body is None else parse_load(body)
            except Exception as exc:  # a scrape that fails is a missing report, never a crash
                if not target.failing:
                    target.failing = True
                    logger.info("load scrape of %s failed: %r", target.name, exc)
                return
        target.failing = False
        if counts is None:
            target.next_due = now + self.absent_retry_s
            logger.info(
                "backend %s has no vLLM load metrics; asking again in %gs",
                target.name,
                self.absent_retry_s,
            )
            return
        running, waiting = counts
        own = max(own_before, target.in_flight())
        target.upstream.update(LoadReport(running, waiting, now), own)

    async def start(self) -> None:
        self._started = True
        if self.targets and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.scrape_due(loop.time())
            await asyncio.sleep(self.interval_s)

    async def aclose(self) -> None:
        self._started = False
        await stop_task(self._task)
        self._task = None
