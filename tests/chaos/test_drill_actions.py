"""The drill's worker actions (kill_worker, pause_worker, resume_worker) on real processes:
`vgate sim` workers on free ports, found by the port they listen on.

A killed worker is dead and the other keeps answering; a paused one accepts connections and
never answers, until it is resumed; a port nobody listens on, a port that is not a number
and a signal that is not one fail the action (ActivityFailed) naming what is wrong.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from chaoslib.exceptions import ActivityFailed

from chaos.drill.actions import kill_worker, pause_worker, resume_worker
from tests.servers import Process, free_port, poll_until, start_sim

# A request to a frozen worker must time out, and soon: this is the bound.
FROZEN_TIMEOUT_S = 1.0
Action = Callable[..., dict[str, Any]]
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def port_of(worker: Process) -> int:
    return int(worker.url.rsplit(":", 1)[1])


def answers(worker: Process) -> bool:
    try:
        response = httpx.post(worker.url + "/v1/chat/completions", json=CHAT, timeout=5)
    except httpx.TransportError:
        return False
    return response.status_code == 200 and bool(response.json()["choices"])


def thaw_and_stop(process: Process) -> None:
    """Whatever a test did to it: a stopped process hears no SIGTERM until it is continued."""
    if process.popen.poll() is None:
        process.popen.send_signal(signal.SIGCONT)
    process.stop()


@pytest.fixture
def workers(logs: Path) -> Iterator[tuple[Process, Process]]:
    """Two sim workers of this test's own: the test may kill or freeze one."""
    first, second = start_sim(logs), start_sim(logs)
    yield first, second
    thaw_and_stop(first)
    thaw_and_stop(second)


def test_kill_worker_kills_exactly_the_worker_on_that_port(
    workers: tuple[Process, Process],
) -> None:
    first, second = workers
    result = kill_worker(port_of(first))
    assert result == {"pid": first.popen.pid, "signal": "SIGKILL"}
    # It returned once the worker was dead: nothing to wait for but the reaping.
    assert first.popen.wait(5) == -signal.SIGKILL
    with pytest.raises(httpx.ConnectError):
        httpx.get(first.url + "/health", timeout=FROZEN_TIMEOUT_S)
    assert second.popen.poll() is None
    assert answers(second)


def test_kill_worker_sends_the_signal_named(workers: tuple[Process, Process]) -> None:
    first, second = workers
    result = kill_worker(port_of(first), signal_name="SIGTERM")
    assert result == {"pid": first.popen.pid, "signal": "SIGTERM"}
    assert first.popen.wait(10) == -signal.SIGTERM  # uvicorn's stop re-raises it: not a kill
    assert answers(second)


def test_a_port_from_a_drills_configuration_may_be_a_string(
    workers: tuple[Process, Process],
) -> None:
    """`port: ${worker_port}` from an environment variable arrives as "8001"."""
    first, second = workers
    assert pause_worker(str(port_of(first))) == {"pid": first.popen.pid}
    assert resume_worker(str(port_of(first))) == {"resumed": [first.popen.pid]}
    assert kill_worker(str(port_of(first)))["pid"] == first.popen.pid
    assert first.popen.wait(5) == -signal.SIGKILL
    assert answers(second)


def test_pause_worker_freezes_it_and_resume_worker_brings_it_back(
    workers: tuple[Process, Process],
) -> None:
    first, second = workers
    assert answers(first)
    assert pause_worker(port_of(first)) == {"pid": first.popen.pid}
    assert psutil.Process(first.popen.pid).status() == psutil.STATUS_STOPPED
    started = time.monotonic()
    # Accepted by the kernel, never answered: a timeout, not a refused connection.
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(first.url + "/health", timeout=FROZEN_TIMEOUT_S)
    assert time.monotonic() - started < FROZEN_TIMEOUT_S + 2
    assert answers(second)  # the other worker is not touched

    assert resume_worker(port_of(first)) == {"resumed": [first.popen.pid]}
    poll_until(lambda: answers(first), timeout_s=10)
    assert first.popen.poll() is None


