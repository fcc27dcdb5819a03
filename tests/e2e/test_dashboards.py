"""The SLO path end to end: a real Prometheus scrapes a live `vgate serve` (in front of two
`vgate sim` workers) every second, with the rules of `vgate slo rules` loaded, while load
with an injected fault runs; the fast-burn alert goes pending, and every query of the
dashboards `vgate slo dashboards` writes (parsed by promtool first) returns data.

The routes are arranged so that every panel has something to show: `burning` answers every
request with an injected 500 and has no fallback (the availability objective burns);
`primary`'s only backend fails too and it falls back to `tiny-llama`; `tiny-llama`'s first
backend fails and its requests are retried on the second (retries, failed attempts, a
breaker); `tiny-embed` is healthy (and opts out of the cache); the key `limited` may send 2
requests a minute. The response cache (memory backend) is on: `cached` answers after an
injected 300 ms, so two identical requests sent together share one call (coalesced); the
same temperature-0 request in every round of the load is a hit after its first miss, the
others' requests (no temperature) bypass it.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.cli import dashboards
from gateway.cli.slo import render
from gateway.config import load_config
from gateway.edge.auth import hash_key
from tests.otlp_receiver import OTLPReceiver
from tests.prometheus import Prometheus, installed
from tests.servers import (
    DEMO_KEY,
    Gateway,
    Process,
    backend,
    gateway_config,
    start_gateway,
)

LIMITED_KEY = "vg-test-limited-0123456789abcdefghij"
MESSAGES: Any = [{"role": "user", "content": "tell me about rivers"}]
DEADLINE_S = 40.0  # for the alert and every query, from the first request
SLOS: list[dict[str, Any]] = [
    {"name": "availability", "availability": 0.995},
    {
        "name": "chat_ttft",
        "routes": ["tiny-llama"],
        "latency": {"threshold_s": 2.5, "target": 0.99, "of": "ttft"},
    },
    {
        "name": "embed_latency",
        "routes": ["tiny-embed"],
        "window_days": 7,
        "latency": {"threshold_s": 1, "target": 0.99},
    },
]
FAST_BURN = "VgateSloBurnRate1h"
DETERMINISTIC: dict[str, Any] = {"temperature": 0, "max_tokens": 8}
COALESCE_TRIES = 5  # pairs sent together until one is coalesced (300 ms apart at worst)


def gateway_yaml(sims: tuple[Process, Process], keys_file: Path, otlp: str) -> dict[str, Any]:
    first, second = sims
    no_retries = {"max_retries": 0}
    models: list[dict[str, Any]] = [
        {
            "name": "tiny-llama",
            "retries": {"max_retries": 1, "backoff_initial_s": 0.001, "budget_ratio": 1.0},
            "backends": [
                backend("w1", first.url, weight=1000),  # picked first, and failing
                backend("w2", second.url),
            ],
        },
        {
            "name": "tiny-embed",
            "cache": {"enabled": False},  # its upstream keeps answering every request
            "backends": [backend("w1-embed", first.url)],
        },
        {
            "name": "burning",
            "retries": no_retries,
            "backends": [backend("b1", first.url, model="tiny-llama")],
        },
        {
            "name": "primary",
            "retries": no_retries,
            "fallbacks": ["tiny-llama"],
            "backends": [backend("p1", second.url, model="tiny-llama")],
        },
        {
            "name": "cached",
            "retries": no_retries,
            "backends": [backend("c1", second.url, model="tiny-llama")],
        },
    ]
    config = gateway_config(models)
    config["keys"] = {"file": str(keys_file)}
    config["slos"] = SLOS
    config["chaos"] = {
        "enabled": True,
        "experiments": [
            {"name": "outage", "fault": {"kind": "error", "status": 500}, "routes": ["burning"]},
            {"name": "primary-down", "fault": {"kind": "error", "status": 503}, "backends": ["p1"]},
            {"name": "flaky", "fault": {"kind": "error", "status": 503}, "backends": ["w1"]},
            # Slow enough that a second identical request finds the first still in flight.
            {"name": "slow", "fault": {"kind": "latency", "latency_ms": 300}, "routes": ["cached"]},
        ],
    }
    config["cache"] = {"enabled": True}  # the memory backend
    # Every request traced: its trace id is an exemplar of the latency buckets.
    config["tracing"] = {"enabled": True, "endpoint": otlp, "schedule_delay_s": 0.05}
    return config


class Load:
    """Requests of every kind, in a loop on a thread until stopped: the metrics keep moving
    while Prometheus scrapes."""

    def __init__(self, gateway: Gateway) -> None:
        self.url = gateway.url
        self.statuses: dict[tuple[str, int], int] = {}
        self.cache: list[str] = []  # X-VGate-Cache of the requests sent to drive the cache
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None
        self._thread.start()

    def _run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=30) as client:
                self._drive_cache(client)
                limited = 0
                while not self._stop.is_set():
                    for model in ("burning", "burning", "primary"):
                        self._chat(client, model, DEMO_KEY)
                    self._cached(client, "hit again")  # a hit each round: a hit ratio above 0
                    self._chat(client, "tiny-llama", DEMO_KEY, stream=True)
                    self._post(
                        client,
                        "/v1/embeddings",
                        "tiny-embed",
                        DEMO_KEY,
                        {"model": "tiny-embed", "input": "rivers"},
                    )
                    if limited < 4:  # 2 a minute: the last two are refused
                        limited += 1
                        self._chat(client, "tiny-llama", LIMITED_KEY)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _drive_cache(self, client: httpx.Client) -> None:
        """A miss, then a hit of the same body, a bypass (no temperature), and pairs of
        identical requests sent together until one is coalesced with the other."""
        for _ in range(2):
            self.cache.append(self._cached(client, "hit again"))
        self.cache.append(self._cached(client, "no temperature", deterministic=False))
        with ThreadPoolExecutor(2) as pool:
            for attempt in range(COALESCE_TRIES):
                together = [f"together {attempt}"] * 2
                pair = pool.map(lambda content: self._cached(client, content), together)
                self.cache.extend(sorted(pair))
                if "coalesced" in self.cache:
                    break

    def _cached(self, client: httpx.Client, content: str, deterministic: bool = True) -> str:
        """Ask the route `cached` for `content`; its X-VGate-Cache."""
        body: dict[str, Any] = {
            "model": "cached",
            "messages": [{"role": "user", "content": content}],
            **(DETERMINISTIC if deterministic else {"max_tokens": 8}),
        }
        return self._post(client, "/v1/chat/completions", "cached", DEMO_KEY, body)

    def _chat(self, client: httpx.Client, model: str, key: str, stream: bool = False) -> None:
        body: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_tokens": 8}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        self._post(client, "/v1/chat/completions", model, key, body)

    def _post(
        self, client: httpx.Client, path: str, model: str, key: str, body: dict[str, Any]
    ) -> str:
        """The response's X-VGate-Cache ("" where the route has the cache off)."""
        response = client.post(path, headers={"Authorization": f"Bearer {key}"}, json=body)
        response.read()
        self.statuses[(model, response.status_code)] = (
            self.statuses.get((model, response.status_code), 0) + 1
        )
        cache: str = response.headers.get("x-vgate-cache", "")
        return cache

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.fixture(scope="module")
def setup(
    logs: Path, sims: tuple[Process, Process], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Prometheus, dict[str, dict[str, Any]], Load]]:
    prometheus_binary = installed("prometheus")
    workdir = tmp_path_factory.mktemp("dashboards")
    keys_file = workdir / "keys.yaml"
    keys = [
        {"id": "key-demo", "name": "demo", "sha256": hash_key(DEMO_KEY)},
        {
            "id": "key-limited",
            "name": "limited",
            "sha256": hash_key(LIMITED_KEY),
            "limits": {"rpm": 2},
        },
    ]
    keys_file.write_text(yaml.safe_dump({"keys": keys}))
    receiver = OTLPReceiver()
    gateway = start_gateway(logs, gateway_yaml(sims, keys_file, receiver.endpoint))
    # The rules and dashboards as an operator writes them, from the gateway's own config.
    port = gateway.url.rsplit(":", 1)[1]
    config = load_config(logs / f"gateway-{port}.yaml", environ={})  # as start_gateway wrote it
    rules = workdir / "rules.yaml"
    rules.write_text(render(config))
    boards = dashboards.dashboards(config)
    prometheus = Prometheus(
        prometheus_binary, workdir, gateway.url.removeprefix("http://"), rules, interval="1s"
    )
    load = Load(gateway)
    yield gateway, prometheus, boards, load
    load.stop()
    prometheus.stop()
    gateway.stop()
    receiver.stop()


