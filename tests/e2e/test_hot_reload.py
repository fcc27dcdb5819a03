"""Config hot reload against a real `vgate serve` and `vgate sim` workers, under load.

Clients in threads (the openai SDK streaming and not, plain httpx) send requests without
pause while the config is reloaded 20 times, alternating two valid configs (w1's weight
changed and w2 added, then both undone) through each trigger in turn: the admin call,
SIGHUP and the file changing. Not one request may fail. Then a bad config is refused while
serving, by each trigger, and the config in force keeps serving.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

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
from tests.upstack import ready_state, sim_worker, start_up

ADMIN = "vg-admin-reload-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def workers(logs: Path) -> Iterator[tuple[Process, Process]]:
    """Two sims whose streams last a while (about 0.1 s): many are open at each reload."""
    first = start_sim(logs, ttft_ms=20, tokens_per_s=200)
    second = start_sim(logs, ttft_ms=20, tokens_per_s=200)
    yield first, second
    first.stop()
    second.stop()


def config(workers: tuple[Process, Process], *, second: bool, **extra: Any) -> dict[str, Any]:
    """tiny-llama on w1 alone, or on w1 (another weight: a new backend) and w2, with the
    alias `both` saying which is in force."""
    first_url, second_url = workers[0].url, workers[1].url
    route: dict[str, Any] = {
        "name": "tiny-llama",
        "timeouts": {"connect_s": 1, "first_token_s": 5, "idle_s": 5, "total_s": 10},
        "backends": [backend("w1", first_url)],
    }
    if second:
        route["aliases"] = ["both"]
        route["backends"] = [backend("w1", first_url, weight=3), backend("w2", second_url)]
    # drain_delay_s and access_log_flush_s as tests.servers.start_gateway serves them: not a
    # change needing a restart.
    raw = gateway_config(
        [route], config_reload_interval_s=0.1, drain_delay_s=0, access_log_flush_s=0
    )
    raw["admin"] = {"key_sha256": hashlib.sha256(ADMIN.encode()).hexdigest()}
    raw.update(extra)
    return raw


@dataclass
class Load:
    """Clients sending requests back to back until stopped; every failure kept."""

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    done: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        sdk = openai.OpenAI(base_url=self.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=20)
        clients: list[Callable[[], str]] = [
            lambda: self._stream(sdk),
            lambda: self._stream(sdk),
            lambda: self._complete(sdk),
            self._raw,
        ]
        for index, client in enumerate(clients):
            thread = threading.Thread(target=self._run, args=(client,), name=f"load-{index}")
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self, client: Callable[[], str]) -> None:
        while not self.stop.is_set():
            try:
                self.done.append(client())
            except Exception as exc:
                self.failures.append(repr(exc))

    @staticmethod
    def _stream(sdk: openai.OpenAI) -> str:
        chunks = sdk.chat.completions.create(
            model="tiny-llama", messages=MESSAGES, max_tokens=20, stream=True
        )
        finish = [c.choices[0].finish_reason for c in chunks if c.choices]
        if finish[-1] not in ("stop", "length"):
            raise AssertionError(f"a stream ended without a finish reason: {finish[-3:]}")
        return "stream"

    @staticmethod
    def _complete(sdk: openai.OpenAI) -> str:
        answer = sdk.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=8)
        if not answer.choices[0].message.content:
            raise AssertionError("an empty answer")
        return "complete"

    def _raw(self) -> str:
        response = httpx.post(
            self.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {DEMO_KEY}"},
            json={"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 4},
            timeout=20,
        )
        if response.status_code != 200:
            raise AssertionError(f"{response.status_code}: {response.text}")
        return "raw"


def admin_reload(gateway: Gateway) -> httpx.Response:
    return httpx.post(
        gateway.url + "/admin/config/reload",
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=10,
    )


def model_names(gateway: Gateway) -> set[str]:
    response = httpx.get(
        gateway.url + "/v1/models", headers={"Authorization": f"Bearer {DEMO_KEY}"}, timeout=5
    )
    return {model["id"] for model in response.json()["data"]}


def reloads(gateway: Gateway, outcome: str) -> float:
    for line in httpx.get(gateway.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(f'vgate_config_reloads_total{{outcome="{outcome}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def write(path: Path, raw: dict[str, Any]) -> None:
    """Replace the file at once, as an editor or a deploy tool does: never half written."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump(raw))
    temporary.replace(path)


@pytest.fixture(scope="module")
def serving(logs: Path, workers: tuple[Process, Process]) -> Iterator[tuple[Gateway, Path]]:
    gateway = start_gateway(logs, config(workers, second=False))
    path = logs / f"{gateway.name}.yaml"
    yield gateway, path
    gateway.stop()


