"""Rolling updates lose nothing: SIGTERM under load, against a real `vgate serve`.

On SIGTERM the gateway answers /ready with 503 for `server.drain_delay_s` while it serves and
accepts on, then closes its listener and lets the requests in flight finish
(`server.graceful_shutdown_s`), and exits 0.

The load: 16 clients, each a pooled keep-alive httpx client sending streaming and
non-streaming chat requests back to back to workers that take seconds per stream. They
stand for load balancers that stop sending here a while after SIGTERM: at `SENDING_AFTER_S`
after it, which is earlier than the drain delay's end by `MARGIN_S`, the time a request's
bytes may take to reach the gateway. (The delay starts when the gateway handles the signal,
no earlier than the test sent it.) Every request they sent must succeed.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from tests.servers import (
    DEMO_KEY,
    Gateway,
    Process,
    backend,
    gateway_config,
    poll_until,
    start_gateway,
    start_sim,
)

DRAIN_DELAY_S = 4.0
MARGIN_S = 1.0
SENDING_AFTER_S = DRAIN_DELAY_S - MARGIN_S  # after SIGTERM, the clients send no new request
CLIENTS = 16
TOKENS_PER_S = 20  # the workers' pace: a stream of STREAM_TOKENS takes 3 s at least
STREAM_TOKENS = 60
SHORT_TOKENS = 4
# One stream sent once /ready says 503: 10 s at the workers' pace, in flight when the
# listener closes (DRAIN_DELAY_S after SIGTERM), which it must outlive.
LONG_TOKENS = 200


@dataclass
class Sent:
    stream: bool
    sent_at: float  # time.monotonic() before the request left
    done_at: float = 0.0
    error: str | None = None  # None: a complete, successful answer
    connection: str | None = None  # the response's Connection header


@dataclass
class Probe:
    at: float
    status: int | None  # None: no answer (refused, or cut off as the listener closed)
    connection: str | None = None
    refused: bool = False  # the listener is closed


@pytest.fixture(scope="module")
def workers(logs: Path) -> Iterator[tuple[Process, Process]]:
    slow = [start_sim(logs, tokens_per_s=TOKENS_PER_S) for _ in range(2)]
    yield slow[0], slow[1]
    for process in slow:
        process.stop()


def start(logs: Path, workers: tuple[Process, Process], **server: object) -> Gateway:
    first, second = workers
    models = [
        {
            "name": "tiny-llama",
            "backends": [backend("w1", first.url), backend("w2", second.url)],
        }
    ]
    return start_gateway(logs, gateway_config(models, **server))


def chat(http: httpx.Client, sent: Sent, tokens: int | None = None) -> None:
    """One request, recorded in `sent`: a stream read to its `[DONE]`, or a whole answer."""
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "Tell me about the sea"}],
        "max_tokens": tokens or (STREAM_TOKENS if sent.stream else SHORT_TOKENS),
        "stream": sent.stream,
    }
    try:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            sent.connection = response.headers.get("connection")
            raw = response.read()
        if response.status_code != 200:
            sent.error = f"{response.status_code}: {raw[:200]!r}"
        elif sent.stream:
            events = [line for line in raw.split(b"\n") if line.startswith(b"data: ")]
            if events[-1:] != [b"data: [DONE]"] or any(b'"error"' in e for e in events):
                sent.error = f"stream ended badly: {raw[-300:]!r}"
        elif orjson.loads(raw)["usage"]["completion_tokens"] != body["max_tokens"]:
            sent.error = f"short answer: {raw[:200]!r}"
    except httpx.HTTPError as error:
        sent.error = repr(error)
    sent.done_at = time.monotonic()


class Load:
    """CLIENTS threads sending back to back until `stop_sending_at`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent: list[Sent] = []
        self.stop_sending_at = float("inf")  # set once SIGTERM is sent
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(CLIENTS)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            assert not thread.is_alive(), f"a client still waits after {timeout_s}s"

    def completed(self) -> int:
        with self._lock:
            return sum(1 for s in self.sent if s.done_at and s.error is None)

    def _client(self, n: int) -> None:
        headers = {"Authorization": f"Bearer {DEMO_KEY}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=30) as http:
            stream = n % 2 == 0
            while True:
                now = time.monotonic()
                if now >= self.stop_sending_at:
                    return
                sent = Sent(stream=stream, sent_at=now)
                with self._lock:
                    self.sent.append(sent)
                chat(http, sent)
                stream = not stream


def probe_ready(url: str) -> Probe:
    """GET /ready on a connection of its own (a balancer's probe), timed by its outcome:
    `at` is when the answer (or the refusal) came."""
    try:
        response = httpx.get(url + "/ready", timeout=5)
    except httpx.ConnectError:
        return Probe(time.monotonic(), None, refused=True)
    except httpx.TransportError:  # accepted as the listener closed, then closed unanswered
        return Probe(time.monotonic(), None)
    return Probe(time.monotonic(), response.status_code, response.headers.get("connection"))


def test_sigterm_under_load_loses_nothing(logs: Path, workers: tuple[Process, Process]) -> None:
    gateway = start(logs, workers, drain_delay_s=DRAIN_DELAY_S, graceful_shutdown_s=30)
    headers = {"Authorization": f"Bearer {DEMO_KEY}"}
    late = httpx.Client(base_url=gateway.url, headers=headers, timeout=60)
    try:
        assert probe_ready(gateway.url).status == 200
        load = Load(gateway.url)
        load.start()
        # Load in full swing: every client has had answers, streams among them.
        poll_until(lambda: load.completed() >= 2 * CLIENTS, timeout_s=60)

        sigterm_at = time.monotonic()
        load.stop_sending_at = sigterm_at + SENDING_AFTER_S
        gateway.popen.send_signal(signal.SIGTERM)

        # 1. Out of rotation at once, and still serving: a long stream sent now.
        draining = poll_until(
            lambda: (p := probe_ready(gateway.url)).status == 503 and p, timeout_s=SENDING_AFTER_S
        )
        long_stream = Sent(stream=True, sent_at=time.monotonic())
        long_thread = threading.Thread(target=chat, args=(late, long_stream, LONG_TOKENS))
        long_thread.start()

        # 2. The listener closes only after the delay; the probes say Connection: close.
        probes: list[Probe] = []

        def listener_closed() -> bool:
            probes.append(probe_ready(gateway.url))
            return probes[-1].refused

        poll_until(listener_closed, timeout_s=DRAIN_DELAY_S + 30)
        closed_at = probes[-1].at
        assert closed_at - sigterm_at >= DRAIN_DELAY_S  # never before the delay ended
        answered = [p for p in probes if p.status is not None]
        assert {p.status for p in answered} == {503}, answered
        assert "close" in {p.connection for p in answered}

        # 3. The process lets what is in flight finish, and exits 0.
        try:
            returncode = gateway.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the gateway did not exit after its drain:\n{gateway.log()}")
        assert returncode == 0, gateway.log()
        load.join(timeout_s=30)
        long_thread.join(timeout=30)
    finally:
        late.close()
        gateway.stop()

    sent = [*load.sent, long_stream]
    failed = [s for s in sent if s.error is not None]
    assert not failed, f"{len(failed)} of {len(sent)} requests failed: {failed[:5]}"
    # The drain was exercised: the load's requests sent after /ready turned 503 were
    # answered, with Connection: close; the long stream outlived the listener.
    after_503 = [s for s in load.sent if s.sent_at > draining.at]
    assert after_503, "the load sent nothing while draining"
    assert any(s.connection == "close" for s in after_503)
    assert long_stream.sent_at < closed_at < long_stream.done_at
    log = gateway.log()
    assert "SIGTERM: draining" in log and "drain delay over" in log, log


def test_sigint_skips_the_drain_delay(logs: Path, workers: tuple[Process, Process]) -> None:
    """Ctrl-C at a terminal stops at once: the delay is for balancers, SIGTERM's senders."""
    gateway = start(logs, workers, drain_delay_s=300)
    try:
        gateway.popen.send_signal(signal.SIGINT)
        assert gateway.popen.wait(timeout=30) == 0, gateway.log()
    finally:
        gateway.stop()
    assert "SIGTERM: draining" not in gateway.log()


def test_a_second_sigterm_ends_the_delay(logs: Path, workers: tuple[Process, Process]) -> None:
    gateway = start(logs, workers, drain_delay_s=300)
    try:
        gateway.popen.send_signal(signal.SIGTERM)
        poll_until(lambda: probe_ready(gateway.url).status == 503, timeout_s=10)
        gateway.popen.send_signal(signal.SIGTERM)
        assert gateway.popen.wait(timeout=30) == 0, gateway.log()
    finally:
        gateway.stop()
