"""Which backend a request goes to: affinity, vLLM's own load as a signal, adaptive limits.

Real processes throughout: `vgate sim` workers and a `vgate serve` gateway in front of them.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from policies.affinity import AffinityRing
from policies.selection import LeastInFlight
from tests.servers import (
    DEMO_KEY,
    Gateway,
    Process,
    backend,
    gateway_config,
    poll_until,
    sim_gauge,
    start_gateway,
    start_sim,
)

MESSAGES = [{"role": "user", "content": "hello"}]
AUTH = {"Authorization": f"Bearer {DEMO_KEY}"}
RUNNING = "vllm:num_requests_running"


def sdk(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=20)


def served_by(
    gateway: Gateway,
    *,
    model: str = "tiny-llama",
    stream: bool = False,
    headers: dict[str, str] | None = None,
    **params: Any,
) -> str:
    """One request through the gateway; the backend that answered it (X-VGate-Backend)."""
    response = sdk(gateway).chat.completions.with_raw_response.create(
        model=model,
        messages=MESSAGES,
        max_tokens=1,
        stream=stream,
        extra_headers=headers,
        **params,
    )
    if stream:
        assert [chunk for chunk in response.parse()]  # read to the end
    return str(response.headers["x-vgate-backend"])


def metric(gateway: Gateway, name: str, **labels: str) -> float | None:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in httpx.get(gateway.url + "/metrics").text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    return None


def home_of(names: list[str], key: str, epsilon: float = 0.25) -> str:
    """Where the ring puts `key` while nothing is in flight: what every gateway process
    with the same backends computes, with no state shared between them."""

    class Idle:
        load = 0
        latency_ewma_s = 0.0
        weight = 1

    ring = AffinityRing(names, [1] * len(names), fallback=LeastInFlight(), epsilon=epsilon)
    index = ring.pick([Idle() for _ in names], [True] * len(names), key)
    assert index is not None
    return names[index]


async def burst(
    gateway: Gateway, count: int, *, model: str = "tiny-llama", **params: Any
) -> list[httpx.Response]:
    """`count` requests at once; their responses, in order of sending."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers=AUTH) as http:
        body = {"model": model, "messages": MESSAGES, "max_tokens": 1, **params}
        return await asyncio.gather(
            *(http.post("/v1/chat/completions", json=body) for _ in range(count))
        )


# --------------------------------------------------------------------------------------------
# Affinity


@pytest.fixture(scope="module")
def affinity_gateway(logs: Path, sims: tuple[Process, Process]) -> Iterator[Gateway]:
    first, second = sims
    config = gateway_config(
        [
            {
                "name": "by-user",
                "strategy": "affinity",  # key: user, OpenAI's `user` field (the default)
                "backends": [
                    backend("u1", first.url, model="tiny-llama"),
                    backend("u2", second.url, model="tiny-llama"),
                ],
            },
            {
                "name": "by-session",
                "strategy": "affinity",
                "affinity": {"key": "header:X-Session-Id", "epsilon": 0.25},
                "backends": [
                    backend("s1", first.url, model="tiny-llama"),
                    backend("s2", second.url, model="tiny-llama"),
                ],
            },
        ]
    )
    process = start_gateway(logs, config)
    yield process
    process.stop()


def test_affinity_keeps_each_user_on_one_backend_and_spreads_users(
    affinity_gateway: Gateway,
) -> None:
    homes: dict[str, str] = {}
    for number in range(16):
        user = f"user-{number}"
        seen = {
            served_by(affinity_gateway, model="by-user", user=user, stream=stream)
            for stream in (False, True, False)
        }
        assert len(seen) == 1, f"{user} went to {seen}"
        homes[user] = seen.pop()
        # The ring's own answer: every gateway replica computes the same one.
        assert homes[user] == home_of(["u1", "u2"], user)
    assert set(homes.values()) == {"u1", "u2"}  # different users spread over the backends
    # Asking again later changes nothing: nothing but the ring decides, and it is fixed.
    assert all(served_by(affinity_gateway, model="by-user", user=u) == homes[u] for u in homes)


