"""/metrics for the whole server when it runs several worker processes (`server.workers`).

Each worker serves its own registry's OpenMetrics exposition on a private unix socket,
`<run dir>/<index>.sock` (the run dir is the parent's, mode 0700, removed when it exits): a
client connects and reads to the end, nothing is sent. The worker a scrape reaches asks every
sibling at once, each for at most `timeout_s`; a sibling that does not answer in time (dead,
restarting, stuck) is left out and counted in `vgate_metrics_workers{state="missing"}`, so a
scrape is never held up for longer than that. With one worker none of this exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from gateway.edge import metrics_merge

logger = logging.getLogger("vgate.workers")

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
MAX_EXPOSITION_BYTES = 64 * 1024 * 1024  # one sibling's answer, read at most this far


def socket_path(run_dir: str, index: int) -> str:
    return os.path.join(run_dir, f"{index}.sock")


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
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        path = socket_path(self._run_dir, self._index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the socket of this worker's previous life
        self._server = await asyncio.start_unix_server(self._answer, path=path)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path(self._run_dir, self._index))

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self._own(OPENMETRICS)[0])
            await asyncio.wait_for(writer.drain(), self._timeout_s)
        except (OSError, TimeoutError):
            pass  # the asker gave up: it counts this worker missing
        finally:
            writer.close()

    async def _ask(self, index: int) -> bytes | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                reader, writer = await asyncio.open_unix_connection(
                    socket_path(self._run_dir, index), limit=MAX_EXPOSITION_BYTES
                )
                try:
                    return await reader.read(MAX_EXPOSITION_BYTES)
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return None

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
