"""The simulated engine's scheduling, in process: FIFO slots and the counters a scrape reads."""

from __future__ import annotations

import asyncio

import pytest

from chaos.sim.engine import Engine, Slots
from chaos.sim.settings import SimSettings


async def settle() -> None:
    """Let every task that can run do so (a few loop turns; no wall-clock waiting)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_released_slot_goes_to_the_longest_waiter_not_a_newcomer() -> None:
    slots = Slots(1)
    assert slots.try_acquire()
    order: list[str] = []

    async def wait(name: str) -> None:
        await slots.acquire()
        order.append(name)

    first = asyncio.create_task(wait("first"))
    await settle()
    second = asyncio.create_task(wait("second"))
    await settle()
    slots.release()
    assert not slots.try_acquire()  # handed on already: a newcomer can't barge past
    await settle()
    assert order == ["first"]
    slots.release()
    await settle()
    assert order == ["first", "second"]
    await asyncio.gather(first, second)


async def test_a_waiter_cancelled_after_being_handed_a_slot_passes_it_on() -> None:
    slots = Slots(1)
    assert slots.try_acquire()
    first = asyncio.create_task(slots.acquire())
    await settle()
    second = asyncio.create_task(slots.acquire())
    await settle()
    slots.release()  # to `first`, which is cancelled before it runs
    first.cancel()
    await settle()
    assert second.done() and not second.cancelled()
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_request_cancelled_while_waiting_counts_as_aborted() -> None:
    engine = Engine(SimSettings(max_num_seqs=1))
    stats = engine.stats["tiny-llama"]
    await engine.acquire(stats)
    waiter = asyncio.create_task(engine.acquire(stats))
    await settle()
    assert (stats.running, stats.waiting) == (1, 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (stats.running, stats.waiting, stats.finished["abort"]) == (1, 0, 1)
    engine.release(stats)
    assert stats.running == 0
    assert engine.immediate()  # the slot is free, and no delay is configured


async def test_a_token_rate_makes_the_engine_wait() -> None:
    engine = Engine(SimSettings())
    assert engine.instant
    engine.set_tokens_per_s(10.0)
    assert not engine.instant
    assert not engine.immediate()
    engine.set_tokens_per_s(0.0)
    assert engine.immediate()
