"""The response cache against real processes: gateways, a simulated vLLM worker, Redis."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from tests.servers import (
    Gateway,
    Process,
    RedisServer,
    backend,
    gateway_config,
    poll_until,
    start_gateway,
    start_redis,
    start_sim,
)

ALICE = "vg-alice-0123456789abcdef"
BOB = "vg-bob-0123456789abcdef"
CAROL = "vg-carol-0123456789abcdef"  # with limits
DAVE = "vg-dave-0123456789abcdef"  # with a higher rpm
ADMIN = "vg-admin-0123456789abcdefghijklmnop"
DETERMINISTIC: dict[str, Any] = {"temperature": 0, "max_tokens": 4}


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@pytest.fixture(scope="module")
def sim(logs: Path) -> Iterator[Process]:
    process = start_sim(logs)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def redis(logs: Path) -> Iterator[RedisServer]:
    server = start_redis(logs)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache-keys") / "keys.yaml"
    keys = [
        {"id": "key-alice", "name": "alice", "sha256": sha(ALICE)},
        {"id": "key-bob", "name": "bob", "sha256": sha(BOB)},
        {
            "id": "key-carol",
            "name": "carol",
            "sha256": sha(CAROL),
            "limits": {"rpm": 6, "tokens_per_day": 1_000_000},  # 1 request back per 10 s
        },
        {
            "id": "key-dave",
            "name": "dave",
            "sha256": sha(DAVE),
            "limits": {"rpm": 24, "tokens_per_day": 1_000_000},
        },
    ]
    path.write_text(yaml.safe_dump({"keys": keys}))
    return path


def config(sim: Process, keys_file: Path, **cache: Any) -> dict[str, Any]:
    route = {
        "name": "tiny-llama",
        "aliases": ["default"],
        "retries": {"max_retries": 0},
        "breaker": {"consecutive_failures": 1000},
        "backends": [backend("w1", sim.url)],
    }
    embed = {"name": "tiny-embed", "backends": [backend("w1-embed", sim.url)]}
    settings = gateway_config([route, embed])
    settings["keys"] = {"file": str(keys_file)}
    settings["admin"] = {"key_sha256": sha(ADMIN)}
    settings["cache"] = {"enabled": True, **cache}
    return settings


@pytest.fixture(scope="module")
def gateway(logs: Path, sim: Process, keys_file: Path) -> Iterator[Gateway]:
    process = start_gateway(logs, config(sim, keys_file))
    yield process
    process.stop()


def chat(
    gateway: Gateway, key: str = ALICE, headers: dict[str, str] | None = None, **body: Any
) -> httpx.Response:
    payload = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], **body}
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        json=payload,
        headers={"Authorization": f"Bearer {key}", **(headers or {})},
        timeout=10,
    )


def admin(gateway: Gateway, method: str, path: str) -> dict[str, Any]:
    response = httpx.request(
        method, gateway.url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def sim_requests(sim: Process) -> int:
    return int(httpx.get(sim.url + "/sim/stats", timeout=5).json()["requests"])


def content(response: httpx.Response) -> str:
    return str(response.json()["choices"][0]["message"]["content"])


def streamed_text(response: httpx.Response) -> str:
    events = [e[6:] for e in response.content.split(b"\n\n") if e.startswith(b"data: {")]
    chunks = [orjson.loads(e) for e in events]
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )


def test_hit_miss_and_bypass(gateway: Gateway, sim: Process) -> None:
    before, logged = sim_requests(sim), len(gateway.access_log())
    miss = chat(gateway, messages=[{"role": "user", "content": "one"}], **DETERMINISTIC)
    hit = chat(gateway, messages=[{"role": "user", "content": "one"}], **DETERMINISTIC)
    assert miss.status_code == hit.status_code == 200
    assert miss.headers["x-vgate-cache"] == "miss" and "age" not in miss.headers
    assert hit.headers["x-vgate-cache"] == "hit" and int(hit.headers["age"]) >= 0
    assert hit.headers["x-vgate-backend"] == "cache"
    assert hit.json() == miss.json()  # the original answer, usage included
    sampled = chat(gateway, messages=[{"role": "user", "content": "one"}], temperature=0.9)
    assert sampled.headers["x-vgate-cache"] == "bypass"
    assert sim_requests(sim) - before == 2
    lines = gateway.wait_for_log(logged + 3)  # the log is written in batches: wait for them
    assert [line.get("cache") for line in lines[-3:]] == ["miss", "hit", "bypass"]
    assert lines[-2]["prompt_tokens"] == lines[-3]["prompt_tokens"]


def test_streams_and_whole_answers_share_entries(gateway: Gateway, sim: Process) -> None:
    messages = [{"role": "user", "content": "two"}]
    before = sim_requests(sim)
    streamed = chat(gateway, messages=messages, stream=True, **DETERMINISTIC)
    assert streamed.headers["x-vgate-cache"] == "miss"
    whole = chat(gateway, messages=messages, **DETERMINISTIC)
    assert whole.headers["x-vgate-cache"] == "hit"
    assert content(whole) == streamed_text(streamed)
    again = chat(
        gateway,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        **DETERMINISTIC,
    )
    assert again.headers["x-vgate-cache"] == "hit"
    assert again.headers["content-type"].startswith("text/event-stream")
    assert streamed_text(again) == content(whole)
    assert again.content.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' in again.content
    assert sim_requests(sim) - before == 1


def test_keys_do_not_share_answers(gateway: Gateway) -> None:
    messages = [{"role": "user", "content": "three"}]
    assert chat(gateway, ALICE, messages=messages, **DETERMINISTIC).headers["x-vgate-cache"] == (
        "miss"
    )
    assert chat(gateway, BOB, messages=messages, **DETERMINISTIC).headers["x-vgate-cache"] == (
        "miss"
    )
    assert chat(gateway, BOB, messages=messages, **DETERMINISTIC).headers["x-vgate-cache"] == "hit"


def test_cache_control_from_the_client(gateway: Gateway) -> None:
    messages = [{"role": "user", "content": "four"}]
    chat(gateway, messages=messages, **DETERMINISTIC)
    refresh = chat(
        gateway, headers={"Cache-Control": "no-cache"}, messages=messages, **DETERMINISTIC
    )
    assert refresh.headers["x-vgate-cache"] == "miss"
    no_store = chat(
        gateway, headers={"Cache-Control": "no-store"}, messages=messages, **DETERMINISTIC
    )
    assert no_store.headers["x-vgate-cache"] == "bypass"


def test_failures_are_never_cached(gateway: Gateway, sim: Process) -> None:
    messages = [{"role": "user", "content": "five"}]
    faults = [{"error_status": 500}, {"cut_after_chunks": 2}, {"error_event_first": True}]
    try:
        for fault in faults:
            httpx.put(sim.url + "/sim/faults", json=fault, timeout=5).raise_for_status()
            for stream in (False, True):
                response = chat(gateway, messages=messages, stream=stream, **DETERMINISTIC)
                if response.status_code == 200:
                    assert stream  # a stream that started, then broke: an error event
                    assert not response.content.endswith(b"data: [DONE]\n\n")
    finally:
        httpx.delete(sim.url + "/sim/faults", timeout=5).raise_for_status()
    first = chat(gateway, messages=messages, **DETERMINISTIC)
    assert first.status_code == 200 and first.headers["x-vgate-cache"] == "miss"


def generated_tokens(gateway: Gateway) -> float:
    series = 'vgate_tokens_generated_total{model="tiny-llama"} '
    for line in httpx.get(gateway.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(series):
            return float(line[len(series) :])
    return 0.0


def test_a_hit_counts_as_a_request_but_charges_no_tokens(gateway: Gateway) -> None:
    def used() -> dict[str, Any]:
        return dict(admin(gateway, "GET", "/admin/keys/key-carol")["limits_usage"])

    messages = [{"role": "user", "content": "limits"}]
    before = used()
    miss = chat(gateway, CAROL, messages=messages, **DETERMINISTIC)
    total = miss.json()["usage"]["total_tokens"]
    after_miss = poll_until(lambda: (u := used())["tokens_today"] > before["tokens_today"] and u)
    assert after_miss["tokens_today"] - before["tokens_today"] == total
    generated = generated_tokens(gateway)
    for _ in range(2):
        hit = chat(gateway, CAROL, messages=messages, **DETERMINISTIC)
        assert hit.headers["x-vgate-cache"] == "hit"
        assert hit.json()["usage"]["total_tokens"] == total  # the original usage, reported
    # Settled after each response: once settled, the day's tokens are the miss's alone.
    after_hits = poll_until(
        lambda: (u := used())["tokens_today"] == after_miss["tokens_today"] and u, timeout_s=5
    )
    assert after_hits["requests_remaining"] < after_miss["requests_remaining"]  # counted
    # Upstreams' tokens: counted for the answer they gave, not again for the hits.
    assert generated > 0 and generated_tokens(gateway) == generated


def test_embeddings_are_cached_item_by_item(gateway: Gateway, sim: Process) -> None:
    def embed(inputs: list[str], headers: dict[str, str] | None = None) -> httpx.Response:
        response = httpx.post(
            gateway.url + "/v1/embeddings",
            json={"model": "tiny-embed", "input": inputs},
            headers={"Authorization": f"Bearer {ALICE}", **(headers or {})},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        return response

    def vectors(response: httpx.Response) -> list[list[float]]:
        data = response.json()["data"]
        assert [item["index"] for item in data] == list(range(len(data)))
        return [item["embedding"] for item in data]

    words = ["alpha beta", "gamma", "delta epsilon zeta"]
    reference = embed(words, {"Cache-Control": "no-store"})
    assert reference.headers["x-vgate-cache"] == "bypass"
    before = sim_requests(sim)
    assert embed(words[:2]).headers["x-vgate-cache"] == "miss"
    partial = embed([words[2], words[1], words[0]])
    assert partial.headers["x-vgate-cache"] == "miss"
    expected = vectors(reference)
    assert vectors(partial) == [expected[2], expected[1], expected[0]]
    for tokens in ("prompt_tokens", "total_tokens"):  # it adds up
        assert partial.json()["usage"][tokens] == reference.json()["usage"][tokens]
    hit = embed([words[0], words[2]])
    assert hit.headers["x-vgate-cache"] == "hit"
    assert vectors(hit) == [expected[0], expected[2]]
    assert sim_requests(sim) - before == 2  # the first two inputs, then the third alone


def test_admin_reports_and_clears_the_cache(gateway: Gateway) -> None:
    chat(gateway, messages=[{"role": "user", "content": "six"}], **DETERMINISTIC)
    described = admin(gateway, "GET", "/admin/cache")
    assert described["enabled"] is True and described["backend"] == "memory"
    assert described["entries"] >= 1 and described["bytes"] > 0
    assert 0 < described["hit_ratio"] < 1
    assert admin(gateway, "DELETE", "/admin/cache?scope=nobody")["deleted"] == 0
    assert admin(gateway, "DELETE", "/admin/cache?route=tiny-llama&scope=bob")["deleted"] == 1
    left = admin(gateway, "GET", "/admin/cache")["entries"]
    assert admin(gateway, "DELETE", "/admin/cache")["deleted"] == left
    assert admin(gateway, "GET", "/admin/cache")["entries"] == 0
    response = chat(gateway, messages=[{"role": "user", "content": "six"}], **DETERMINISTIC)
    assert response.headers["x-vgate-cache"] == "miss"
    metrics = httpx.get(gateway.url + "/metrics", timeout=5).text
    assert 'vgate_cache_hits_total{model="tiny-llama"}' in metrics
    assert 'vgate_cache_misses_total{model="tiny-llama"}' in metrics
    assert 'vgate_cache_bypasses_total{reason="not_deterministic"} 1.0' in metrics
    assert "vgate_cache_entries 1.0" in metrics
    lookups = [line for line in metrics.splitlines() if line.startswith("vgate_cache_lookup")]
    assert 'vgate_cache_lookup_seconds_bucket{le="+Inf"}' in "\n".join(lookups)
    count = next(line for line in lookups if line.startswith("vgate_cache_lookup_seconds_count"))
    assert float(count.split()[-1]) > 0


def test_identical_concurrent_requests_make_one_upstream_request(
    gateway: Gateway, sim: Process
) -> None:
    messages = [{"role": "user", "content": "eight"}]
    body = {"model": "tiny-llama", "messages": messages, **DETERMINISTIC}
    headers = {"Authorization": f"Bearer {ALICE}"}

    async def ask(client: httpx.AsyncClient, index: int) -> httpx.Response:
        payload = {**body, "stream": index % 2 == 1}  # streams and whole answers alike
        return await client.post(gateway.url + "/v1/chat/completions", json=payload)

    async def load() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(headers=headers, timeout=30, limits=limits) as client:
            return await asyncio.gather(*(ask(client, i) for i in range(100)))

    # The worker takes a second to answer, so the requests find the first still in flight.
    httpx.put(sim.url + "/sim/faults", json={"latency_ms": 1000}, timeout=5).raise_for_status()
    try:
        before = sim_requests(sim)
        responses = asyncio.run(load())
        after = sim_requests(sim)
    finally:
        httpx.delete(sim.url + "/sim/faults", timeout=5).raise_for_status()
    assert [r.status_code for r in responses] == [200] * 100
    assert after - before == 1
    caches = [r.headers["x-vgate-cache"] for r in responses]
    assert caches.count("miss") == 1
    assert set(caches) <= {"miss", "coalesced", "hit"} and "coalesced" in caches
    texts = {content(r) for r in responses[::2]} | {streamed_text(r) for r in responses[1::2]}
    assert len(texts) == 1
    assert all(r.content.endswith(b"data: [DONE]\n\n") for r in responses[1::2])


def test_identical_requests_to_four_processes_make_one_upstream_request(
    logs: Path, sim: Process, keys_file: Path, redis: RedisServer
) -> None:
    settings = config(sim, keys_file, backend="redis", scope="global")
    settings["redis"] = {"url": redis.url, "key_prefix": "e2e-flights", "socket_timeout_s": 1.0}
    with ThreadPoolExecutor(4) as pool:
        gateways = list(pool.map(lambda _: start_gateway(logs, settings), range(4)))
    messages = [{"role": "user", "content": "nine"}]
    body = {"model": "tiny-llama", "messages": messages, **DETERMINISTIC}

    async def ask(client: httpx.AsyncClient, index: int) -> httpx.Response:
        gateway = gateways[index % 4]
        payload = {**body, "stream": index % 3 == 1}
        key = (ALICE, BOB)[index % 2]  # a global route: keys share its answers
        headers = {"Authorization": f"Bearer {key}"}
        return await client.post(
            gateway.url + "/v1/chat/completions", json=payload, headers=headers
        )

    async def load() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            return await asyncio.gather(*(ask(client, i) for i in range(100)))

    try:
        httpx.put(sim.url + "/sim/faults", json={"latency_ms": 1000}, timeout=5).raise_for_status()
        try:
            before = sim_requests(sim)
            responses = asyncio.run(load())
            after = sim_requests(sim)
        finally:
            httpx.delete(sim.url + "/sim/faults", timeout=5).raise_for_status()
        assert [r.status_code for r in responses] == [200] * 100
        assert after - before == 1
        caches = [r.headers["x-vgate-cache"] for r in responses]
        assert caches.count("miss") == 1 and set(caches) <= {"miss", "coalesced", "hit"}
        whole = [content(r) for i, r in enumerate(responses) if i % 3 != 1]
        streamed = [streamed_text(r) for i, r in enumerate(responses) if i % 3 == 1]
        assert len(set(whole + streamed)) == 1
    finally:
        for gateway in gateways:
            gateway.stop()


def test_redis_shares_answers_and_its_loss_is_a_bypass(
    logs: Path, sim: Process, keys_file: Path, redis: RedisServer
) -> None:
    settings = config(sim, keys_file, backend="redis", probe_interval_s=0.2)
    settings["redis"] = {"url": redis.url, "key_prefix": "e2e-cache", "socket_timeout_s": 0.5}
    first, second = start_gateway(logs, settings), start_gateway(logs, settings)
    try:
        messages = [{"role": "user", "content": "seven"}]
        assert chat(first, messages=messages, **DETERMINISTIC).headers["x-vgate-cache"] == "miss"
        # The fill is written in the background: the other process sees it once it lands.
        poll_until(
            lambda: (
                chat(second, messages=messages, **DETERMINISTIC).headers["x-vgate-cache"] == "hit"
            ),
            timeout_s=10,
        )
        described = admin(second, "GET", "/admin/cache")
        assert described["backend"] == "redis" and described["entries"] == 1

        # Redis killed in the middle of load: every request still answered, bypassing.
        statuses: list[int] = []
        caches: list[str] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                response = chat(first, messages=messages, **DETERMINISTIC)
                statuses.append(response.status_code)
                caches.append(response.headers.get("x-vgate-cache", ""))

        worker = threading.Thread(target=load)
        worker.start()
        poll_until(lambda: len(statuses) >= 5, timeout_s=10)
        redis.kill()
        poll_until(lambda: caches.count("bypass") >= 5, timeout_s=10)
        stop.set()
        worker.join(10)
        assert set(statuses) == {200}
        assert set(caches) <= {"hit", "bypass"}
        assert "redis unreachable for cache" in first.log()

        # Back where the gateways expect it: the cache recovers by itself.
        revived = start_redis(logs, port=redis.port)
        try:
            chat(first, messages=messages, **DETERMINISTIC)  # a probe, then a miss refills
            poll_until(
                lambda: (
                    chat(first, messages=messages, **DETERMINISTIC).headers["x-vgate-cache"]
                    == "hit"
                ),
                timeout_s=10,
            )
            assert "redis reachable again for cache" in first.log()
        finally:
            revived.stop()
    finally:
        first.stop()
        second.stop()


class RedisProbe:
    """A connection of the test's own that counts its commands, so that what it adds to
    the server's read events is known."""

    def __init__(self, redis: RedisServer) -> None:
        self.conn = socket.create_connection(("127.0.0.1", redis.port), timeout=5)
        self.commands = 0

    def ask(self, *args: str) -> bytes:
        self.commands += 1
        self.conn.sendall(
            b"".join(
                [f"*{len(args)}\r\n".encode()] + [f"${len(a)}\r\n{a}\r\n".encode() for a in args]
            )
        )
        reply = self.conn.recv(65536)
        if reply.startswith(b"$"):  # a bulk string: read it whole
            size = int(reply[1 : reply.index(b"\r\n")])
            while len(reply) < reply.index(b"\r\n") + 2 + size + 2:
                reply += self.conn.recv(65536)
        return reply

    def reads(self) -> int:
        """The read events the server has processed (one per round trip of any client),
        less those of this probe's commands."""
        (line,) = [
            x
            for x in self.ask("INFO", "stats").split(b"\r\n")
            if x.startswith(b"total_reads_processed:")
        ]
        return int(line.split(b":")[1]) - self.commands


