"""Faults the audit of issue 9's fault classes found beyond its list, through a real
`vgate serve` and raw socket upstreams."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fake_upstream import ScriptedUpstream, chat_answer, read_request
from tests.servers import DEMO_KEY, backend, gateway_config, start_gateway

SLOW_HEALTH_S = 3.0  # the worker's /health answers after this long: slow, not down
PROBE_TIMEOUT_S = 0.5


async def slow_health(
    upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A busy worker: chat answered at once, /health only after SLOW_HEALTH_S."""
    while True:
        path, _, body = await read_request(reader)
        if path == "/health":
            upstream.state["health_probes"] = upstream.state.get("health_probes", 0) + 1
            await asyncio.sleep(SLOW_HEALTH_S)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        elif path.startswith("/v1/chat/completions"):
            writer.write(chat_answer(body, "hello"))
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()


@pytest.fixture
def slow_worker() -> Iterator[ScriptedUpstream]:
    upstream = ScriptedUpstream(slow_health)
    yield upstream
    upstream.stop()


def test_a_backend_slow_to_answer_its_first_health_probe_stays_in_rotation(
    logs: Path, slow_worker: ScriptedUpstream
) -> None:
    """The start-up probe round timed out on a worker that was merely slow, and the first
    probe decided outright: the gateway started with its only backend out of rotation
    and refused every request until two good probes in a row. A timeout now counts as one
    failure, as any later probe's does."""
    health = {"timeout_s": PROBE_TIMEOUT_S, "interval_s": 600, "unhealthy_after": 2}
    model = {"name": "m", "backends": [backend("w", slow_worker.url)], "health": health}
    gateway = start_gateway(logs, gateway_config([model]))
    try:
        assert slow_worker.state.get("health_probes", 0) >= 1  # the start-up round ran
        response = httpx.post(
            gateway.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {DEMO_KEY}"},
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "hello"
    finally:
        gateway.stop()