def test_every_dashboard_query_parses_and_returns_data_and_the_fast_burn_alert_goes_pending(
    setup: tuple[Gateway, Prometheus, dict[str, dict[str, Any]], Load], tmp_path: Path
) -> None:
    _, prometheus, boards, load = setup
    assert set(boards) == {"vgate-gateway.json", "vgate-slos.json"}
    queries = [
        (f"{name}: {where}", dashboards.concrete(expr))
        for name, board in boards.items()
        for where, expr in dashboards.queries(board)
    ]
    check = tmp_path / "queries.yaml"
    check.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "dashboards",
                        "rules": [
                            {"record": f"dashboard:query:{index}", "expr": expr}
                            for index, (_, expr) in enumerate(queries)
                        ],
                    }
                ]
            }
        )
    )
    done = subprocess.run(
        [installed("promtool"), "check", "rules", str(check)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    deadline = time.monotonic() + DEADLINE_S
    empty = [where for where, _ in queries]
    pending: list[dict[str, Any]] = []
    while time.monotonic() < deadline and (empty or not pending):
        assert load.error is None, load.error
        empty = [where for where, expr in queries if not prometheus.query(expr)]
        alerts = prometheus.get("/api/v1/alerts")["alerts"]
        pending = [
            alert
            for alert in alerts
            if alert["labels"]["alertname"] == FAST_BURN
            and alert["labels"]["slo"] == "availability"
        ]
        if empty or not pending:
            time.sleep(0.5)  # a scrape and an evaluation each second: poll twice a second
    assert not empty, f"queries without data after {DEADLINE_S}s: {empty}; load: {load.statuses}"
    assert pending, f"{FAST_BURN} not pending after {DEADLINE_S}s; load: {load.statuses}"
    assert pending[0]["state"] in ("pending", "firing")  # `for: 2m`: pending in this test
    assert pending[0]["labels"]["severity"] == "page"
    # The other objectives are met: their fast-burn alert stays quiet.
    alerts = prometheus.get("/api/v1/alerts")["alerts"]
    assert not [a for a in alerts if a["labels"].get("slo") in ("chat_ttft", "embed_latency")]
    # What made the data: the injected faults, the limited key's refusals.
    burning = {status for model, status in load.statuses if model == "burning"}
    assert burning and all(status >= 500 for status in burning), load.statuses
    assert load.statuses.get(("primary", 200), 0) > 0
    # The cache's traffic: a miss then a hit of the same body, a bypass, one coalesced pair.
    assert load.cache[:3] == ["miss", "hit", "bypass"], load.cache
    assert load.cache[-2:] == ["coalesced", "miss"], load.cache
    assert {status for model, status in load.statuses if model == "cached"} == {200}
    refused = prometheus.query('vgate_limit_refusals_total{key="limited"}')
    assert [r["metric"]["code"] for r in refused] == ["rate_limit_exceeded"]


def test_latency_exemplars_carry_trace_ids_into_prometheus(
    setup: tuple[Gateway, Prometheus, dict[str, dict[str, Any]], Load],
) -> None:
    gateway, prometheus, _, load = setup
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    served = httpx.get(gateway.url + "/metrics", headers={"Accept": accept}, timeout=10)
    if not served.headers["content-type"].startswith("application/openmetrics-text"):
        pytest.skip(
            "/metrics does not negotiate OpenMetrics yet: gateway/runtime/app.py must answer "
            "with GatewayMetrics.exposition(request's Accept)"
        )
    deadline = time.monotonic() + DEADLINE_S
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not found:
        assert load.error is None, load.error
        now = time.time()
        found = prometheus.get(
            "/api/v1/query_exemplars",
            query="vgate_request_latency_seconds_bucket",
            start=str(now - 60),
            end=str(now),
        )
        if not found:
            time.sleep(0.5)
    assert found, f"no exemplar after {DEADLINE_S}s"
    trace_ids = {e["labels"]["trace_id"] for series in found for e in series["exemplars"]}
    assert trace_ids and all(len(trace_id) == 32 for trace_id in trace_ids)