def test_a_limited_request_reads_the_cache_in_its_limit_checks_round_trip(
    logs: Path, sim: Process, keys_file: Path
) -> None:
    """With limits and the cache both on Redis, a cacheable request's lookup is sent with
    its limit check, in one write: a hit costs two round trips (check + lookup, then the
    settle), not three. A request its limits refuse drops the lookup, quietly."""
    settings = config(sim, keys_file, backend="redis", scope="global")
    redis = start_redis(logs)  # its own: the module's may have been killed by a test above
    settings["redis"] = {"url": redis.url, "key_prefix": "e2e-one-trip", "socket_timeout_s": 1.0}
    process = start_gateway(logs, settings)
    probe = RedisProbe(redis)
    try:
        messages = [{"role": "user", "content": "one trip"}]
        chat(process, key=DAVE, messages=messages, **DETERMINISTIC)  # the miss that fills
        poll_until(
            lambda: (
                chat(process, key=DAVE, messages=messages, **DETERMINISTIC).headers["x-vgate-cache"]
                == "hit"
            ),
            timeout_s=10,
        )
        in_flight = "e2e-one-trip:rl:{key-dave}:t"  # the key's tickets, until settled
        poll_until(lambda: probe.ask("ZCARD", in_flight) == b":0\r\n")
        # dave may send 24 a minute: the rest of this minute's are hits, then 429s.
        statuses: list[int] = []
        before = probe.reads()
        for _ in range(26):
            response = chat(process, key=DAVE, messages=messages, **DETERMINISTIC)
            statuses.append(response.status_code)
            if response.status_code == 200:
                assert response.headers["x-vgate-cache"] == "hit"
        hits, refused = statuses.count(200), statuses.count(429)
        assert hits >= 10 and refused >= 1 and hits + refused == 26
        poll_until(lambda: probe.ask("ZCARD", in_flight) == b":0\r\n")  # settled
        reads = probe.reads() - before
        # Per hit: the check with the lookup, then the settle; per refusal: the check with
        # the lookup (dropped): 2 * hits + refused. Without the shared write, one more per
        # hit. A few to spare for the gateway's own background calls (a silent breaker
        # subscription's PING).
        assert reads <= 2 * hits + refused + 3, (reads, statuses)
        assert "never retrieved" not in process.log()
    finally:
        probe.conn.close()
        process.stop()
        redis.stop()


