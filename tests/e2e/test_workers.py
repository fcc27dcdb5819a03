"""`server.workers: 2`: two gateway processes on one port, as a real `vgate serve`, in front of
real sims (and a real redis-server for the shared limits)."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.edge.auth import hash_key
from tests.servers import (
    DEMO_KEY,
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
from tests.upstack import descendants, processes

MESSAGES = [{"role": "user", "content": "hello"}]
RPM_KEY = "vg-workers-rpm-0123456789abcdefghij"
RPM = 5


@pytest.fixture(scope="module")
def sims(logs: Path) -> Iterator[tuple[Process, Process]]:
    fast = start_sim(logs, models=("tiny-llama",))
    slow = start_sim(logs, models=("tiny-llama",), ttft_ms=1500)  # answers in about 1.5 s
    yield fast, slow
    fast.stop()
    slow.stop()


def two_workers(sims: tuple[Process, Process], **top: Any) -> dict[str, Any]:
    fast, slow = sims
    routes = [
        {"name": "tiny-llama", "backends": [backend("fast", fast.url)]},
        {"name": "slow", "backends": [backend("slow", slow.url, model="tiny-llama")]},
    ]
    config = gateway_config(routes, workers=2, config_reload_interval_s=0)
    return {**config, **top}


def chat(gateway: Gateway, model: str = "tiny-llama", key: str = DEMO_KEY) -> httpx.Response:
    """One request on a connection of its own (so the kernel picks a worker for each)."""
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": model, "messages": MESSAGES, "max_tokens": 2},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def scrape(gateway: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The merged /metrics, every sample by name and labels."""
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(value for (sample, _labels), value in samples.items() if sample == name)


def per_worker(gateway: Gateway) -> dict[str, float]:
    samples = scrape(gateway)
    return {
        dict(labels)["worker"]: value
        for (name, labels), value in samples.items()
        if name == "vgate_worker_requests_total"
    }


def worker_pids(gateway: Gateway) -> set[int]:
    """The parent's live children (zombies left out)."""
    table = processes()
    return {
        pid
        for pid in descendants(gateway.popen.pid)
        if pid in table and table[pid][0] == gateway.popen.pid and table[pid][2] != "Z"
    }


@pytest.fixture
def started(logs: Path) -> Iterator[list[Gateway]]:
    gateways: list[Gateway] = []
    yield gateways
    for gateway in gateways:
        gateway.stop()


def test_both_processes_serve_and_metrics_count_the_whole(
    logs: Path, sims: tuple[Process, Process], started: list[Gateway]
) -> None:
    gateway = start_gateway(logs, two_workers(sims))
    started.append(gateway)
    assert len(poll_until(lambda: len(worker_pids(gateway)) == 2 and worker_pids(gateway))) == 2
    assert "server.workers is 2 but there is no redis" in gateway.log()
    # Until each worker has answered some (the kernel picks; bounded), then exactly K in all.
    sent = 0
    while sent < 10 or min(per_worker(gateway).values(), default=0) == 0:
        assert sent < 400, f"one worker answered nothing: {per_worker(gateway)}"
        assert chat(gateway).status_code == 200
        sent += 1
    samples = scrape(gateway)
    assert total(samples, "vgate_requests_total") == sent
    shares = per_worker(gateway)
    assert set(shares) == {"0", "1"} and sum(shares.values()) == sent
    assert samples[("vgate_metrics_workers", (("state", "answered"),))] == 2
    assert samples[("vgate_metrics_workers", (("state", "missing"),))] == 0


def test_connections_are_dealt_out_evenly(
    logs: Path, sims: tuple[Process, Process], started: list[Gateway]
) -> None:
    """16 keep-alive clients on 2 workers: 8 each (the kernel's own spreading is not even)."""
    gateway = start_gateway(logs, two_workers(sims))
    started.append(gateway)
    port = int(gateway.url.rsplit(":", 1)[1])
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]
    try:

        def dealt() -> list[float] | None:
            samples = scrape(gateway)  # on a connection of its own: 17 open
            counts = sorted(
                value
                for (name, _labels), value in samples.items()
                if name == "vgate_worker_connections"
            )
            return counts if sum(counts) == 17 else None

        assert poll_until(dealt) == [8, 9]
    finally:
        for client in clients:
            client.close()


