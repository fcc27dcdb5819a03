"""gateway.router.readtimer: one timer for a stream's reads; it cancels only a read that waited
too long, never what the task does between reads."""

from __future__ import annotations

import asyncio

import pytest

from gateway.router.readtimer import ReadTimer


async def read(timer: ReadTimer, wait: asyncio.Future[bytes] | float) -> bytes | str:
    """One read as UpstreamStream.rest does it: the data, or "timeout"."""
    timer.start()
    try:
        if isinstance(wait, float):
            await asyncio.sleep(wait)
            return b"data"
        return await wait
    except asyncio.CancelledError:
        if not timer.expired():
            raise
        return "timeout"
    finally:
        timer.stop()


def soon(data: bytes) -> asyncio.Future[bytes]:
    """A read that gets its data on the loop's next turn."""
    future = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(future.set_result, data)
    return future


async def test_reads_within_idle_s_are_left_alone() -> None:
    loop = asyncio.get_running_loop()
    timer = ReadTimer(0.5, loop.time() + 60)
    try:
        for _ in range(8):  # 0.8 s in all, past idle_s, each read well within it
            assert await read(timer, 0.1) == b"data"
    finally:
        timer.close()


async def test_a_read_that_waits_past_idle_s_times_out() -> None:
    loop = asyncio.get_running_loop()
    timer = ReadTimer(0.1, loop.time() + 60)
    try:
        assert await read(timer, 0.01) == b"data"
        started = loop.time()
        assert await read(timer, loop.create_future()) == "timeout"
        assert loop.time() - started >= 0.1
        assert timer.idle_expired
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    finally:
        timer.close()


async def test_the_deadline_cuts_a_read_before_idle_s() -> None:
    loop = asyncio.get_running_loop()
    timer = ReadTimer(30.0, loop.time() + 0.1)
    try:
        assert await read(timer, loop.create_future()) == "timeout"
        assert not timer.idle_expired
    finally:
        timer.close()


async def test_time_between_reads_is_not_a_reads_wait() -> None:
    # The consumer holds the stream (a slow client) longer than idle_s between two reads:
    # neither read waited, so neither times out, and the consumer is never cancelled.
    loop = asyncio.get_running_loop()
    timer = ReadTimer(0.5, loop.time() + 60)
    try:
        assert await read(timer, soon(b"data")) == b"data"
        await asyncio.sleep(1.0)
        assert await read(timer, soon(b"data")) == b"data"
    finally:
        timer.close()


async def test_a_deadline_passed_between_reads_cuts_the_next_read() -> None:
    loop = asyncio.get_running_loop()
    timer = ReadTimer(30.0, loop.time() + 0.05)
    try:
        await asyncio.sleep(0.1)
        assert await read(timer, loop.create_future()) == "timeout"
    finally:
        timer.close()


async def test_someone_elses_cancellation_is_not_a_timeout() -> None:
    loop = asyncio.get_running_loop()

    async def reader() -> bytes | str:
        timer = ReadTimer(30.0, loop.time() + 60)
        try:
            return await read(timer, loop.create_future())
        finally:
            timer.close()

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_closed_timer_never_fires() -> None:
    loop = asyncio.get_running_loop()
    timer = ReadTimer(0.01, loop.time() + 60)
    timer.start()
    timer.close()
    await asyncio.sleep(0.05)  # past idle_s, "inside" a read: nothing is cancelled
    timer.stop()
