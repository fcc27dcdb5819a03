"""Pinning: a key's profile pin, and X-VGate-Pin for keys with the right to send it."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.servers import (
    DEMO_KEY,
    REPO,
    Gateway,
    Process,
    backend,
    gateway_config,
    poll_until,
    start_gateway,
    start_sim,
)

MESSAGES = [{"role": "user", "content": "hello"}]
PINNED_KEY = "vg-pinned-0123456789abcdef"  # pin: [w2, e2]: its requests go to those
OPERATOR_KEY = "vg-operator-0123456789abcdef"  # may_pin, and a profile pin of its own
# One failed probe ejects: a probe that is merely slow on a loaded machine must not fail.
CHECKED = {"interval_s": 0.1, "timeout_s": 2.0, "unhealthy_after": 1, "healthy_after": 1}


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def write_keys(path: Path, *extra: dict[str, Any]) -> Path:
    entries = [
        {"id": "key-demo", "name": "demo", "sha256": sha256(DEMO_KEY)},
        {"id": "key-pinned", "name": "tenant", "sha256": sha256(PINNED_KEY), "pin": ["w2", "e2"]},
        {
            "id": "key-operator",
            "name": "operator",
            "sha256": sha256(OPERATOR_KEY),
            "pin": "w2",
            "may_pin": True,
        },
        *extra,
    ]
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


def pinning_config(keys: Path, w1: str, w2: str, backup: str, **route: Any) -> dict[str, Any]:
    config = gateway_config(
        [
            {
                "name": "tiny-llama",
                "fallbacks": ["backup"],
                # w1 would take 100 of every 101 requests: only a pin sends one to w2.
                "backends": [backend("w1", w1, weight=100), backend("w2", w2)],
                **route,
            },
            {"name": "backup", "backends": [backend("b1", backup, model="tiny-llama")]},
            {
                "name": "tiny-embed",
                "backends": [backend("e1", w1, weight=100), backend("e2", backup)],
            },
        ]
    )
    return {**config, "keys": {"file": str(keys)}}


def sdk(gateway: Gateway, key: str = DEMO_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=20)


def chat(
    gateway: Gateway,
    key: str = DEMO_KEY,
    pin: str | None = None,
    *,
    stream: bool = False,
    model: str = "tiny-llama",
) -> httpx.Response:
    """A raw chat request: the response whatever its status."""
    headers = {"Authorization": f"Bearer {key}"}
    if pin is not None:
        headers["X-VGate-Pin"] = pin
    body = {"model": model, "messages": MESSAGES, "max_tokens": 1, "stream": stream}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=20)


def answered_by(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.headers["x-vgate-backend"])


@pytest.fixture(scope="module")
def pinning(logs: Path, sims: tuple[Process, Process]) -> Iterator[Gateway]:
    first, second = sims
    keys = write_keys(logs / "pinning-keys.yaml")
    gateway = start_gateway(logs, pinning_config(keys, first.url, second.url, second.url))
    yield gateway
    gateway.stop()


def test_a_key_pinned_to_a_backend_always_lands_on_it(pinning: Gateway) -> None:
    # The weights send everyone else to w1...
    assert {answered_by(chat(pinning)) for _ in range(6)} == {"w1"}
    # ...but the tenant's key is pinned to w2, streaming or not.
    for stream in (False, True, False, True):
        assert answered_by(chat(pinning, PINNED_KEY, stream=stream)) == "w2"
    response = sdk(pinning, PINNED_KEY).chat.completions.with_raw_response.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=2
    )
    assert response.headers["x-vgate-backend"] == "w2"
    assert response.parse().usage.completion_tokens == 2
    # A pin list names backends of several routes: each route uses the one it has.
    embedding = sdk(pinning, PINNED_KEY).embeddings.with_raw_response.create(
        model="tiny-embed", input="hi"
    )
    assert embedding.headers["x-vgate-backend"] == "e2"
    # A route with none of the key's pinned backends routes it as any other.
    assert answered_by(chat(pinning, PINNED_KEY, model="backup")) == "b1"


def test_x_vgate_pin_forces_the_named_backend_for_a_key_with_the_right(pinning: Gateway) -> None:
    for name in ("w1", "w2", "w1"):
        for stream in (False, True):
            assert answered_by(chat(pinning, OPERATOR_KEY, name, stream=stream)) == name
    # The header beats the key's own profile pin (w2); without it, the profile pin holds.
    assert answered_by(chat(pinning, OPERATOR_KEY, "w1")) == "w1"
    assert answered_by(chat(pinning, OPERATOR_KEY)) == "w2"
    # Through the SDK, as an operator reproducing one backend's behaviour would send it.
    response = sdk(pinning, OPERATOR_KEY).chat.completions.with_raw_response.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=1, extra_headers={"X-VGate-Pin": "w1"}
    )
    assert response.headers["x-vgate-backend"] == "w1"


def test_x_vgate_pin_without_the_right_is_403(pinning: Gateway) -> None:
    for key in (DEMO_KEY, PINNED_KEY):  # a profile pin is not the right to choose
        response = chat(pinning, key, "w2")
        assert response.status_code == 403
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}  # OpenAI's shape
        assert error["code"] == "pin_not_allowed" and error["type"] == "permission_error"
        assert "may_pin" in error["message"]
    with pytest.raises(openai.PermissionDeniedError) as caught:
        sdk(pinning).chat.completions.create(
            model="tiny-llama", messages=MESSAGES, extra_headers={"X-VGate-Pin": "w1"}
        )
    assert caught.value.code == "pin_not_allowed"


def test_x_vgate_pin_naming_a_backend_the_route_lacks_is_400(pinning: Gateway) -> None:
    # Unknown anywhere, or a backend of another route: either way not one of this model's.
    for name in ("w9", "e1", ""):
        response = chat(pinning, OPERATOR_KEY, name)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "X-VGate-Pin" and error["code"] == "invalid_value"
        assert "w1, w2" in error["message"]  # it lists what the route has
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(pinning, OPERATOR_KEY).chat.completions.create(
            model="tiny-llama", messages=MESSAGES, extra_headers={"X-VGate-Pin": "b1"}
        )
    assert caught.value.param == "X-VGate-Pin"


def test_a_pinned_backend_that_is_down_is_503_and_never_falls_back(
    logs: Path, sims: tuple[Process, Process]
) -> None:
    first, second = sims
    pinned = start_sim(logs)  # w2's own worker, to fail and stop
    keys = write_keys(logs / "pinning-down-keys.yaml")
    gateway = start_gateway(
        logs,
        pinning_config(
            keys, first.url, pinned.url, second.url, health=CHECKED, timeouts={"connect_s": 1}
        ),
    )

    def live() -> list[str]:
        return list(httpx.get(gateway.url + "/ready").json()["models"]["tiny-llama"]["live"])

    def pinned_to_w2(stream: bool = False) -> httpx.Response:
        """A request forced onto w2, checked to have stayed on its route: no fallback."""
        before = len(gateway.access_log())
        response = chat(gateway, OPERATOR_KEY, "w2", stream=stream)
        entry = gateway.wait_for_log(before + 1)[-1]
        assert entry["model"] == "tiny-llama" and entry["fallback_from"] is None
        if response.status_code != 200:
            assert "'w2'" in response.json()["error"]["message"]  # it names the backend
        return response

    def refused(response: httpx.Response) -> None:
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "no_live_backend"
        assert response.headers["retry-after"]

    try:
        assert live() == ["w1", "w2"]
        # Health failing: w2 leaves rotation.
        httpx.put(pinned.url + "/sim/faults", json={"health_status": 503}).raise_for_status()
        poll_until(lambda: live() == ["w1"])
        for stream in (False, True):
            refused(pinned_to_w2(stream))
        # The route has a fallback, and w1 is fine: neither hides the pinned backend.
        fallbacks = 'vgate_fallbacks_total{from_model="tiny-llama",to_model="backup"}'
        assert fallbacks not in httpx.get(gateway.url + "/metrics").text
        # A profile pin is where the key goes on routes that have that backend: never onto
        # w1, but this route's fallback model may answer it, as for any request the route
        # cannot serve.
        response = chat(gateway, PINNED_KEY)
        assert answered_by(response) == "b1" and response.headers["x-vgate-model"] == "backup"
        assert answered_by(chat(gateway)) == "w1"  # unpinned keys are not affected

        # Healthy again, then the worker is stopped outright.
        httpx.delete(pinned.url + "/sim/faults").raise_for_status()
        poll_until(lambda: live() == ["w1", "w2"])
        assert answered_by(pinned_to_w2()) == "w2"
        pinned.stop()
        # Refused connections: the first request meets them itself (502) unless a health
        # check got there first (503); either way it names w2 and goes nowhere else.
        assert pinned_to_w2().status_code in (502, 503)
        poll_until(lambda: live() == ["w1"])
        refused(pinned_to_w2())
        # The one fallback in all is the profile-pinned request's.
        assert f"{fallbacks} 1.0" in httpx.get(gateway.url + "/metrics").text
    finally:
        gateway.stop()
        pinned.stop()


def test_a_key_pinned_to_a_backend_that_does_not_exist_fails_start_up(logs: Path) -> None:
    keys = write_keys(
        logs / "pinning-bad-keys.yaml",
        {"id": "key-lost", "name": "lost", "sha256": sha256("vg-lost-0123456789"), "pin": "w9"},
    )
    config_path = logs / "pinning-bad.yaml"
    config = pinning_config(keys, "http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3")
    config_path.write_text(yaml.safe_dump(config))
    for args in (["check-config", str(config_path)], ["serve", "--config", str(config_path)]):
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli.main", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2, done.stderr
        # The keys file, the field and the reason, on one line.
        assert (
            f"vgate: invalid configuration: {keys}: keys[key-lost].pin: no backend is named 'w9'"
            in done.stderr
        ), done.stderr
        assert "Traceback" not in done.stderr
