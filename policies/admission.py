"""Admission: how many requests a gateway process works on at once, and who waits for a slot.

Beyond `limit` requests in flight, newcomers wait in a bounded queue, interactive callers
ahead of batch ones, each for at most `timeout_s`. A full queue or an expired wait is shed
at once with a 503 and a Retry-After, before any upstream work: an overloaded gateway
answers fast rather than late.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from enum import IntEnum

from gateway.config import ServerConfig
from gateway.errors import Overloaded
from gateway.wire.headers import retry_after


class Priority(IntEnum):
    INTERACTIVE = 0
    BATCH = 1


class Admission:
    @classmethod
    def from_config(cls, server: ServerConfig) -> Admission:
        """The gateway-wide bound on requests upstream at once, and the queue before it."""
        return cls(
            limit=server.max_in_flight,
            max_waiting=server.queue_max_waiting,
            timeout_s=server.queue_timeout_s,
        )

    def __init__(self, *, limit: int, max_waiting: int, timeout_s: float) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self.in_flight = 0
        self._waiters: tuple[deque[asyncio.Future[None]], ...] = tuple(deque() for _ in Priority)
        self.waiting = 0
        self.shed_full = 0
        self.shed_timeout = 0

    @asynccontextmanager
    async def slot(self, priority: Priority) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody waits for it; never waits."""
        if self.in_flight < self.limit and not self.waiting:
            self.in_flight += 1
            return True
        return False

    async def acquire(self, priority: Priority) -> None:
        if self.try_acquire():
            return
        if self.waiting >= self.max_waiting:
            self.shed_full += 1
            raise self._overloaded("the gateway's wait queue is full")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiters[priority]
        queue.append(waiter)
        self.waiting += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                await waiter  # resolved by release(), which hands over its slot
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # the slot arrived together with the timeout: take it
            self.shed_timeout += 1
            raise self._overloaded(
                f"no capacity within the queue timeout ({self.timeout_s:g}s)"
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as we gave up: pass it on
            raise
        finally:
            if waiter in queue:
                queue.remove(waiter)
                self.waiting -= 1

    def release(self) -> None:
        for queue in self._waiters:
            while queue:
                waiter = queue.popleft()
                self.waiting -= 1
                if not waiter.done():
                    waiter.set_result(None)  # the slot moves to the waiter: in_flight unchanged
                    return
        self.in_flight -= 1

    def _overloaded(self, why: str) -> Overloaded:
        return Overloaded(
            f"The gateway is overloaded: {why}. Retry shortly.",
            headers={"Retry-After": retry_after(self.timeout_s)},
        )
