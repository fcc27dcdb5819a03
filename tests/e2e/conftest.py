from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.servers import DEMO_KEY, Gateway, Process, backend, gateway_config, start_gateway


@pytest.fixture(scope="module")
def gateway(logs: Path, sims: tuple[Process, Process]) -> Iterator[Gateway]:
    """The gateway in front of the two session sims, as `make run` arranges it."""
    first, second = sims
    config = gateway_config(
        [
            {
                "name": "tiny-llama",
                "aliases": ["default"],
                "backends": [backend("w1", first.url, weight=3), backend("w2", second.url)],
            },
            {
                "name": "tiny-embed",
                "backends": [backend("w1-embed", first.url), backend("w2-embed", second.url)],
            },
        ]
    )
    process = start_gateway(logs, config)
    yield process
    process.stop()


@pytest.fixture
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=10)


@pytest.fixture
def gateway_for(logs: Path) -> Iterator[object]:
    """Start a gateway whose tiny-llama route has one backend at the given URL."""
    started: list[Gateway] = []

    def start(url: str, **route: object) -> Gateway:
        config = gateway_config(
            [{"name": "tiny-llama", "backends": [backend("only", url)], **route}]
        )
        process = start_gateway(logs, config)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def new_request_id() -> str:
    """An X-Request-ID of the test's own, to find its request's access-log line by."""
    return f"test-{uuid.uuid4().hex}"


def access_lines(gateway: Gateway) -> list[tuple[bytes, dict[str, Any]]]:
    """Each whole line of the gateway's access log, raw and parsed; a line still being
    written (no newline yet) is left for the next read."""
    assert gateway.access_log_path is not None
    raw = gateway.access_log_path.read_bytes().split(b"\n")[:-1]
    return [(line, orjson.loads(line)) for line in raw if line.strip()]


def wait_for_line(gateway: Gateway, request_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """The access-log line of the request sent with `X-Request-ID: request_id`.

    Fails the test when it has not been written within `timeout_s`, or was written twice.
    The raw line is kept under `"_raw"` for checks on what the line must never hold.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        found = [
            (raw, entry)
            for raw, entry in access_lines(gateway)
            if entry.get("request_id") == request_id
        ]
        if found:
            assert len(found) == 1, f"{len(found)} access-log lines for request {request_id}"
            raw, entry = found[0]
            return {**entry, "_raw": raw.decode("utf-8")}
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no access-log line for request {request_id} within {timeout_s}s "
                f"({len(access_lines(gateway))} lines in {gateway.access_log_path})"
            )
        time.sleep(0.02)
