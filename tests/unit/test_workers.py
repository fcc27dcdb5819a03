"""server.workers: its bounds, the warning without Redis, and the parent's restart budget
(real forked children that die as a broken worker would)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.cli.main import workers_warnings
from gateway.config import GatewayConfig, ServerConfig
from gateway.runtime import workers as workers_module
from gateway.runtime.workers import MAX_CRASHES, Workers

MODELS = [{"name": "m", "backends": [{"name": "b", "provider": "vllm", "url": "http://x:1"}]}]
KEYS = {"file": "config/keys.yaml"}


@pytest.mark.parametrize("count", [0, -1, 65])
def test_workers_out_of_bounds_is_refused(count: int) -> None:
    with pytest.raises(ValidationError, match="workers"):
        ServerConfig(workers=count)


def test_several_workers_without_redis_warn() -> None:
    alone = GatewayConfig.model_validate({"keys": KEYS, "models": MODELS, "server": {"workers": 4}})
    [warning] = workers_warnings(alone, alone.server)
    assert "server.workers is 4 but there is no redis" in warning and "4x" in warning
    shared = GatewayConfig.model_validate(
        {
            "keys": KEYS,
            "models": MODELS,
            "server": {"workers": 4},
            "redis": {"url": "redis://127.0.0.1:1"},
        }
    )
    assert workers_warnings(shared, shared.server) == []
    one = GatewayConfig.model_validate({"keys": KEYS, "models": MODELS})
    assert workers_warnings(one, one.server) == []


def _dies(status: int, counter: Path) -> Callable[..., int]:
    def run(
        index: int, sock: socket.socket | None, channel: object, death_fd: int, run_dir: str
    ) -> int:
        with counter.open("a") as starts:
            starts.write(f"{index}\n")
        return status

    return run


def test_a_worker_that_keeps_dying_stops_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers_module, "_backoff_s", lambda recent: 0.01)
    starts = tmp_path / "starts"
    parent = Workers(1, _dies(1, starts), listener=None, run_dir=str(tmp_path), balance="shared")
    began = time.monotonic()
    assert parent.run() == 1
    assert time.monotonic() - began < 30
    # The first start and MAX_CRASHES replacements; the death after those ends it.
    assert len(starts.read_text().split()) == MAX_CRASHES + 1


def test_an_invalid_configuration_stops_at_once(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    parent = Workers(2, _dies(2, starts), listener=None, run_dir=str(tmp_path), balance="shared")
    assert parent.run() == 2
    # Nobody was restarted. (The second worker may not have started before the first's
    # exit stopped the server: stopping at once is the point.)
    started = starts.read_text().split()
    assert started and len(started) == len(set(started)) and set(started) <= {"0", "1"}


def test_workers_that_exit_cleanly_while_stopping_exit_0(tmp_path: Path) -> None:
    """A SIGTERM to the parent reaches each worker; the parent exits 0 once all have."""

    def run(
        index: int, sock: socket.socket | None, channel: object, death_fd: int, run_dir: str
    ) -> int:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        (tmp_path / f"up-{index}").touch()
        while True:
            time.sleep(1)

    parent = Workers(2, run, listener=None, run_dir=str(tmp_path), balance="shared")

    def stop_when_up() -> None:
        deadline = time.monotonic() + 20
        while not all((tmp_path / f"up-{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_up, daemon=True).start()
    assert parent.run() == 0