def test_sigterm_drains_every_worker_and_the_parent_exits_0(
    logs: Path, sims: tuple[Process, Process], started: list[Gateway]
) -> None:
    config = two_workers(sims)
    config["server"]["drain_delay_s"] = 3.0  # room for the checks below on a slow machine
    gateway = start_gateway(logs, config)
    started.append(gateway)
    workers = poll_until(lambda: len(worker_pids(gateway)) == 2 and worker_pids(gateway))
    # Slow requests in flight (about 1.5 s each), dealt out to both workers.
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(chat(gateway, "slow").status_code))
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    poll_until(lambda: total(scrape(gateway), "vgate_requests_in_flight") >= 6, timeout_s=10)
    gateway.popen.send_signal(signal.SIGTERM)
    # The drain delay: consecutive connections go to alternate workers, and each says 503.
    poll_until(lambda: httpx.get(gateway.url + "/ready", timeout=5).status_code == 503)
    assert [httpx.get(gateway.url + "/ready", timeout=5).status_code for _ in range(4)] == [503] * 4
    assert gateway.popen.wait(30) == 0, gateway.log()
    for thread in threads:
        thread.join(30)
    assert results == [200] * 6  # every request in flight finished
    assert not {pid for pid in workers if pid in processes()}, "a worker outlived the parent"
    with pytest.raises(httpx.ConnectError):  # the listener is closed
        httpx.get(gateway.url + "/health", timeout=5)


def test_a_killed_worker_is_replaced(
    logs: Path, sims: tuple[Process, Process], started: list[Gateway]
) -> None:
    gateway = start_gateway(logs, two_workers(sims))
    started.append(gateway)
    before = poll_until(lambda: len(worker_pids(gateway)) == 2 and worker_pids(gateway))
    victim = min(before)
    os.kill(victim, signal.SIGKILL)

    def replaced() -> set[int] | None:
        pids = worker_pids(gateway)
        return pids if len(pids) == 2 and victim not in pids else None

    after = poll_until(replaced)
    assert after - before and len(after & before) == 1
    assert "killed by signal 9: replacing it" in gateway.log()
    # The new one serves: every worker answers the scrape, and requests are answered.
    poll_until(lambda: scrape(gateway)[("vgate_metrics_workers", (("state", "answered"),))] == 2)
    assert all(chat(gateway).status_code == 200 for _ in range(10))


def test_sighup_reloads_the_config_in_every_worker(
    logs: Path, sims: tuple[Process, Process], started: list[Gateway]
) -> None:
    gateway = start_gateway(logs, two_workers(sims))
    started.append(gateway)
    poll_until(lambda: len(worker_pids(gateway)) == 2)
    applied = ("vgate_config_reloads_total", (("outcome", "applied"),))
    assert scrape(gateway)[applied] == 0
    # A new alias, known only after a reload.
    config_path = next(logs.glob(f"gateway-{gateway.url.rsplit(':', 1)[1]}.yaml"))
    config = yaml.safe_load(config_path.read_text())
    config["models"][0]["aliases"] = ["reloaded"]
    config_path.write_text(yaml.safe_dump(config))
    gateway.popen.send_signal(signal.SIGHUP)
    poll_until(lambda: scrape(gateway)[applied] == 2)  # once in each worker
    # Whichever worker a connection reaches knows the alias.
    assert all(chat(gateway, "reloaded").status_code == 200 for _ in range(20))


@pytest.fixture(scope="module")
def redis(logs: Path) -> Iterator[RedisServer]:
    server = start_redis(logs)
    yield server
    server.stop()


def test_per_key_limits_are_exact_across_workers_through_redis(
    logs: Path, sims: tuple[Process, Process], redis: RedisServer, started: list[Gateway]
) -> None:
    keys = logs / "workers-keys.yaml"
    entry = {"id": "key-rpm", "name": "rpm", "sha256": hash_key(RPM_KEY), "limits": {"rpm": RPM}}
    keys.write_text(yaml.safe_dump({"keys": [entry]}))
    config = two_workers(sims, redis={"url": redis.url, "key_prefix": "e2e-workers"})
    config["keys"] = {"file": str(keys)}
    gateway = start_gateway(logs, config)
    started.append(gateway)
    assert "no redis" not in gateway.log()
    statuses = [chat(gateway, key=RPM_KEY).status_code for _ in range(4 * RPM)]
    assert statuses.count(200) == RPM and statuses.count(429) == 3 * RPM, statuses
    shares = per_worker(gateway)
    assert sum(shares.values()) == 4 * RPM
    assert min(shares.values()) > 0, f"one worker answered nothing: {shares}"


# The admin API with several workers: a call reaches every one (gateway/edge/admin_relay.py).

ADMIN = "vg-workers-admin-0123456789abcdefghij"
ALL_APPLIED = {"applied": 2, "missing": 0, "failed": 0}


def with_admin(sims: tuple[Process, Process], **top: Any) -> dict[str, Any]:
    config = two_workers(sims, **top)
    config["admin"] = {"key_sha256": hash_key(ADMIN)}
    route = config["models"][0]
    # Every request meets the fault once, and is answered with it: no retry, no breaker.
    route["retries"] = {"max_retries": 0}
    route["breaker"] = {"consecutive_failures": 1000, "min_requests": 1000}
    return config