def test_twenty_reloads_under_load_fail_no_request(
    serving: tuple[Gateway, Path], workers: tuple[Process, Process]
) -> None:
    gateway, path = serving
    port = int(gateway.url.rsplit(":", 1)[1])
    applied_before = reloads(gateway, "applied")
    load = Load(gateway.url)
    load.start()
    try:
        poll_until(lambda: len(load.done) >= 8, timeout_s=10)
        triggers = ("admin", "SIGHUP", "file")
        for number in range(20):
            second = number % 2 == 0
            trigger = triggers[number % 3]
            raw = config(workers, second=second)
            raw["server"]["port"] = port
            write(path, raw)
            if trigger == "admin":
                response = admin_reload(gateway)
                assert response.status_code == 200, response.text
                answer = response.json()
                assert answer["applied"] and answer["restart_required"] == []
                # The watcher may have read the file first: then this reload changed nothing.
                assert answer["backends"]["kept"] in (["w1", "w2"] if second else ["w1"], [])
            elif trigger == "SIGHUP":
                gateway.popen.send_signal(signal.SIGHUP)
            poll_until(lambda both=second: ("both" in model_names(gateway)) == both, timeout_s=5)
            seen = len(load.done)
            poll_until(lambda seen=seen: len(load.done) >= seen + 2, timeout_s=10)  # traffic on it
    finally:
        load.finish()
    assert load.failures == []
    assert len(load.done) >= 60
    assert {"stream", "complete", "raw"} <= set(load.done)
    assert reloads(gateway, "applied") - applied_before >= 20
    assert "config reload (SIGHUP) applied" in gateway.log()
    assert "config reload (file) applied" in gateway.log()
    # Removed adapters were closed once their requests had ended.
    poll_until(lambda: "removed backends closed" in gateway.log(), timeout_s=5)


def test_a_bad_config_is_refused_while_serving(
    serving: tuple[Gateway, Path], workers: tuple[Process, Process]
) -> None:
    gateway, path = serving
    port = int(gateway.url.rsplit(":", 1)[1])
    good = config(workers, second=True)
    good["server"]["port"] = port
    write(path, good)
    assert admin_reload(gateway).status_code == 200
    refused_before = reloads(gateway, "refused")
    load = Load(gateway.url)
    load.start()
    try:
        poll_until(lambda: len(load.done) >= 4, timeout_s=10)
        bad = config(workers, second=True)
        bad["server"]["port"] = port
        bad["models"][0]["backends"][1]["weight"] = 0
        write(path, bad)
        # The file watcher refuses it (logged once); the admin call names file and field.
        poll_until(lambda: "config reload (file) refused" in gateway.log(), timeout_s=5)
        response = admin_reload(gateway)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "invalid_config"
        assert error["param"] == "models[0].backends[1].weight"
        assert str(path) in error["message"] and "greater than or equal to 1" in error["message"]
        gateway.popen.send_signal(signal.SIGHUP)
        poll_until(lambda: "config reload (SIGHUP) refused" in gateway.log(), timeout_s=5)
        assert "models[0].backends[1].weight" in gateway.log()
        assert reloads(gateway, "refused") - refused_before == 3
        # The config in force keeps serving.
        assert "both" in model_names(gateway)
        seen = len(load.done)
        poll_until(lambda: len(load.done) >= seen + 4, timeout_s=10)
        # A field needing a restart is named, and the rest applies.
        fixed = config(workers, second=False)
        fixed["server"] = {**fixed["server"], "port": port, "max_in_flight": 9}
        write(path, fixed)
        response = admin_reload(gateway)
        assert response.status_code == 200, response.text
        assert response.json()["restart_required"] == ["server.max_in_flight"]
        assert "both" not in model_names(gateway)
    finally:
        load.finish()
    assert load.failures == []


def test_vgate_up_reloads_on_sighup_and_keeps_its_workers_backends(tmp_path: Path) -> None:
    config: dict[str, Any] = {
        "models": [{"name": "tiny-llama"}],
        "workers": [sim_worker("s1", free_port(), tmp_path)],
    }
    up = start_up(tmp_path, config)
    try:
        s1 = up.worker_pid(config["workers"][0]["port"])
        raw = yaml.safe_load(up.config_path.read_text())
        raw["models"][0]["aliases"] = ["both"]
        write(up.config_path, raw)
        up.popen.send_signal(signal.SIGHUP)
        poll_until(lambda: "config reload (SIGHUP) applied" in up.log(), timeout_s=10)
        assert "kept 1" in up.log()  # s1's backend, its health and pool carried over
        sdk = openai.OpenAI(base_url=up.url + "/v1", api_key=DEMO_KEY, max_retries=0)
        answer = sdk.chat.completions.create(model="both", messages=MESSAGES, max_tokens=2)
        assert answer.choices[0].message.content
        # s1's route timeouts changed: a new backend for it, which the supervisor marks
        # from now on (out of rotation when its worker dies).
        raw["models"][0]["timeouts"] = {"total_s": 100}
        write(up.config_path, raw)
        up.popen.send_signal(signal.SIGHUP)
        poll_until(lambda: up.log().count("config reload (SIGHUP) applied") == 2, timeout_s=10)
        assert "backends added ['s1'], removed ['s1'], kept 0" in up.log()
        os.killpg(s1, signal.SIGKILL)
        poll_until(lambda: "s1" in ready_state(up)["tiny-llama"]["down"], timeout_s=15)
        poll_until(lambda: ready_state(up)["tiny-llama"]["live"] == ["s1"], timeout_s=20)
    finally:
        assert up.stop() == 0
