"""The simulated engine's scheduling: `max_num_seqs` slots, per-model counters, and timing.

As in vLLM, at most `max_num_seqs` requests generate at once and the rest wait, first come,
first served; a request cancelled (its client gone) while waiting or generating is counted as
aborted and frees its slot at once. The counters here are plain integers that the endpoints
bump and `chaos.sim.metrics` reads at scrape time. A `Job` is one admitted request.
"""

from __future__ import annotations

import asyncio
from collections import deque

from chaos.sim.settings import SimSettings
from chaos.sim.tokens import Sequence

__all__ = ["FINISH_REASONS", "Engine", "Job", "ModelStats", "Slots"]

FINISH_REASONS = ("stop", "length", "abort", "error")


class ModelStats:
    __slots__ = ("finished", "generation_tokens", "prompt_tokens", "running", "waiting")

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)


class Slots:
    """`max_num_seqs` slots handed out first come, first served.

    A released slot goes straight to the longest waiter, so a newcomer can't barge past the
    queue, and a waiter cancelled after being handed a slot passes it on.
    """

    __slots__ = ("_free", "_waiters")

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class Job:
    """One admitted chat or completion request: its sequences and how it is to be answered."""

    __slots__ = (
        "chat",
        "continuous_usage",
        "include_usage",
        "model",
        "prompt_tokens",
        "sequences",
        "stats",
        "stream",
    )

    def __init__(
        self,
        chat: bool,
        model: str,
        stats: ModelStats,
        sequences: list[Sequence],
        stream: bool,
        include_usage: bool,
        continuous_usage: bool,
    ) -> None:
        self.chat = chat
        self.model = model
        self.stats = stats
        self.sequences = sequences
        self.prompt_tokens = sum(seq.prompt_tokens for seq in sequences)
        self.stream = stream
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage

    @property
    def completion_tokens(self) -> int:
        return sum(len(seq.pieces) for seq in self.sequences)

    @property
    def longest(self) -> int:
        return max(len(seq.pieces) for seq in self.sequences)


class Engine:
    """Slots, counters and the token clock of one worker.

    `ttft` and `tps` are in seconds and tokens per second; `tps` follows the faults (which
    may slow tokens down), so the worker sets it with them. `instant` is true when neither
    delays anything, which lets a request that finds a free slot skip waiting altogether.
    """

    __slots__ = ("instant", "slots", "stats", "tps", "ttft")

    def __init__(self, settings: SimSettings) -> None:
        self.ttft = max(0.0, settings.ttft_ms) / 1000.0
        self.tps = 0.0
        self.instant = True
        self.slots = Slots(settings.max_num_seqs)
        self.stats = {name: ModelStats() for name in settings.models}

    def set_tokens_per_s(self, tps: float) -> None:
        self.tps = max(0.0, tps)
        self.instant = self.ttft == 0.0 and self.tps == 0.0

    def immediate(self) -> bool:
        """Whether a request can be answered now, with nothing to wait for.

        Nothing to wait for means nothing a disconnect could abort: no watcher is needed, and
        the slot is free again before anything else runs.
        """
        if self.instant and self.slots.try_acquire():
            self.slots.release()
            return True
        return False

    def record(self, job: Job) -> None:
        stats = job.stats
        stats.prompt_tokens += job.prompt_tokens
        stats.generation_tokens += job.completion_tokens
        for seq in job.sequences:
            stats.finished[seq.finish_reason] += 1

    async def acquire(self, stats: ModelStats) -> None:
        if not self.slots.try_acquire():
            stats.waiting += 1
            try:
                await self.slots.acquire()
            except asyncio.CancelledError:
                stats.finished["abort"] += 1
                raise
            finally:
                stats.waiting -= 1
        stats.running += 1

    def release(self, stats: ModelStats) -> None:
        stats.running -= 1
        self.slots.release()

    async def run(self, job: Job) -> None:
        """A non-streaming job, start to finish: wait for a slot, generate, record."""
        stats = job.stats
        await self.acquire(stats)
        try:
            delay = self.ttft
            if self.tps:
                delay += (job.longest - 1) / self.tps
            if delay > 0:
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            stats.finished["abort"] += 1
            raise
        finally:
            self.release(stats)
        self.record(job)

    async def hold(self, stats: ModelStats) -> None:
        """Take a slot and generate nothing, until cancelled (a hung request)."""
        await self.acquire(stats)
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            stats.finished["abort"] += 1
            raise
        finally:
            self.release(stats)
