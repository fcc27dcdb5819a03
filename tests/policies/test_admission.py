from __future__ import annotations

import asyncio

import pytest

from gateway.errors import Overloaded
from policies.admission import Admission, Priority


async def test_slots_up_to_the_limit_are_immediate() -> None:
    admission = Admission(limit=2, max_waiting=0, timeout_s=1)
    await admission.acquire(Priority.INTERACTIVE)
    await admission.acquire(Priority.BATCH)
    assert admission.in_flight == 2
    with pytest.raises(Overloaded) as caught:
        await admission.acquire(Priority.INTERACTIVE)
    assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "1"}
    assert admission.shed_full == 1


async def test_a_released_slot_goes_to_the_waiter_interactive_first() -> None:
    admission = Admission(limit=1, max_waiting=10, timeout_s=5)
    await admission.acquire(Priority.INTERACTIVE)
    order: list[str] = []

    async def wait(name: str, priority: Priority) -> None:
        await admission.acquire(priority)
        order.append(name)

    batch = asyncio.create_task(wait("batch", Priority.BATCH))
    await asyncio.sleep(0)
    interactive = asyncio.create_task(wait("interactive", Priority.INTERACTIVE))
    await asyncio.sleep(0)
    assert admission.waiting == 2
    admission.release()
    await interactive
    assert order == ["interactive"] and admission.in_flight == 1
    admission.release()
    await batch
    assert order == ["interactive", "batch"]
    admission.release()
    assert admission.in_flight == 0 and admission.waiting == 0


async def test_waiting_too_long_is_shed() -> None:
    admission = Admission(limit=1, max_waiting=10, timeout_s=0.05)
    await admission.acquire(Priority.INTERACTIVE)
    with pytest.raises(Overloaded, match="queue timeout"):
        await admission.acquire(Priority.INTERACTIVE)
    assert admission.waiting == 0 and admission.shed_timeout == 1


async def test_a_cancelled_waiter_leaks_no_slot() -> None:
    admission = Admission(limit=1, max_waiting=10, timeout_s=5)
    await admission.acquire(Priority.INTERACTIVE)
    waiter = asyncio.create_task(admission.acquire(Priority.INTERACTIVE))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert admission.waiting == 0
    admission.release()
    assert admission.in_flight == 0
    async with admission.slot(Priority.BATCH):
        assert admission.in_flight == 1
    assert admission.in_flight == 0