def test_affinity_on_a_session_header_ignores_the_user(affinity_gateway: Gateway) -> None:
    homes: dict[str, str] = {}
    for number in range(16):
        session = f"conversation-{number}"
        seen = {
            served_by(
                affinity_gateway,
                model="by-session",
                headers={"X-Session-Id": session},
                user=f"user-{attempt}",  # a different user each time: not the key here
                stream=attempt == 1,
            )
            for attempt in range(3)
        }
        assert len(seen) == 1, f"{session} went to {seen}"
        homes[session] = seen.pop()
        assert homes[session] == home_of(["s1", "s2"], session)
    assert set(homes.values()) == {"s1", "s2"}
    # Without the header there is no key: least loaded, and ties rotate over both backends.
    # (Polled: a load scrape that caught one of the requests above still running at its
    # worker counts it as that worker's load until a later scrape says otherwise.)
    poll_until(
        lambda: (
            {served_by(affinity_gateway, model="by-session", user="user-0") for _ in range(4)}
            == {"s1", "s2"}
        )
    )


def test_a_hot_key_spills_over_rather_than_piling_onto_one_backend(logs: Path) -> None:
    # Each request takes a second, so all twelve are in flight together.
    first = start_sim(logs, ttft_ms=1000)
    second = start_sim(logs, ttft_ms=1000)
    gateway = start_gateway(
        logs,
        gateway_config(
            [
                {
                    "name": "tiny-llama",
                    "strategy": "affinity",
                    "affinity": {"key": "user", "epsilon": 0.25},
                    "backends": [backend("h1", first.url), backend("h2", second.url)],
                }
            ]
        ),
    )
    try:
        home = home_of(["h1", "h2"], "hot-user")
        other = "h2" if home == "h1" else "h1"
        responses = asyncio.run(burst(gateway, 12, user="hot-user"))
        assert [r.status_code for r in responses] == [200] * 12
        served = Counter(r.headers["x-vgate-backend"] for r in responses)
        # Bounded load: the home backend takes at most (1 + epsilon) times its fair share,
        # ceil(1.25 * 12 / 2) = 8, and the next backend on the ring the rest. Without the
        # bound all twelve would have queued on one worker.
        assert served[home] <= 8 and served[other] >= 4
        assert served[home] > served[other]  # the key still prefers its home
        # Once the load is gone, the key is back at home.
        assert served_by(gateway, user="hot-user") == home
    finally:
        gateway.stop()
        first.stop()
        second.stop()


# --------------------------------------------------------------------------------------------
# vLLM's own load as a signal


def test_load_others_put_on_a_worker_steers_the_gateway_to_the_other_one(logs: Path) -> None:
    # 20 tokens/s: a direct stream of 1500 tokens holds its slot for over a minute, while the
    # gateway's one-token requests are answered at once.
    busy = start_sim(logs, tokens_per_s=20)
    idle = start_sim(logs, tokens_per_s=20)
    route = {"name": "tiny-llama", "strategy": "least_inflight"}
    # A report is kept for 3 intervals (1.5 s) of failed scrapes: a loaded machine's slow
    # scrape does not make worker a look idle.
    scrape = {"interval_s": 0.5, "timeout_s": 0.5}
    seeing = start_gateway(
        logs,
        {
            **gateway_config(
                [{**route, "backends": [backend("a", busy.url), backend("b", idle.url)]}]
            ),
            "load_scrape": scrape,
        },
    )
    # The same route, but a's /metrics are not read: only its own requests count.
    blind = start_gateway(
        logs,
        {
            **gateway_config(
                [
                    {
                        **route,
                        "backends": [
                            backend("a", busy.url, scrape_metrics=False),
                            backend("b", idle.url),
                        ],
                    }
                ]
            ),
            "load_scrape": scrape,
        },
    )
    try:
        # Idle pool: least in flight, ties rotating, uses both.
        assert {served_by(seeing) for _ in range(4)} == {"a", "b"}

        with ExitStack() as held, httpx.Client(base_url=busy.url, timeout=30) as direct:
            # Another client, not this gateway, keeps worker a busy with four long streams.
            for _ in range(4):
                held.enter_context(
                    direct.stream(
                        "POST",
                        "/v1/chat/completions",
                        json={
                            "model": "tiny-llama",
                            "messages": MESSAGES,
                            "max_tokens": 1500,
                            "stream": True,
                        },
                    )
                )
            poll_until(lambda: sim_gauge(busy.url, RUNNING) == 4)

            # Without the signal the gateway would alternate a, b, a...; four b in a row
            # means a scrape saw a's load (polled: the scrape runs every 0.5 s).
            poll_until(lambda: all(served_by(seeing) == "b" for _ in range(4)))
            served = Counter(served_by(seeing, stream=n % 2 == 0) for n in range(20))
            assert served == {"b": 20}  # every request to b while a is busy
            # Three at once: b takes them all, for each counts at once (load = in flight
            # + the extra others put on a worker) and b's three stay below a's four.
            assert Counter(r.headers["x-vgate-backend"] for r in asyncio.run(burst(seeing, 3))) == {
                "b": 3
            }
            # A gateway that does not read a's metrics sees nothing of that load: it
            # goes on alternating (ties rotate) and sends a its share.
            assert Counter(served_by(blind) for _ in range(6))["a"] >= 2

        # The direct client went away: its requests are aborted and a is idle again.
        poll_until(lambda: sim_gauge(busy.url, RUNNING) == 0)
        poll_until(lambda: served_by(seeing) == "a")
    finally:
        seeing.stop()
        blind.stop()
        busy.stop()
        idle.stop()