def test_a_miss_costs_one_round_trip_on_the_requests_path(
    logs: Path, sim: Process, keys_file: Path
) -> None:
    """With the cache shared through Redis and coalescing on, a miss's lookup and the
    claim of its key's lease are one call (one script): one round trip on the request's
    path. The fill (the entry kept and the lease given back, also one script) goes after
    the answer, in the background. It was four: the GET, the SET NX of the lease, then the
    fill's SET and the lease's release."""
    settings = config(sim, keys_file, backend="redis", scope="global")
    redis = start_redis(logs)
    settings["redis"] = {"url": redis.url, "key_prefix": "e2e-miss", "socket_timeout_s": 1.0}
    process = start_gateway(logs, settings)
    probe = RedisProbe(redis)

    def settled() -> bool:  # every fill landed: no lease left
        return probe.ask("KEYS", "e2e-miss:cache:lease:*") == b"*0\r\n"

    try:
        # The first miss loads the scripts (NOSCRIPT, then SCRIPT LOAD): not counted.
        warm = chat(process, messages=[{"role": "user", "content": "warm"}], **DETERMINISTIC)
        assert warm.headers["x-vgate-cache"] == "miss"
        poll_until(settled)
        misses = 8
        before = probe.reads()
        for index in range(misses):
            messages = [{"role": "user", "content": f"miss {index}"}]
            response = chat(process, messages=messages, **DETERMINISTIC)
            assert response.status_code == 200 and response.headers["x-vgate-cache"] == "miss"
            poll_until(settled)  # one at a time: each miss's calls are its own
        reads = probe.reads() - before
        # Per miss: the lookup that claims, then the fill: 2 (it was 4). A few to spare
        # for the gateway's own background calls (a silent breaker subscription's PING).
        assert reads <= 2 * misses + 3, reads
        hit = chat(process, messages=[{"role": "user", "content": "miss 0"}], **DETERMINISTIC)
        assert hit.headers["x-vgate-cache"] == "hit"
        assert probe.ask("KEYS", "e2e-miss:cache:lease:*") == b"*0\r\n"  # a hit took none
    finally:
        probe.conn.close()
        process.stop()
        redis.stop()