def test_resume_worker_with_nothing_paused_does_nothing_so_rollbacks_can_always_run(
    workers: tuple[Process, Process],
) -> None:
    first, _ = workers
    assert resume_worker(port_of(first)) == {"resumed": []}  # running, not paused
    assert resume_worker(free_port()) == {"resumed": []}  # nobody there at all
    pause_worker(port_of(first))
    assert resume_worker(port_of(first)) == {"resumed": [first.popen.pid]}
    assert resume_worker(port_of(first)) == {"resumed": []}  # twice: the second has nothing
    assert answers(first)


@pytest.mark.parametrize("action", [kill_worker, pause_worker], ids=["kill", "pause"])
def test_a_port_nobody_listens_on_fails_the_action(action: Action) -> None:
    port = free_port()
    with pytest.raises(ActivityFailed, match=f"no process of this user listens on port {port}"):
        action(port)


@pytest.mark.parametrize("port", ["w1", "", 0, 70000], ids=["name", "empty", "zero", "too-big"])
@pytest.mark.parametrize("action", [kill_worker, pause_worker, resume_worker])
def test_a_port_that_is_not_a_port_number_fails_the_action(action: Action, port: Any) -> None:
    with pytest.raises(ActivityFailed, match=r"^port: .* is not a port number"):
        action(port)


def test_a_signal_that_is_not_one_fails_kill_worker_and_touches_nothing(
    workers: tuple[Process, Process],
) -> None:
    first, _ = workers
    with pytest.raises(ActivityFailed, match="signal_name: 'SIGNOPE' is not a signal"):
        kill_worker(port_of(first), signal_name="SIGNOPE")
    assert answers(first)


# A worker whose forked child shares its listening socket (as `vllm serve
# --api-server-count`, or `vgate serve` with workers): both listen on the port.
FORKING_WORKER = """
import os, socket, sys, time
sock = socket.socket()
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen()
child = os.fork()
if child == 0:
    time.sleep(300)
    os._exit(0)
print(child, flush=True)
time.sleep(300)
"""


@pytest.fixture
def forking_worker() -> Iterator[tuple[int, int, int]]:
    """(port, parent's pid, child's pid)."""
    port = free_port()
    popen = subprocess.Popen(
        [sys.executable, "-c", FORKING_WORKER, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert popen.stdout is not None
        child = int(popen.stdout.readline())
        yield port, popen.pid, child
    finally:
        for pid in (popen.pid, child):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()  # a SIGKILL ends a stopped process too
        popen.wait(5)


def listens(pid: int, port: int) -> bool:
    connections = psutil.Process(pid).net_connections("tcp")
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections)


def test_a_worker_whose_children_share_its_socket_is_found_at_its_top_and_paused_whole(
    forking_worker: tuple[int, int, int],
) -> None:
    """The system's socket list names a shared socket once, under any one of its holders
    (here the child): the action must still find the worker, the parent."""
    port, parent, child = forking_worker
    poll_until(lambda: listens(parent, port) and listens(child, port), timeout_s=10)
    assert pause_worker(port) == {"pid": parent}
    assert psutil.Process(parent).status() == psutil.STATUS_STOPPED
    # SIGSTOP reaches the child a moment after the call returns.
    poll_until(lambda: psutil.Process(child).status() == psutil.STATUS_STOPPED, timeout_s=10)
    assert parent in resume_worker(port)["resumed"]  # the child too: in its family, or itself
    for pid in (parent, child):
        poll_until(lambda pid=pid: psutil.Process(pid).status() != psutil.STATUS_STOPPED)
    assert kill_worker(port) == {"pid": parent, "signal": "SIGKILL"}
    assert not psutil.pid_exists(parent) or psutil.Process(parent).status() == "zombie"
