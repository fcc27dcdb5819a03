"""/metrics for the whole server when it runs several worker processes (`server.workers`).

Each worker serves its own registry's OpenMetrics exposition on its private peer socket
(gateway/runtime/peers.py: a `metrics` request). The worker a scrape reaches asks every
sibling at once, each for at most `timeout_s`; a sibling that does not answer in time (dead,
restarting, stuck) is left out and counted in `vgate_metrics_workers{state="missing"}`, so a
scrape is never held up for longer than that. With one worker none of this exists.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from gateway.edge import metrics_merge
from gateway.runtime.peers import METRICS, PeerServer, ask

logger = logging.getLogger("vgate.workers")

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
MAX_EXPOSITION_BYTES = 64 * 1024 * 1024  # one sibling's answer, read at most this far


class PeerMetrics:
    """One worker's side: serve its own exposition to siblings, and merge theirs into the
    answer to /metrics."""

    def __init__(
        self,
        own: Callable[[str | None], tuple[bytes, str]],
        *,
        run_dir: str,
        index: int,
        workers: int,
        timeout_s: float = 1.0,
    ) -> None:
        self._own = own  # GatewayMetrics.exposition
        self._run_dir = run_dir
        self._index = index
        self._workers = workers
        self._timeout_s = timeout_s
        self._server: PeerServer | None = None

    async def answer(self, payload: bytes) -> bytes:
        """The peer socket's `metrics` request: this worker's own exposition."""
        return self._own(OPENMETRICS)[0]

    async def start(self) -> None:
        """A peer socket answering metrics alone (a worker's serves admin calls too: see
        gateway/runtime/workers.py)."""
        self._server = PeerServer(self._run_dir, self._index, {METRICS: self.answer})
        await self._server.start()

    async def aclose(self) -> None:
        if self._server is not None:
            await self._server.aclose()

    async def _ask(self, index: int) -> bytes | None:
        return await ask(
            self._run_dir,
            index,
            METRICS,
            b"",
            timeout_s=self._timeout_s,
            limit=MAX_EXPOSITION_BYTES,
        )

    async def exposition(self, accept: str | None) -> tuple[bytes, str]:
        siblings = [i for i in range(self._workers) if i != self._index]
        answers = await asyncio.gather(*(self._ask(i) for i in siblings))
        texts = {self._index: self._own(OPENMETRICS)[0]}
        texts.update((i, a) for i, a in zip(siblings, answers, strict=True) if a)
        # Parsing and merging is pure-Python work of some milliseconds per worker: in a
        # thread, so the loop goes on serving meanwhile.
        return await asyncio.to_thread(self._merged, texts, accept)

    def _merged(self, texts: dict[int, bytes], accept: str | None) -> tuple[bytes, str]:
        processes: list[list[Metric]] = []
        per_worker = CounterMetricFamily(
            "vgate_worker_requests",
            "Requests answered, by worker process (its index: server.workers > 1); a "
            "restarted worker starts again from 0.",
            labels=["worker"],
        )
        connections = GaugeMetricFamily(
            "vgate_worker_connections",
            "Client connections open, by worker process (its index: server.workers > 1).",
            labels=["worker"],
        )
        for index in sorted(texts):
            try:
                families = metrics_merge.parse(texts[index].decode())
            except ValueError as exc:  # a cut-off answer: left out, as a silent one
                logger.warning("worker %d's metrics unreadable: %s", index, exc)
                continue
            processes.append(families)
            per_worker.add_metric([str(index)], _total(families, "vgate_requests_total"))
            connections.add_metric([str(index)], _total(families, "vgate_connections_open"))
        workers = GaugeMetricFamily(
            "vgate_metrics_workers",
            "Worker processes whose metrics this scrape holds (answered), and those that did "
            "not answer in time (missing: left out of the sums).",
            labels=["state"],
        )
        workers.add_metric(["answered"], len(processes))
        workers.add_metric(["missing"], self._workers - len(processes))
        merged = metrics_merge.merge(processes)
        return metrics_merge.render([*merged, per_worker, connections, workers], accept)


def _total(families: list[Metric], sample: str) -> float:
    return sum(s.value for f in families for s in f.samples if s.name == sample)