class TimedStream:
    """A streaming request read in a thread, each event's arrival time noted."""

    def __init__(self, gateway: Gateway, messages: list[dict[str, str]], **body: Any) -> None:
        self.gateway = gateway
        self.payload = {
            "model": "tiny-llama",
            "messages": messages,
            "stream": True,
            **DETERMINISTIC,
            **body,
        }
        self.events: list[tuple[float, bytes]] = []
        self.headers: dict[str, str] = {}
        self.status = 0
        self.first_content = threading.Event()
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        url = self.gateway.url + "/v1/chat/completions"
        headers = {"Authorization": f"Bearer {ALICE}"}
        with httpx.stream("POST", url, json=self.payload, headers=headers, timeout=30) as r:
            self.status = r.status_code
            self.headers = dict(r.headers)
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.events.append((time.monotonic(), line[6:].encode()))
                    if b'"content"' in line.encode() and b'"content":""' not in line.encode():
                        self.first_content.set()
        self.first_content.set()  # ended: nobody waits for what will not come

    def join(self, timeout_s: float = 30.0) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the stream did not end"

    @property
    def text(self) -> str:
        chunks = [orjson.loads(e) for _, e in self.events if e.startswith(b"{")]
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
        )

    def first_content_at(self) -> float:
        return next(t for t, e in self.events if b'"content":"' in e and b'"content":""' not in e)


