"""Chaos injection through a real `vgate serve` in front of real `vgate sim` workers.

The faults are injected at the router's adapter seam, so the gateway reacts to them as to the
real thing (retries, resumption), and every injection shows: the request's access-log line
(`chaos`), `vgate_chaos_injected_total{experiment,fault}` and its span's events.

One gateway for the module, each test on a route (or a key) of its own, so that the
experiments never touch each other's requests. The faulty backend of a route comes first
(weight 1000: smooth weighted selection picks it first), and no breaker opens: every request
meets the fault, and what happens to it can be asserted exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from gateway.edge.auth import hash_key
from tests.e2e.conftest import new_request_id, wait_for_line
from tests.otlp_receiver import OTLPReceiver
from tests.servers import (
    DEMO_KEY,
    Gateway,
    Process,
    backend,
    gateway_config,
    poll_until,
    start_gateway,
)

DRILL_KEY = "vg-test-drill-0123456789abcdefghij"  # may_chaos
ADMIN = "vg-admin-0123456789abcdefghijklmnop"
MESSAGES: Any = [{"role": "user", "content": "tell me about rivers"}]
FIRST = {"weight": 1000}
NO_BREAKER = {"consecutive_failures": 1000, "min_requests": 1000}
# Every failed attempt retried, however many in a row: the budget is not what is tested.
RETRIES = {"max_retries": 1, "backoff_initial_s": 0.001, "budget_ratio": 1.0}
TIMEOUTS = {"connect_s": 1, "first_token_s": 10, "idle_s": 5, "total_s": 20}


def route(name: str, sims: tuple[Process, Process], **extra: Any) -> dict[str, Any]:
    """A route of its own on the two sims: `<name>-1` (picked first) and `<name>-2`."""
    first, second = sims
    return {
        "name": name,
        "timeouts": TIMEOUTS,
        "retries": RETRIES,
        "breaker": NO_BREAKER,
        "backends": [
            backend(f"{name}-1", first.url, model="tiny-llama", **FIRST),
            backend(f"{name}-2", second.url, model="tiny-llama"),
        ],
        **extra,
    }


def error_fault(status: int = 503) -> dict[str, Any]:
    return {"kind": "error", "status": status}


def start(
    logs: Path, keys_file: Path, models: list[dict[str, Any]], chaos: dict[str, Any], **extra: Any
) -> Gateway:
    config = gateway_config(models)
    config["keys"] = {"file": str(keys_file)}
    config["admin"] = {"key_sha256_env": "VGATE_TEST_ADMIN_SHA256"}
    config["chaos"] = chaos
    config.update(extra)
    return start_gateway(logs, config, env={"VGATE_TEST_ADMIN_SHA256": hash_key(ADMIN)})


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chaos-keys") / "keys.yaml"
    entries = [
        {"id": "key-demo", "name": "demo", "sha256": hash_key(DEMO_KEY)},
        {"id": "key-drill", "name": "drill", "sha256": hash_key(DRILL_KEY), "may_chaos": True},
    ]
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    server = OTLPReceiver()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(
    logs: Path, sims: tuple[Process, Process], keys_file: Path, receiver: OTLPReceiver
) -> Iterator[Gateway]:
    experiments = [
        {"name": "outage", "fault": error_fault(), "backends": ["steady-1"]},
        {
            "name": "drill",
            "fault": error_fault(),
            "routes": ["asked"],
            "on_request": True,
        },
        {"name": "cuts", "fault": {"kind": "cut", "after_events": 5}, "backends": ["streamed-1"]},
    ]
    process = start(
        logs,
        keys_file,
        [route(name, sims) for name in ("steady", "asked", "runtime", "streamed")],
        {"enabled": True, "experiments": experiments},
        tracing={
            "enabled": True,
            "endpoint": receiver.endpoint,
            "schedule_delay_s": 0.05,
        },
    )
    yield process
    process.stop()


def chat(
    gateway: Gateway, model: str, key: str = DEMO_KEY, **headers: str
) -> tuple[httpx.Response, dict[str, Any]]:
    """One chat completion and its access-log line."""
    request_id = new_request_id()
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}", "X-Request-ID": request_id, **headers},
        json={"model": model, "messages": MESSAGES, "max_tokens": 8},
        timeout=30,
    )
    return response, wait_for_line(gateway, request_id)


def admin(
    gateway: Gateway, method: str, path: str, body: Any = None, key: str = ADMIN
) -> httpx.Response:
    return httpx.request(
        method,
        gateway.url + path,
        headers={"Authorization": f"Bearer {key}"},
        json=body,
        timeout=10,
    )


def injected(gateway: Gateway, experiment: str, fault: str) -> float:
    """vgate_chaos_injected_total for one experiment and fault (0 when absent)."""
    wanted = f'vgate_chaos_injected_total{{experiment="{experiment}",fault="{fault}"}} '
    for line in httpx.get(gateway.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(wanted):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_an_outage_on_one_backend_is_answered_by_the_other_and_shows_everywhere(
    gateway: Gateway, receiver: OTLPReceiver
) -> None:
    before = injected(gateway, "outage", "error")
    lines = []
    for _ in range(6):
        response, line = chat(gateway, "steady")
        assert response.status_code == 200, response.text
        assert response.headers["x-vgate-backend"] == "steady-2"
        lines.append(line)
    for line in lines:
        # Each request met the outage on steady-1, and was retried on steady-2.
        assert line["chaos"] == ["outage:error"]
        assert (line["status"], line["attempts"], line["backend"]) == (200, 2, "steady-2")
        assert [d["choice"] for d in line["decisions"]] == ["steady-1", "steady-2"]
    assert injected(gateway, "outage", "error") - before == 6

    def span() -> dict[str, Any] | None:
        wanted = lines[-1]["request_id"]
        return next(
            (
                s
                for s in list(receiver.spans)
                if s["kind"] == 2  # the request's SERVER span, not an attempt's
                and s["attributes"].get("vgate.request_id") == wanted
            ),
            None,
        )

    events = [e for e in poll_until(span)["events"] if e["name"] == "vgate.chaos.injected"]
    assert [e["attributes"] for e in events] == [
        {"vgate.chaos.experiment": "outage", "vgate.chaos.fault": "error"}
    ]


def test_a_request_chaos_left_alone_has_no_chaos_field(gateway: Gateway) -> None:
    response, line = chat(gateway, "runtime")
    assert response.status_code == 200
    assert "chaos" not in line and line["attempts"] == 1
    assert "chaos" not in line["_raw"]


def test_an_on_request_experiment_hits_only_the_requests_that_ask_for_it(
    gateway: Gateway,
) -> None:
    before = injected(gateway, "drill", "error")
    # Asked for by a key with the right: both backends of the route answer the drill's 503,
    # and the client is told so as for any upstream's (a 502 naming the last backend).
    response, line = chat(gateway, "asked", key=DRILL_KEY, **{"X-VGate-Chaos": "drill"})
    assert response.status_code == 502, response.text
    assert "answered 503: Chaos experiment 'drill' injected" in response.json()["error"]["message"]
    assert line["chaos"] == ["drill:error", "drill:error"]
    assert line["attempts"] == 2 and line["key"] == "drill"
    assert injected(gateway, "drill", "error") - before == 2
    # The same key without the header, and any other key, are left alone.
    for key in (DRILL_KEY, DEMO_KEY):
        response, line = chat(gateway, "asked", key=key)
        assert response.status_code == 200
        assert "chaos" not in line and line["attempts"] == 1
    assert injected(gateway, "drill", "error") - before == 2


def test_a_key_without_may_chaos_may_not_ask_for_an_experiment(gateway: Gateway) -> None:
    before = injected(gateway, "drill", "error")
    response, line = chat(gateway, "asked", key=DEMO_KEY, **{"X-VGate-Chaos": "drill"})
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "chaos_not_allowed"
    assert "may_chaos" in error["message"]
    assert line["status"] == 403 and line["error"] == "chaos_not_allowed"
    assert line["attempts"] == 0 and "chaos" not in line
    assert injected(gateway, "drill", "error") == before


def test_experiments_started_and_stopped_through_the_admin_api(gateway: Gateway) -> None:
    listed = admin(gateway, "GET", "/admin/chaos")
    assert listed.status_code == 200
    assert listed.json()["enabled"] is True
    assert {e["name"] for e in listed.json()["data"]} == {"outage", "drill", "cuts"}

    response, line = chat(gateway, "runtime")
    assert (response.status_code, line["attempts"]) == (200, 1) and "chaos" not in line

    brownout = {"fault": error_fault(500), "backends": ["runtime-1"]}
    started = admin(gateway, "PUT", "/admin/chaos/brownout", brownout)
    assert started.status_code == 200, started.text
    assert started.json()["name"] == "brownout"
    names = {e["name"] for e in admin(gateway, "GET", "/admin/chaos").json()["data"]}
    assert "brownout" in names
    response, line = chat(gateway, "runtime")
    assert response.status_code == 200
    assert line["chaos"] == ["brownout:error"] and line["backend"] == "runtime-2"
    assert injected(gateway, "brownout", "error") == 1

    stopped = admin(gateway, "DELETE", "/admin/chaos/brownout")
    assert stopped.status_code == 200, stopped.text
    response, line = chat(gateway, "runtime")
    assert (response.status_code, line["attempts"]) == (200, 1) and "chaos" not in line
    assert injected(gateway, "brownout", "error") == 1

    missing = admin(gateway, "DELETE", "/admin/chaos/brownout")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "experiment_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"fault": {"kind": "boom"}}, "fault.kind"),
        ({"fault": error_fault(), "rate": 2}, "rate"),
        ({"fault": error_fault(), "typo": 1}, "typo"),
        ({"fault": error_fault(), "name": "other"}, "name"),
        ({}, "fault"),
        ({"fault": error_fault(), "backends": ["nowhere"]}, "backends"),  # none such here
    ],
)
def test_an_invalid_experiment_is_400_naming_its_field(
    gateway: Gateway, body: dict[str, Any], param: str
) -> None:
    response = admin(gateway, "PUT", "/admin/chaos/bad", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]
    names = {e["name"] for e in admin(gateway, "GET", "/admin/chaos").json()["data"]}
    assert "bad" not in names and "other" not in names


def test_the_chaos_admin_routes_take_only_the_admin_key(gateway: Gateway) -> None:
    for method, path, body in (
        ("GET", "/admin/chaos", None),
        ("PUT", "/admin/chaos/sneaky", {"fault": error_fault()}),
        ("DELETE", "/admin/chaos/outage", None),
    ):
        response = admin(gateway, method, path, body, key=DRILL_KEY)
        assert response.status_code == 401, (method, response.text)
    names = {e["name"] for e in admin(gateway, "GET", "/admin/chaos").json()["data"]}
    assert "outage" in names and "sneaky" not in names


def test_a_stream_cut_by_chaos_is_resumed_on_the_other_backend(
    gateway: Gateway, sims: tuple[Process, Process]
) -> None:
    # What the worker answers when nothing breaks (the sim's answers are deterministic).
    direct = openai.OpenAI(base_url=sims[1].url + "/v1", api_key="none", max_retries=0)
    expected = direct.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=40)
    before = injected(gateway, "cuts", "cut")
    request_id = new_request_id()
    client = openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=30
    )
    chunks = list(
        client.chat.completions.create(
            model="streamed",
            messages=MESSAGES,
            max_tokens=40,
            stream=True,
            extra_headers={"X-Request-ID": request_id},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    line = wait_for_line(gateway, request_id)
    assert line["chaos"] == ["cuts:cut"]
    assert (line["status"], line["error"]) == (200, None)
    assert (line["resumptions"], line["backend"]) == (1, "streamed-2")
    assert injected(gateway, "cuts", "cut") - before == 1


def test_with_chaos_disabled_nothing_is_injected_and_nothing_can_be_started(
    logs: Path, sims: tuple[Process, Process], keys_file: Path
) -> None:
    outage = {"name": "outage", "fault": error_fault(), "backends": ["steady-1"]}
    gateway = start(logs, keys_file, [route("steady", sims)], {"experiments": [outage]})
    try:
        listed = admin(gateway, "GET", "/admin/chaos")
        assert listed.status_code == 200 and listed.json()["enabled"] is False
        refused = admin(gateway, "PUT", "/admin/chaos/late", {"fault": error_fault()})
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "chaos_disabled"
        for _ in range(3):
            response, line = chat(gateway, "steady")
            assert response.status_code == 200
            assert response.headers["x-vgate-backend"] == "steady-1"
            assert "chaos" not in line and line["attempts"] == 1
        assert "vgate_chaos_injected_total{" not in httpx.get(gateway.url + "/metrics").text
    finally:
        gateway.stop()
