"""Retries, fallbacks and circuit breaking, as the client sees them."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.servers import (
    DEMO_KEY,
    Gateway,
    Process,
    backend,
    free_port,
    gateway_config,
    poll_until,
    start_gateway,
    start_sim,
)

MESSAGES = [{"role": "user", "content": "hello"}]
FAST = {"connect_s": 1, "first_token_s": 2, "idle_s": 2, "total_s": 5}
NO_BREAKER = {"consecutive_failures": 1000, "min_requests": 1000}


@pytest.fixture(scope="module")
def failing() -> Iterator[dict[str, FakeUpstream]]:
    fakes = {
        "503": FakeUpstream("status", status=503, retry_after="30"),
        "500": FakeUpstream("status", status=500, retry_after=None),
        "429": FakeUpstream(
            "status",
            status=429,
            body=b'{"error": {"message": "busy", "type": "rate_limit", "code": 429}}',
        ),
    }
    yield fakes
    for fake in fakes.values():
        fake.stop()


def sdk(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=20)


def last_entry(gateway: Gateway, count_before: int) -> dict[str, object]:
    return gateway.wait_for_log(count_before + 1)[-1]


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in httpx.get(gateway.url + "/metrics").text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_failed_attempt_is_retried_on_the_other_backend(
    logs: Path, sims: tuple[Process, Process], failing: dict[str, FakeUpstream]
) -> None:
    gateway = start_gateway(
        logs,
        gateway_config(
            [
                {
                    "name": "tiny-llama",
                    "timeouts": FAST,
                    "breaker": NO_BREAKER,
                    "retries": {
                        "max_retries": 1,
                        "backoff_initial_s": 0.01,
                        "retry_after_max_s": 20,
                    },
                    # The failing backend first: weights 1:1 start with it.
                    "backends": [backend("bad", failing["503"].url), backend("good", sims[0].url)],
                }
            ]
        ),
    )
    try:
        before = len(gateway.access_log())
        seen = len(failing["503"].requests)
        for _ in range(4):
            response = sdk(gateway).chat.completions.with_raw_response.create(
                model="tiny-llama", messages=MESSAGES, max_tokens=2
            )
            assert response.headers["x-vgate-backend"] == "good"
        entries = gateway.wait_for_log(before + 4)[-4:]
        # Retried at once on the other backend (no 20 s wait), and the 503's Retry-After
        # kept the failing backend out of rotation for the requests after it.
        assert [e["attempts"] for e in entries] == [2, 1, 1, 1]
        assert entries[0]["latency_ms"] < 5000  # far below the 20 s a wait would take
        assert len(failing["503"].requests) - seen == 1
        assert metric(gateway, "vgate_retries_total", model="tiny-llama") == 1
    finally:
        gateway.stop()


def test_retries_stop_and_the_upstream_answer_reaches_the_client(
    logs: Path, failing: dict[str, FakeUpstream]
) -> None:
    gateway = start_gateway(
        logs,
        gateway_config(
            [
                {
                    "name": "tiny-llama",
                    "timeouts": FAST,
                    "breaker": NO_BREAKER,
                    "retries": {"max_retries": 2, "retry_after_max_s": 0.05},
                    "backends": [backend("busy", failing["429"].url)],
                }
            ]
        ),
    )
    try:
        before = len(failing["429"].requests)
        with pytest.raises(openai.RateLimitError) as caught:
            sdk(gateway).chat.completions.create(model="tiny-llama", messages=MESSAGES)
        assert caught.value.response.headers["retry-after"] == "7"
        assert len(failing["429"].requests) - before == 3  # every attempt, none more
    finally:
        gateway.stop()


def test_fallback_model_answers_when_the_primary_cannot(
    logs: Path, sims: tuple[Process, Process]
) -> None:
    gateway = start_gateway(
        logs,
        gateway_config(
            [
                {
                    "name": "primary",
                    "timeouts": FAST,
                    "fallbacks": ["tiny-llama"],
                    "backends": [backend("gone", f"http://127.0.0.1:{free_port()}")],
                },
                {"name": "tiny-llama", "backends": [backend("w1", sims[0].url)]},
            ]
        ),
    )
    try:
        for stream in (False, True):
            before = len(gateway.access_log())
            response = sdk(gateway).chat.completions.with_raw_response.create(
                model="primary", messages=MESSAGES, max_tokens=3, stream=stream
            )
            assert response.headers["x-vgate-model"] == "tiny-llama"
            if stream:
                assert "".join(
                    c.choices[0].delta.content or "" for c in response.parse() if c.choices
                )
            else:
                assert response.parse().usage.completion_tokens == 3
            entry = last_entry(gateway, before)
            assert entry["model"] == "tiny-llama" and entry["fallback_from"] == "primary"
        assert (
            metric(gateway, "vgate_fallbacks_total", from_model="primary", to_model="tiny-llama")
            == 2
        )
    finally:
        gateway.stop()


def test_prompt_too_long_goes_only_to_a_larger_context(logs: Path) -> None:
    small = start_sim(logs, models=("small",), max_model_len=64)
    large = start_sim(logs, models=("large",), max_model_len=4096)
    gateway = start_gateway(
        logs,
        gateway_config(
            [
                {
                    "name": "small",
                    "context_window": 64,
                    "fallbacks": ["tiny", "large"],
                    "backends": [backend("s1", small.url)],
                },
                {
                    "name": "tiny",
                    "context_window": 32,
                    "backends": [backend("t1", small.url, model="small")],
                },
                {"name": "large", "context_window": 4096, "backends": [backend("l1", large.url)]},
                {"name": "alone", "backends": [backend("s2", small.url, model="small")]},
            ]
        ),
    )
    try:
        long_prompt = [{"role": "user", "content": "word " * 200}]
        before = len(gateway.access_log())
        reply = sdk(gateway).chat.completions.with_raw_response.create(
            model="small", messages=long_prompt, max_tokens=4
        )
        assert reply.headers["x-vgate-model"] == "large"
        entry = last_entry(gateway, before)
        assert entry["attempts"] == 2 and entry["fallback_from"] == "small"  # "tiny" was skipped
        # With no larger fallback the upstream's 400 reaches the client, sent once only.
        before = len(gateway.access_log())
        with pytest.raises(openai.BadRequestError):
            sdk(gateway).chat.completions.create(model="alone", messages=long_prompt, max_tokens=4)
        assert last_entry(gateway, before)["attempts"] == 1
    finally:
        gateway.stop()
        small.stop()
        large.stop()


def test_breaker_opens_and_traffic_goes_around_the_failing_backend(
    logs: Path, sims: tuple[Process, Process], failing: dict[str, FakeUpstream]
) -> None:
    gateway = start_gateway(
        logs,
        gateway_config(
            [
                {
                    "name": "tiny-llama",
                    "timeouts": FAST,
                    "retries": {"max_retries": 1, "backoff_initial_s": 0.001},
                    "breaker": {"consecutive_failures": 2, "open_s": 30},
                    "backends": [backend("bad", failing["500"].url), backend("good", sims[0].url)],
                }
            ]
        ),
    )
    try:
        fake = failing["500"]
        for _ in range(10):
            sdk(gateway).chat.completions.create(
                model="tiny-llama", messages=MESSAGES, max_tokens=1
            )
        hits = len([r for r in fake.requests if r["path"] == "/v1/chat/completions"])
        before = hits
        assert metric(gateway, "vgate_breaker_open", backend="bad") == 1
        for _ in range(10):
            sdk(gateway).chat.completions.create(
                model="tiny-llama", messages=MESSAGES, max_tokens=1
            )
        after = len([r for r in fake.requests if r["path"] == "/v1/chat/completions"])
        assert after == before  # open: not one more request reached it
        assert metric(gateway, "vgate_breaker_transitions_total", backend="bad", state="open") == 1
    finally:
        gateway.stop()


def test_an_outage_under_load_loses_no_request(logs: Path) -> None:
    # Tokens come at 50/s, so streams are mid-answer on w1 when it dies.
    first = start_sim(logs, ttft_ms=50, tokens_per_s=50)
    second = start_sim(logs, ttft_ms=50, tokens_per_s=50)
    gateway = start_gateway(
        logs,
        gateway_config(
            [
                {
                    "name": "tiny-llama",
                    "timeouts": {"connect_s": 1, "first_token_s": 10, "idle_s": 10, "total_s": 30},
                    "retries": {"max_retries": 2, "backoff_initial_s": 0.01, "budget_ratio": 1.0},
                    "backends": [backend("w1", first.url), backend("w2", second.url)],
                }
            ]
        ),
    )
    try:

        async def load() -> Counter[str]:
            client = openai.AsyncOpenAI(
                base_url=gateway.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=30
            )

            async def one(index: int) -> str:
                stream = index % 2 == 0
                response = await client.chat.completions.with_raw_response.create(
                    model="tiny-llama",
                    messages=MESSAGES,
                    max_tokens=8 if stream else 2,
                    stream=stream,
                )
                backend = response.headers["x-vgate-backend"]
                if stream:
                    # Streams already committed to w1 when it died are resumed on w2.
                    chunks = []
                    async for chunk in response.parse():
                        chunks.append(chunk)
                        if index >= 60 and backend == "w1" and not killed:
                            # Mid-load, and mid-answer for this stream and others on w1.
                            first.popen.send_signal(signal.SIGKILL)
                            killed.append(index)
                    assert chunks[-1].choices[0].finish_reason == "length"
                    assert (
                        len("".join(c.choices[0].delta.content or "" for c in chunks).split()) == 8
                    )
                else:
                    assert response.parse().usage.completion_tokens == 2
                return backend

            async def paced(index: int) -> str:
                await asyncio.sleep(index * 0.005)
                return await one(index)

            results = await asyncio.gather(*(paced(i) for i in range(200)))
            await client.close()
            return Counter(results)

        killed: list[int] = []
        outcomes = asyncio.run(load())
        assert killed, "w1 was never killed"
        assert sum(outcomes.values()) == 200  # every request answered whole, none lost
        assert outcomes["w2"] > outcomes["w1"] > 0
        entries = poll_until(lambda: len(gateway.access_log()) >= 200 and gateway.access_log())
        assert {e["status"] for e in entries} == {200}
        assert not any(e["error"] for e in entries)
        assert any(e["attempts"] > 1 for e in entries)
        assert any(e["resumptions"] for e in entries)
    finally:
        gateway.stop()
        first.stop()
        second.stop()


def test_overload_is_shed_fast_with_retry_after(logs: Path) -> None:
    # Served requests take 3 s, so one that waited and was then served would take 6 s;
    # the queue gives up after 1 s, so the four arrivals (50 ms apart) fit in its window
    # even on a slow machine.
    slow = start_sim(logs, ttft_ms=3000)
    gateway = start_gateway(
        logs,
        gateway_config(
            [
                {"name": "tiny-llama", "backends": [backend("w1", slow.url)]},
                {
                    "name": "narrow",
                    "backends": [backend("n1", slow.url, model="tiny-llama", max_in_flight=1)],
                },
            ],
            max_in_flight=2,
            queue_max_waiting=1,
            queue_timeout_s=1.0,
        ),
    )
    try:

        async def burst(model: str, count: int) -> list[httpx.Response]:
            async with httpx.AsyncClient(
                base_url=gateway.url, timeout=10, headers={"Authorization": f"Bearer {DEMO_KEY}"}
            ) as http:
                body = {"model": model, "messages": MESSAGES, "max_tokens": 1}

                async def one(index: int) -> httpx.Response:
                    await asyncio.sleep(index * 0.05)  # arrive in order
                    return await http.post("/v1/chat/completions", json=body)

                return await asyncio.gather(*(one(i) for i in range(count)))

        # Two in flight, one waits and times out, one finds the queue full.
        responses = asyncio.run(burst("tiny-llama", 4))
        statuses = [r.status_code for r in responses]
        assert statuses.count(200) == 2 and statuses.count(503) == 2
        shed = [r for r in responses if r.status_code == 503]
        assert {r.json()["error"]["code"] for r in shed} == {"overloaded"}
        assert all(r.headers["retry-after"] == "1" for r in shed)
        assert all(r.elapsed.total_seconds() < 2.5 for r in shed)  # shed, not served late
        assert metric(gateway, "vgate_shed_total", reason="queue_full") == 1
        assert metric(gateway, "vgate_shed_total", reason="queue_timeout") == 1
        # A backend at its own in-flight limit takes no more: the other request is refused
        # (whichever of the two got there second: a stalled client may send them together).
        narrow = asyncio.run(burst("narrow", 2))
        assert sorted(r.status_code for r in narrow) == [200, 503]
        refused = next(r for r in narrow if r.status_code == 503)
        assert refused.json()["error"]["code"] == "no_live_backend"
    finally:
        gateway.stop()
        slow.stop()


def test_health_checks_eject_and_readmit_a_backend(logs: Path) -> None:
    first = start_sim(logs)
    second = start_sim(logs)
    gateway = start_gateway(
        logs,
        gateway_config(
            [
                {
                    "name": "tiny-llama",
                    "health": {
                        "interval_s": 0.1,
                        "timeout_s": 2.0,  # a loaded machine's slow probe is no failure
                        "unhealthy_after": 2,
                        "healthy_after": 2,
                    },
                    "backends": [backend("w1", first.url), backend("w2", second.url)],
                }
            ]
        ),
    )
    try:

        def live() -> list[str]:
            return httpx.get(gateway.url + "/ready").json()["models"]["tiny-llama"]["live"]

        assert live() == ["w1", "w2"]
        httpx.put(first.url + "/sim/faults", json={"health_status": 503}).raise_for_status()
        poll_until(lambda: live() == ["w2"])
        assert metric(gateway, "vgate_backend_healthy", backend="w1") == 0
        client = sdk(gateway)
        served = {
            client.chat.completions.with_raw_response.create(
                model="tiny-llama", messages=MESSAGES, max_tokens=1
            ).headers["x-vgate-backend"]
            for _ in range(6)
        }
        assert served == {"w2"}  # out of rotation while unhealthy
        httpx.delete(first.url + "/sim/faults").raise_for_status()
        poll_until(lambda: live() == ["w1", "w2"])
        assert metric(gateway, "vgate_backend_healthy", backend="w1") == 1
    finally:
        gateway.stop()
        first.stop()
        second.stop()


def test_an_error_as_the_first_stream_event_is_retried_elsewhere(logs: Path) -> None:
    broken = start_sim(logs, fault_error_event_first=True)
    healthy = start_sim(logs)
    gateway = start_gateway(
        logs,
        gateway_config(
            [
                {
                    "name": "tiny-llama",
                    "retries": {"max_retries": 1, "backoff_initial_s": 0.001},
                    "backends": [backend("broken", broken.url), backend("healthy", healthy.url)],
                }
            ]
        ),
    )
    try:
        before = len(gateway.access_log())
        for _ in range(2):
            chunks = list(
                sdk(gateway).chat.completions.create(
                    model="tiny-llama", messages=MESSAGES, max_tokens=3, stream=True
                )
            )
            assert chunks[-1].choices[0].finish_reason == "length"
        entries = gateway.wait_for_log(before + 2)[-2:]
        assert {e["backend"] for e in entries} == {"healthy"}
        assert sorted(e["attempts"] for e in entries) == [1, 2]
    finally:
        gateway.stop()
        broken.stop()
        healthy.stop()


@pytest.mark.parametrize(("strategy", "slow_share"), [("least_inflight", 3), ("weighted", 10)])
def test_load_aware_selection_steers_around_a_slow_worker(
    logs: Path, strategy: str, slow_share: int
) -> None:
    # The slow worker stays busy through the whole burst (20 requests 50 ms apart); the
    # spacing lets each fast answer finish before the next request, even on a slow machine.
    slow = start_sim(logs, ttft_ms=1500)
    fast = start_sim(logs)
    gateway = start_gateway(
        logs,
        gateway_config(
            [
                {
                    "name": "tiny-llama",
                    "strategy": strategy,
                    "backends": [backend("slow", slow.url), backend("fast", fast.url)],
                }
            ]
        ),
    )
    try:

        async def burst() -> Counter[str]:
            client = openai.AsyncOpenAI(
                base_url=gateway.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=10
            )

            async def one(index: int) -> str:
                await asyncio.sleep(index * 0.05)
                response = await client.chat.completions.with_raw_response.create(
                    model="tiny-llama", messages=MESSAGES, max_tokens=1
                )
                return response.headers["x-vgate-backend"]

            # Open the client's connections first, so that the burst arrives as staggered.
            await asyncio.gather(*(client.models.list() for _ in range(20)))
            served = Counter(await asyncio.gather(*(one(i) for i in range(20))))
            await client.close()
            return served

        served = asyncio.run(burst())
        if strategy == "weighted":
            assert served["slow"] == slow_share  # blind to load: half of them wait 1.5 s
        else:
            assert served["slow"] <= slow_share  # busy with one, it is passed over
    finally:
        gateway.stop()
        slow.stop()
        fast.stop()


def test_route_explain_replays_a_logged_incident(logs: Path) -> None:
    broken = start_sim(logs)
    healthy = start_sim(logs)
    gateway = start_gateway(
        logs,
        gateway_config(
            [
                {
                    "name": "tiny-llama",
                    "strategy": "p2c_latency",
                    "seed": 42,
                    "timeouts": FAST,
                    "breaker": NO_BREAKER,
                    "retries": {"max_retries": 2, "backoff_initial_s": 0.01, "budget_ratio": 1.0},
                    "backends": [backend("w1", broken.url), backend("w2", healthy.url)],
                }
            ]
        ),
    )
    try:
        httpx.put(broken.url + "/sim/faults", json={"error_status": 500}).raise_for_status()
        client = sdk(gateway)
        ids = []
        for _ in range(12):
            response = client.chat.completions.with_raw_response.create(
                model="tiny-llama", messages=MESSAGES, max_tokens=2
            )
            ids.append(response.headers["x-request-id"])
        entries = gateway.wait_for_log(12)
        retried = next(e for e in entries if e["attempts"] == 2)
        assert [d["choice"] for d in retried["decisions"]] == ["w1", "w2"]
        assert retried["decisions"][1]["reason"] == "p2c_latency, avoiding backends tried"
        config_file = logs / f"gateway-{gateway.url.rsplit(':', 1)[1]}.yaml"
        for entry in (entries[0], retried):  # each run is a process: keep it to two
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gateway.cli.main",
                    "route",
                    "explain",
                    "--config",
                    str(config_file),
                    "--request-id",
                    entry["request_id"],
                    str(gateway.access_log_path),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 0, result.stdout + result.stderr
            assert result.stdout.count("-> same") == entry["attempts"]
    finally:
        gateway.stop()
        broken.stop()
        healthy.stop()