@pytest.fixture
def paced(logs: Path) -> Iterator[Process]:
    """A worker streaming 20 tokens a second: a 40-token answer takes two seconds."""
    process = start_sim(logs, tokens_per_s=20)
    yield process
    process.stop()


def two_gateways(
    logs: Path, sim: Process, keys_file: Path, redis: RedisServer, prefix: str, **route: Any
) -> list[Gateway]:
    settings = config(sim, keys_file, backend="redis", scope="global")
    settings["models"][0].update(route)
    settings["redis"] = {"url": redis.url, "key_prefix": prefix, "socket_timeout_s": 1.0}
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda _: start_gateway(logs, settings), range(2)))


def test_a_stream_reaches_a_follower_in_another_process_as_it_comes(
    logs: Path, paced: Process, keys_file: Path
) -> None:
    """Gateway A leads a paced stream; an identical request to gateway B, made once A's
    client has its first content, gets the events so far at once and the rest as they
    come (relayed through Redis): its first content arrives well before A's stream ends.
    One upstream request in all."""
    redis = start_redis(logs)
    leader_gateway, follower_gateway = two_gateways(logs, paced, keys_file, redis, "e2e-relay")
    try:
        messages = [{"role": "user", "content": "relayed"}]
        before = sim_requests(paced)
        leader = TimedStream(leader_gateway, messages, max_tokens=40)
        assert leader.first_content.wait(30)
        follower = TimedStream(follower_gateway, messages, max_tokens=40)
        leader.join()
        follower.join()
        assert leader.status == follower.status == 200
        assert leader.headers["x-vgate-cache"] == "miss"
        assert follower.headers["x-vgate-cache"] == "coalesced"
        leader_end = leader.events[-1][0]
        # A 2 s stream: the follower's first content comes with the events so far, more
        # than half a second before the leader's last (waiting for the whole answer, it
        # came after it).
        assert follower.first_content_at() < leader_end - 0.5, (
            follower.first_content_at() - leader_end
        )
        # ... and its events keep coming while the leader's do.
        assert sum(1 for t, _ in follower.events if t < leader_end - 0.2) >= 3
        assert follower.text == leader.text and len(leader.text) > 0
        assert follower.events[-1][1] == b"[DONE]"
        assert follower.headers["x-vgate-backend"] == "w1"  # the backend that answered
        assert sim_requests(paced) - before == 1
    finally:
        for gateway in (leader_gateway, follower_gateway):
            gateway.stop()
        redis.stop()


