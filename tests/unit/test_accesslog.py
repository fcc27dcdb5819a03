"""The access log's batching: lines leave the request path, none is lost on a clean stop."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from gateway.asgi import Message, Receive, Scope, Send
from gateway.edge.accesslog import AccessLog
from gateway.edge.metrics import GatewayMetrics
from gateway.edge.middleware import RequestContextMiddleware
from gateway.edge.record import RequestRecord

REPO = Path(__file__).resolve().parents[2]


def record(request_id: str) -> RequestRecord:
    done = RequestRecord(request_id, time.perf_counter(), "POST", "/v1/chat/completions")
    done.status = 200
    return done


def ids(log: io.BytesIO) -> list[str]:
    return [orjson.loads(line)["request_id"] for line in log.getvalue().splitlines()]


class Flushed(io.BytesIO):
    """A stream that counts its writes and says when it was flushed."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushed = asyncio.Event()

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)

    def flush(self) -> None:
        super().flush()
        self.flushed.set()


async def test_no_window_writes_every_line_at_once() -> None:
    """`server.access_log_flush_s: 0`: no batching, each line written as its request ends."""
    log = Flushed()
    access = AccessLog(log, flush_interval_s=0)
    for number in range(3):
        access.write(record(f"r{number}"), time.perf_counter())
        assert ids(log) == [f"r{n}" for n in range(number + 1)]
    assert log.writes == 3 and access.buffered_bytes == 0


async def test_a_quiet_log_writes_at_once_and_batches_the_lines_that_follow() -> None:
    log = Flushed()
    access = AccessLog(log, flush_interval_s=0.05)
    for number in range(4):
        access.write(record(f"r{number}"), time.perf_counter())
    assert ids(log) == ["r0"]  # the first at once; the rest wait for the window to close
    assert log.writes == 1
    log.flushed.clear()
    await asyncio.wait_for(log.flushed.wait(), 5)
    assert ids(log) == ["r0", "r1", "r2", "r3"]
    assert log.writes == 2  # the three that waited: one write
    assert access.buffered_bytes == 0


async def test_a_full_buffer_is_written_at_once() -> None:
    log = io.BytesIO()
    access = AccessLog(log, flush_interval_s=3600, max_buffer_bytes=1000)
    access.write(record("r0"), time.perf_counter())  # opens the window
    written = 1
    while len(ids(log)) == 1:
        access.write(record(f"r{written}"), time.perf_counter())
        written += 1
    assert ids(log) == [f"r{n}" for n in range(written)]  # every line so far, whole
    assert 2 < written < 12  # a line is a few hundred bytes: the bound, not the timer
    access.flush()


def test_outside_an_event_loop_a_line_is_written_at_once() -> None:
    log = io.BytesIO()
    access = AccessLog(log, flush_interval_s=3600)
    access.write(record("r0"), time.perf_counter())
    access.write(record("r1"), time.perf_counter())
    assert ids(log) == ["r0", "r1"]


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="flush_interval_s"):
        AccessLog(io.BytesIO(), flush_interval_s=-1)
    with pytest.raises(ValueError, match="max_buffer_bytes"):
        AccessLog(io.BytesIO(), max_buffer_bytes=0)


async def test_the_lifespan_shutdown_flushes_the_log() -> None:
    """uvicorn shuts the lifespan down after the last connection drained: the lines of
    every request are out before the server says it stopped."""
    log = io.BytesIO()
    access = AccessLog(log, flush_interval_s=3600)
    seen: list[tuple[str, bytes]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = RequestContextMiddleware(
        app, metrics=GatewayMetrics(models=["m"], backends=["b"]), access_log=access
    )
    requests = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def lifespan_receive() -> Message:
        return next(requests)

    async def lifespan_send(message: Message) -> None:
        seen.append((message["type"], log.getvalue()))

    async def http_receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def http_send(message: Message) -> None:
        pass

    for request_id in (b"req-1", b"req-2"):
        scope = {
            "type": "http",
            "path": "/v1/models",
            "method": "GET",
            "headers": [(b"x-request-id", request_id)],
        }
        await middleware(scope, http_receive, http_send)
    assert ids(log) == ["req-1"]  # the second waits for its window
    await middleware({"type": "lifespan"}, lifespan_receive, lifespan_send)
    kind, written = seen[0]
    assert kind == "lifespan.startup.complete"
    kind, written = seen[1]
    assert kind == "lifespan.shutdown.complete"
    assert [orjson.loads(line)["request_id"] for line in written.splitlines()] == [
        "req-1",
        "req-2",
    ]


def test_lines_still_buffered_at_a_clean_exit_are_written(tmp_path: Path) -> None:
    """A line written after the lifespan's flush (or with no lifespan) is not lost when
    the process exits cleanly: the atexit hook writes it."""
    out = tmp_path / "access.jsonl"
    script = (
        "import asyncio, time\n"
        "from gateway.edge.accesslog import AccessLog\n"
        "from gateway.edge.record import RequestRecord\n"
        f"stream = open({str(out)!r}, 'wb')\n"
        "log = AccessLog(stream, flush_interval_s=3600)\n"
        "async def main():\n"
        "    for n in range(5):\n"
        "        r = RequestRecord(f'r{n}', time.perf_counter(), 'GET', '/')\n"
        "        log.write(r, time.perf_counter())\n"
        "asyncio.run(main())\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=60)
    lines = out.read_bytes().splitlines()
    assert [orjson.loads(line)["request_id"] for line in lines] == [f"r{n}" for n in range(5)]