# --------------------------------------------------------------------------------------------
# Adaptive concurrency


def test_adaptive_limit_falls_when_latency_jumps_and_sheds_the_excess(logs: Path) -> None:
    worker = start_sim(logs, ttft_ms=100)
    adaptive = {"enabled": True, "min_limit": 1, "initial_limit": 8}
    gateway = start_gateway(
        logs,
        gateway_config(
            [
                {
                    "name": "tiny-llama",
                    "backends": [
                        backend("a", worker.url, max_in_flight=8, adaptive_concurrency=adaptive)
                    ],
                },
                {
                    "name": "static",
                    "backends": [backend("s", worker.url, model="tiny-llama", max_in_flight=3)],
                },
            ]
        ),
    )

    def limit() -> int:
        value = metric(gateway, "vgate_backend_concurrency_limit", backend="a")
        assert value is not None
        return int(value)

    def statuses(count: int) -> Counter[int]:
        return Counter(r.status_code for r in asyncio.run(burst(gateway, count)))

    try:
        # The gauge shows the limit in force: the static one where nothing adapts.
        assert metric(gateway, "vgate_backend_concurrency_limit", backend="s") == 3
        assert limit() == 8
        for _ in range(10):  # a steady latency: the baseline
            assert served_by(gateway) == "a"
        assert limit() == 8
        assert statuses(8) == {200: 8}  # eight at once fit

        # The worker slows down sixteenfold: congestion, as the limit reads it. (Far slower
        # than the 100 ms of before: a request queued for a slot would wait 1.6 s or more.)
        httpx.put(worker.url + "/sim/faults", json={"latency_ms": 1500}).raise_for_status()

        def shrunk() -> int | None:
            current = limit()
            if current <= 5:
                return current
            assert statuses(current) == {200: current}  # up to the limit, all are served
            return None

        lowered = poll_until(shrunk, timeout_s=30, interval_s=0)
        assert 1 <= lowered <= 5
        # Eight at once now: as many as the limit are served, the rest shed at once with
        # 503 no_live_backend (this route has no other backend to take them).
        responses = asyncio.run(burst(gateway, 8))
        shed = [r for r in responses if r.status_code == 503]
        assert Counter(r.status_code for r in responses) == {200: lowered, 503: 8 - lowered}
        assert {r.json()["error"]["code"] for r in shed} == {"no_live_backend"}
        assert all("retry-after" in r.headers for r in shed)
        assert all(r.elapsed.total_seconds() < 1.0 for r in shed)  # refused, not queued

        # Latency back to normal: the limit grows back while requests keep it busy.
        httpx.delete(worker.url + "/sim/faults").raise_for_status()

        def recovered() -> bool:
            current = limit()
            if current == 8:
                return True
            assert statuses(current) == {200: current}
            return False

        poll_until(recovered, timeout_s=30, interval_s=0)
        assert statuses(8) == {200: 8}
    finally:
        gateway.stop()
        worker.stop()
