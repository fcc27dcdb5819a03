"""The router in process: built from configuration with fake adapters (providers.fake).

Timeouts are tiny and explicit, so that a `Hang` in a script is ended by the router's
own timers within a fraction of a second; nothing here sleeps to wait for anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.config import (
    BackendConfig,
    BreakerConfig,
    GatewayConfig,
    KeysConfig,
    ModelRoute,
    RetryConfig,
    ServerConfig,
    Timeouts,
)
from gateway.errors import StreamInterrupted
from gateway.router import Call, Completion, Outcome, Router, RouterHooks
from gateway.router.build import build_router
from gateway.router.streams import PUMPED
from gateway.wire.validation import Endpoint, ProxyRequest, parse_request
from providers.fake import FakeAdapters

MESSAGES = [{"role": "user", "content": "hello"}]
# Long enough that an answer the fake gives at once always beats them, even on a loaded
# machine; short enough that a test waiting for one to expire takes a fraction of a second.
FAST = Timeouts(connect_s=0.05, first_token_s=0.5, idle_s=0.5, total_s=5.0)
QUICK_RETRIES = RetryConfig(max_retries=1, backoff_initial_s=0.001, backoff_max_s=0.001)
NO_BREAKER = BreakerConfig(consecutive_failures=1000, min_requests=1000)
CALL = Call("req-1")


def timeouts(**fields: float) -> Timeouts:
    """FAST with `fields` changed."""
    return Timeouts(**{**FAST.model_dump(), **fields})


def backend(name: str, **fields: Any) -> BackendConfig:
    """A vLLM backend (so it can take a prefill) at an address nothing listens on."""
    return BackendConfig(name=name, provider="vllm", url=f"http://{name}.invalid:8000", **fields)


def route(name: str, *backends: str | BackendConfig, **fields: Any) -> ModelRoute:
    """A route with fast timeouts, quick retries and no breaker unless `fields` say else."""
    settings: dict[str, Any] = {
        "timeouts": FAST,
        "retries": QUICK_RETRIES,
        "breaker": NO_BREAKER,
        **fields,
    }
    listed = tuple(backend(b) if isinstance(b, str) else b for b in backends)
    return ModelRoute(name=name, backends=listed, **settings)


def gateway_config(*routes: ModelRoute, server: ServerConfig | None = None) -> GatewayConfig:
    keys = KeysConfig(file=Path("unread-keys.yaml"))  # the router reads no keys
    return GatewayConfig(models=routes, server=server or ServerConfig(), keys=keys)


def make_router(
    fakes: FakeAdapters,
    *routes: ModelRoute,
    server: ServerConfig | None = None,
    hooks: RouterHooks | None = None,
) -> Router:
    """The router these routes make, every backend's adapter the fake of its name."""
    return build_router(gateway_config(*routes, server=server), adapters=fakes, hooks=hooks)


def chat(model: str = "m", *, stream: bool = False, **fields: Any) -> ProxyRequest:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, **fields}
    if stream:
        body["stream"] = True
    return parse_request(Endpoint.CHAT, orjson.dumps(body))


async def complete(
    router: Router, request: ProxyRequest, outcome: Outcome, call: Call = CALL
) -> Completion:
    """A non-streaming request, as the edge sends it."""
    return await router.complete(router.plan(request, call), outcome)


@dataclass(frozen=True, slots=True)
class Streamed:
    """A stream as its client received it."""

    body: bytes  # every event up to its end, or to where it was interrupted
    route: str  # as the response's headers name them, fixed when the stream opened
    backend: str
    interrupted: StreamInterrupted | None

    @property
    def chunks(self) -> list[dict[str, Any]]:
        """The data events, parsed; [DONE] left out."""
        events = [e for e in self.body.split(b"\n\n") if e.startswith(b"data: {")]
        return [orjson.loads(e[6:]) for e in events]

    @property
    def text(self) -> str:
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c["choices"]
        )

    @property
    def done(self) -> bool:
        return self.body.endswith(b"data: [DONE]\n\n")


# How `stream` reads what follows a stream's first events: "rest" (the edge under any ASGI
# server) or "pump" (under vgate's own), set by the `stream_reading` fixture.
READING = {"mode": "rest"}


@pytest.fixture(params=["rest", "pump"])
def stream_reading(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test twice: streams read through `rest()`, then pumped into a writer that
    asks for a pause after every other write (as a slow client's socket does)."""
    READING["mode"] = request.param
    yield request.param
    READING["mode"] = "rest"


class PausingWriter:
    """`pump`'s writer: keeps what it is given, paused after every other write."""

    def __init__(self, body: list[bytes]) -> None:
        self.body = body
        self.writes = 0
        self.drains = 0

    def write(self, events: bytes) -> bool:
        assert events, "an empty write would end a chunked body"
        self.body.append(events)
        self.writes += 1
        return self.writes % 2 == 0

    async def drain(self) -> None:
        self.drains += 1


async def stream(
    router: Router, request: ProxyRequest, outcome: Outcome, call: Call = CALL
) -> Streamed:
    """A streaming request read to its end and closed, as the edge sends it."""
    opened = await router.open_stream(router.plan(request, call), outcome)
    try:
        body = [opened.first]
        interrupted = None
        try:
            if READING["mode"] == "pump" and isinstance(opened, PUMPED):
                writer = PausingWriter(body)
                await opened.pump(writer.write, writer.drain)
            else:
                async for events in opened.rest():
                    body.append(events)
        except StreamInterrupted as exc:
            interrupted = exc  # the edge would send it as an error event, and no [DONE]
        return Streamed(b"".join(body), opened.route.name, opened.backend.name, interrupted)
    finally:
        opened.close()


@pytest.fixture
def fakes() -> Iterator[FakeAdapters]:
    """The upstreams, by backend name; after the test, every answer they gave was closed
    by the router (a connection left open would be a leak in the real adapters)."""
    fakes = FakeAdapters()
    yield fakes
    for fake in fakes.fakes.values():
        left_open = [r for r in fake.responses if not r.closed]
        assert not left_open, f"'{fake.name}': {len(left_open)} responses never closed"