def admin(
    gateway: Gateway, method: str, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    response = httpx.request(
        method,
        gateway.url + path,
        json=body,
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def serving(gateway: Gateway) -> None:
    """Until both workers answer the scrape (each has started its peer socket)."""
    poll_until(lambda: scrape(gateway)[("vgate_metrics_workers", (("state", "answered"),))] == 2)


def on_both(gateway: Gateway, send: Any, count: int = 10) -> list[httpx.Response]:
    """`count` requests, each on a connection of its own; both workers answered some."""
    before = per_worker(gateway)
    responses = [send() for _ in range(count)]
    after = per_worker(gateway)
    assert all(after[w] > before.get(w, 0) for w in ("0", "1")), (before, after)
    return responses


def test_a_chaos_experiment_started_through_the_admin_api_reaches_every_worker(
    logs: Path, sims: tuple[Process, Process], started: list[Gateway]
) -> None:
    gateway = start_gateway(logs, with_admin(sims, chaos={"enabled": True}))
    started.append(gateway)
    serving(gateway)
    outage = {"fault": {"kind": "error", "status": 503}, "routes": ["tiny-llama"]}
    assert admin(gateway, "PUT", "/admin/chaos/outage", outage)["workers"] == ALL_APPLIED
    failed = on_both(gateway, lambda: chat(gateway))
    # The backend's (injected) 503, answered as an upstream error.
    assert [r.status_code for r in failed] == [502] * 10, [r.text for r in failed]
    assert all("Chaos experiment 'outage' injected this 503" in r.text for r in failed)
    # Every one of them was the injected fault: counted as such by the two workers together.
    listed = admin(gateway, "GET", "/admin/chaos")
    assert listed["workers"] == {"answered": 2, "missing": 0, "failed": 0}
    [experiment] = listed["data"]
    assert experiment["name"] == "outage" and experiment["injected"] == 10
    injected = scrape(gateway)
    assert total(injected, "vgate_chaos_injected_total") == 10
    stopped = admin(gateway, "DELETE", "/admin/chaos/outage")
    assert stopped["deleted"] is True and stopped["workers"] == ALL_APPLIED
    assert [r.status_code for r in on_both(gateway, lambda: chat(gateway))] == [200] * 10
    assert admin(gateway, "GET", "/admin/chaos")["data"] == []


def test_a_config_reload_through_the_admin_api_reaches_every_worker(
    logs: Path, sims: tuple[Process, Process], started: list[Gateway]
) -> None:
    gateway = start_gateway(logs, with_admin(sims))
    started.append(gateway)
    serving(gateway)
    unknown = on_both(gateway, lambda: chat(gateway, "via-admin"), count=4)
    assert [r.status_code for r in unknown] == [404] * 4
    config_path = next(logs.glob(f"gateway-{gateway.url.rsplit(':', 1)[1]}.yaml"))
    config = yaml.safe_load(config_path.read_text())
    config["models"][0]["aliases"] = ["via-admin"]
    config_path.write_text(yaml.safe_dump(config))
    assert admin(gateway, "POST", "/admin/config/reload")["workers"] == ALL_APPLIED
    applied = ("vgate_config_reloads_total", (("outcome", "applied"),))
    assert scrape(gateway)[applied] == 2  # once in each worker, before the answer
    known = on_both(gateway, lambda: chat(gateway, "via-admin"))
    assert [r.status_code for r in known] == [200] * 10


def test_a_cache_clear_through_the_admin_api_clears_every_workers_memory_cache(
    logs: Path, sims: tuple[Process, Process], started: list[Gateway]
) -> None:
    gateway = start_gateway(logs, with_admin(sims, cache={"enabled": True}))
    started.append(gateway)
    serving(gateway)

    def cached() -> httpx.Response:
        return httpx.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "tiny-llama", "messages": MESSAGES, "temperature": 0, "max_tokens": 2},
            headers={"Authorization": f"Bearer {DEMO_KEY}"},
            timeout=30,
        )

    # Connections are dealt out in turn: each worker misses once, then hits.
    first = on_both(gateway, cached, count=4)
    assert [r.headers["x-vgate-cache"] for r in first] == ["miss", "miss", "hit", "hit"]
    cleared = admin(gateway, "DELETE", "/admin/cache")
    assert cleared["deleted"] == 2 and cleared["workers"] == ALL_APPLIED  # one entry each
    again = on_both(gateway, cached, count=2)
    assert [r.headers["x-vgate-cache"] for r in again] == ["miss", "miss"]
    # The reads that count per process answer for the whole server.
    figures = admin(gateway, "GET", "/admin/cache")
    assert (figures["entries"], figures["hits"], figures["misses"]) == (2, 2, 4)
    assert figures["workers"] == {"answered": 2, "missing": 0, "failed": 0}
    usage = admin(gateway, "GET", "/admin/keys/key-demo")["process_usage"]
    assert (usage["scope"], usage["requests_today"]) == ("server", 6)