def test_a_leader_that_fails_never_leaves_a_follower_in_another_process_hanging(
    logs: Path, paced: Process, keys_file: Path
) -> None:
    """A: the leader's upstream fails before its first event: the follower in the other
    process makes its own call, once, and its client gets the whole answer. B: the
    leader's stream is cut mid-way (not resumed): the follower, part way through, ends
    with the same clean error event. Neither hangs."""
    redis = start_redis(logs)
    leader_gateway, follower_gateway = two_gateways(
        logs, paced, keys_file, redis, "e2e-relay-fail", resume={"enabled": False}
    )
    faults = paced.url + "/sim/faults"
    try:
        # A: every second request fails with a 500 after 1.5 s: the leader's (the
        # second), not the follower's own (the third).
        httpx.put(
            faults, json={"error_status": 500, "error_rate": 0.5, "latency_ms": 1500}, timeout=5
        ).raise_for_status()
        try:
            chat(leader_gateway, messages=[{"role": "user", "content": "first"}], max_tokens=2)
            before = sim_requests(paced)
            messages = [{"role": "user", "content": "fails first"}]
            leader = TimedStream(leader_gateway, messages, max_tokens=10)
            poll_until(lambda: sim_requests(paced) > before)  # the leader's call is made
            follower = TimedStream(follower_gateway, messages, max_tokens=10)
            leader.join()
            follower.join()
            made = sim_requests(paced) - before  # (setting the faults resets the count)
        finally:
            httpx.delete(faults, timeout=5).raise_for_status()
        assert leader.status >= 500
        assert follower.status == 200 and follower.events[-1][1] == b"[DONE]"
        assert len(follower.text) > 0
        assert made == 2  # the leader's, and the follower's own

        # B: cut after 8 events, every request.
        httpx.put(faults, json={"cut_after_chunks": 8}, timeout=5).raise_for_status()
        try:
            before = sim_requests(paced)
            messages = [{"role": "user", "content": "cut mid-way"}]
            leader = TimedStream(leader_gateway, messages, max_tokens=40)
            assert leader.first_content.wait(30)
            follower = TimedStream(follower_gateway, messages, max_tokens=40)
            leader.join()
            follower.join()
            made = sim_requests(paced) - before
        finally:
            httpx.delete(faults, timeout=5).raise_for_status()
        assert leader.status == follower.status == 200
        assert follower.headers["x-vgate-cache"] == "coalesced"
        for stream in (leader, follower):
            last = orjson.loads(stream.events[-1][1])
            assert last["error"]["code"] == "upstream_stream_broken", last
        assert orjson.loads(follower.events[-1][1]) == orjson.loads(leader.events[-1][1])
        assert made == 1
    finally:
        for gateway in (leader_gateway, follower_gateway):
            gateway.stop()
        redis.stop()
