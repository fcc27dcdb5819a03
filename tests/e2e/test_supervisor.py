"""`vgate up` with `vgate sim` workers: start, serve, restart, stop, and start-up failures.

Real processes throughout; the same supervisor runs real vLLM workers in tests/vllm/.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.servers import DEMO_KEY, free_port, poll_until
from tests.upstack import (
    LAUNCHED,
    Up,
    descendants,
    group_of,
    launch,
    processes,
    ready_state,
    sim_worker,
    start_up,
    stop_launched,
)

MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(autouse=True)
def _stop_what_was_launched() -> Iterator[None]:
    before = len(LAUNCHED)
    yield
    stop_launched(since=before)


def two_sims(log_dir: Path, **route: object) -> dict[str, object]:
    return {
        "models": [{"name": "tiny-llama", "aliases": ["default"], **route}],
        "workers": [
            sim_worker("s1", free_port(), log_dir),
            sim_worker("s2", free_port(), log_dir),
            sim_worker("e1", free_port(), log_dir, model="tiny-embed"),
        ],
    }


def client_for(up: Up) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=30)


def assert_nothing_left(up: Up, pids: set[int]) -> None:
    """No process `vgate up` started is left: none of them, none of their groups."""
    deadline = time.monotonic() + 15
    while True:
        table = processes()
        left = {pid: table[pid] for pid in pids if pid in table}
        left.update({pid: table[pid] for pgid in pids for pid in group_of(pgid)})
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"left behind: {left}\n{up.log()}"


def test_up_starts_the_workers_registers_them_and_serves(tmp_path: Path) -> None:
    config = two_sims(tmp_path)
    up = start_up(tmp_path, config)
    try:
        assert ready_state(up) == {
            "tiny-llama": {"live": ["s1", "s2"], "down": []},
            "tiny-embed": {"live": ["e1"], "down": []},  # a route the worker created
        }
        client = client_for(up)
        backends = collections.Counter()
        for _ in range(4):
            raw = client.chat.completions.with_raw_response.create(
                model="default", messages=MESSAGES, max_tokens=3
            )
            assert raw.parse().usage.completion_tokens == 3
            backends[raw.headers["x-vgate-backend"]] += 1
        assert backends == {"s1": 2, "s2": 2}
        raw = client.embeddings.with_raw_response.create(model="tiny-embed", input="hi")
        assert raw.headers["x-vgate-backend"] == "e1"
        # One log file per worker, holding that worker's own output.
        for name in ("s1", "s2", "e1"):
            text = (tmp_path / f"{name}.log").read_text()
            assert "=== vgate " in text and f"starting {name}:" in text
    finally:
        assert up.stop() == 0


def test_a_killed_worker_leaves_rotation_restarts_and_rejoins(tmp_path: Path) -> None:
    config = two_sims(tmp_path)
    s1_port = config["workers"][0]["port"]  # type: ignore[index]
    up = start_up(tmp_path, config)
    client = client_for(up)
    try:
        first = up.worker_pid(s1_port)
        # Load through the kill: every request must succeed, on s2 while s1 is away.
        results: list[str] = []
        errors: list[BaseException] = []
        done = threading.Event()

        def load() -> None:
            while not done.is_set():
                try:
                    raw = client.chat.completions.with_raw_response.create(
                        model="default", messages=MESSAGES, max_tokens=2
                    )
                    results.append(raw.headers["x-vgate-backend"])
                except Exception as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        poll_until(lambda: len(results) >= 8 or errors)  # the load is running
        os.killpg(first, signal.SIGKILL)  # a crash: no goodbye
        poll_until(lambda: "s1" in ready_state(up)["tiny-llama"]["down"], timeout_s=15)
        served_while_down = len(results)
        # Restarted (backoff 0.1-0.2 s), ready again, back in rotation.
        poll_until(lambda: ready_state(up)["tiny-llama"]["live"] == ["s1", "s2"], timeout_s=20)
        second = up.worker_pid(s1_port)
        assert second != first
        after = len(results)
        poll_until(lambda: "s1" in results[after:], timeout_s=10)
        done.set()
        for thread in threads:
            thread.join(30)
        assert not errors, errors[:3]
        assert served_while_down > 0
        log = up.log()
        assert "worker s1 died: killed by SIGKILL from outside vgate (not the OOM killer)" in log
        assert "worker s1: restarting in" in log
    finally:
        done.set()
        assert up.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_stops_the_workers_and_leaves_nothing(
    tmp_path: Path, sig: signal.Signals
) -> None:
    config = two_sims(tmp_path)
    for worker in config["workers"]:  # type: ignore[attr-defined]
        worker["args"] = ["--tokens-per-s", "20"]  # 20 tokens: about 1 s
    up = start_up(tmp_path, config)
    started = descendants(up.popen.pid)
    assert len([p for p in started if processes()[p][1] == p]) == 3  # three worker groups
    client = client_for(up)
    stream = client.chat.completions.create(
        model="default", messages=MESSAGES, max_tokens=20, stream=True
    )
    chunks = iter(stream)
    first = next(chunks)
    up.popen.send_signal(sig)
    rest = list(chunks)  # the gateway drains: the stream in flight finishes whole
    assert rest[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in [first, *rest] if c.choices)
    assert text
    assert up.stop(timeout_s=30) == 0
    assert_nothing_left(up, started)
    log = up.log()
    assert log.index("stopping the workers") < log.index("workers stopped")


def test_sigterm_leaves_rotation_first_then_stops_the_workers(tmp_path: Path) -> None:
    """As `vgate serve`: during the drain delay /ready says draining while requests are
    still served; then the gateway stops and the workers after it."""
    config = two_sims(tmp_path)
    config["server"] = {"drain_delay_s": 2}
    up = start_up(tmp_path, config)
    started = descendants(up.popen.pid)
    client = client_for(up)
    up.popen.send_signal(signal.SIGTERM)
    poll_until(lambda: httpx.get(up.url + "/ready", timeout=5).status_code == 503)
    assert httpx.get(up.url + "/ready", timeout=5).json()["status"] == "draining"
    reply = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=2)
    assert reply.choices[0].finish_reason is not None  # still served while draining
    assert up.stop(timeout_s=30) == 0
    assert_nothing_left(up, started)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other process listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_a_taken_port_is_a_clear_start_up_error(tmp_path: Path, taken_port: int) -> None:
    config = two_sims(tmp_path)
    config["workers"][1]["port"] = taken_port  # type: ignore[index]
    up = launch(tmp_path, config)
    assert up.popen.wait(30) == 1
    log = up.log()
    assert (
        f"vgate: worker s2 failed to start: port {taken_port} is taken:"
        f" another process listens on 127.0.0.1:{taken_port}"
    ) in log
    assert not descendants(up.popen.pid)


def test_a_missing_model_is_reported_with_the_log_tail(tmp_path: Path) -> None:
    # What transformers says about a folder that is not a model, then the exit.
    script = (
        "import sys; print('INFO loading the model'); "
        "sys.exit('OSError: /models/llama does not appear to have a file named config.json')"
    )
    config = two_sims(tmp_path)
    config["workers"][0].update(  # type: ignore[index]
        command=[sys.executable, "-c", script, "{model}"], model="llama-hub-name"
    )
    up = launch(tmp_path, config)
    assert up.popen.wait(30) == 1
    log = up.log()
    assert (
        "vgate: worker s1 failed to start: model not found: 'llama-hub-name' (exit status 1)" in log
    )
    assert f"last lines of {tmp_path / 's1.log'}:" in log
    assert "| INFO loading the model" in log
    assert "| OSError: /models/llama does not appear to have a file named config.json" in log


def test_a_model_path_that_does_not_exist_is_refused_before_starting(tmp_path: Path) -> None:
    config = two_sims(tmp_path)
    config["workers"][2].update(  # type: ignore[index]
        model=str(tmp_path / "no-such-model"),
        served_name="tiny-embed",
        args=["--model-path", "{model}"],
    )
    up = launch(tmp_path, config)
    assert up.popen.wait(30) == 1
    assert (
        f"worker e1 failed to start: model not found: {tmp_path / 'no-such-model'} does not exist"
        in up.log()
    )


def test_a_worker_never_ready_is_stopped_and_reported(tmp_path: Path) -> None:
    script = "import time; print('still loading', flush=True); time.sleep(600)"
    config = two_sims(tmp_path)
    config["workers"][1].update(  # type: ignore[index]
        command=[sys.executable, "-c", script], ready_timeout_s=2, stop_timeout_s=1
    )
    up = launch(tmp_path, config)
    assert up.popen.wait(30) == 1
    log = up.log()
    assert "vgate: worker s2 failed to start: not ready after 2s (GET http://127.0.0.1:" in log
    assert "| still loading" in log
    assert not [cmd for _p, (*_r, cmd) in processes().items() if "still loading" in cmd]


def test_the_gateway_port_taken_fails_before_starting_workers(
    tmp_path: Path, taken_port: int
) -> None:
    config = two_sims(tmp_path)
    config["server"] = {"port": taken_port}
    up = launch(tmp_path, config)
    assert up.popen.wait(30) == 1
    assert f"vgate: the gateway cannot listen: port {taken_port} is taken" in up.log()
    assert not (tmp_path / "s1.log").exists()  # no worker was started


def test_up_needs_a_workers_section(tmp_path: Path) -> None:
    config = two_sims(tmp_path)
    config["models"] = [
        {"name": "m", "backends": [{"name": "b", "provider": "vllm", "url": "http://127.0.0.1:1"}]}
    ]
    del config["workers"]
    up = launch(tmp_path, config)
    assert up.popen.wait(30) == 2
    assert "has no workers: section" in up.log()


def test_ctrl_c_while_the_workers_start_stops_them(tmp_path: Path) -> None:
    script = "import time; print('loading', flush=True); time.sleep(600)"
    config = two_sims(tmp_path)
    config["workers"][1].update(command=[sys.executable, "-c", script])  # type: ignore[index]
    up = launch(tmp_path, config)
    log = tmp_path / "s2.log"
    poll_until(lambda: log.exists() and "loading" in log.read_text(), timeout_s=30)
    # The three workers are spawned in turn: s2 may print before e1 exists.
    started = poll_until(lambda: len(pids := descendants(up.popen.pid)) == 3 and pids, timeout_s=30)
    assert up.stop(signal.SIGINT, timeout_s=30) == 0
    assert "interrupted while the workers start: stopping them" in up.log()
    assert_nothing_left(up, started)
