from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
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
