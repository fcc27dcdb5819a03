"""Idle and total limits on a stream's reads, for a clock reading per read.

`asyncio.timeout_at` around each read of an upstream stream costs about 6 µs (a `Timeout`,
a timer in the loop's heap, the task's cancel bookkeeping), once per event: for a 500-token
answer more than the gateway's whole work on a request. `ReadTimer` keeps one timer for the
whole stream and moves it only when it fires. A read notes when it started; when the timer
fires it cancels the task if a read is in progress and has waited past its limit, and
otherwise re-arms itself for the earliest moment one could have.

The task is cancelled only while it waits inside a read (`active`: there is no suspension
point between `start` and the read's await, nor between the read and `stop`), so the
cancellation always lands in the read, never in what the caller does between reads.
"""

from __future__ import annotations

import asyncio


class ReadTimer:
    __slots__ = (
        "_cancelling",
        "_fired",
        "_handle",
        "_loop",
        "_task",
        "active",
        "deadline",
        "idle_s",
        "started",
    )

    def __init__(self, idle_s: float, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "ReadTimer outside a task"
        self._loop = loop
        self._task = task
        self.idle_s = idle_s
        self.deadline = deadline  # event-loop time
        self.started = loop.time()
        self.active = False
        self._fired = False
        self._cancelling = 0
        self._handle: asyncio.TimerHandle | None = loop.call_at(
            min(self.started + idle_s, deadline), self._fire
        )

    def start(self) -> None:
        """A read begins: it may last until `idle_s` from now, and not past the deadline."""
        self.started = now = self._loop.time()
        self._cancelling = self._task.cancelling()
        self.active = True
        if now >= self.deadline:
            self._arm(now)  # between reads it may have moved past the deadline

    def stop(self) -> None:
        """The read is over (it returned or raised)."""
        self.active = False

    def expired(self) -> bool:
        """After a read raised `CancelledError`: whether this timer cancelled it (the task
        is then uncancelled and the read timed out), rather than someone else."""
        if not self._fired:
            return False
        self._fired = False
        return self._task.uncancel() <= self._cancelling

    @property
    def idle_expired(self) -> bool:
        """Whether the limit the last read met was `idle_s` rather than the deadline."""
        return self.started + self.idle_s < self.deadline

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        if self._task.done():
            return
        now = self._loop.time()
        if self.active:
            due = min(self.started + self.idle_s, self.deadline)
            if now >= due:
                self._fired = True
                self._task.cancel()
                return
        else:
            # Between reads: the next one starts no earlier than now (and `start` sees to
            # a deadline already passed).
            due = now + self.idle_s
            if now < self.deadline:
                due = min(due, self.deadline)
        self._arm(due)

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(when, self._fire)
