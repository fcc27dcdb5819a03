"""`vgate up` as a real process for tests: start it, find its workers, check nothing is left."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.servers import KEYS_FILE, REPO, free_port, read_access_log


def sim_command() -> list[str]:
    """`vgate sim` as a worker command: it takes the port and the served name."""
    return [
        sys.executable,
        "-m",
        "gateway.cli.main",
        "sim",
        "--host",
        "{host}",
        "--port",
        "{port}",
        "--model",
        "{served_name}",
    ]


def sim_worker(name: str, port: int, log_dir: Path, **fields: Any) -> dict[str, Any]:
    worker: dict[str, Any] = {
        "name": name,
        "model": "tiny-llama",
        "port": port,
        "command": sim_command(),
        "log_dir": str(log_dir),
        "restart": {"initial_s": 0.2, "max_s": 1.0},
    }
    worker.update(fields)
    return worker


def processes() -> dict[int, tuple[int, int, str, str]]:
    """Every process: pid -> (parent pid, process group, state, command line)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmd:
                cmdline = cmd.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0].decode(), cmdline)
    return table


def descendants(pid: int) -> set[int]:
    table = processes()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        children = {p for p, (ppid, *_rest) in table.items() if ppid in frontier} - found
        found |= children
        frontier = children
    return found


def group_of(pgid: int) -> list[int]:
    """Processes of a process group, zombies included."""
    return [pid for pid, (_ppid, group, _state, _cmd) in processes().items() if group == pgid]


@dataclass
class Up:
    """A running `vgate up`."""

    popen: subprocess.Popen[bytes]
    url: str
    config_path: Path
    log_path: Path  # its stderr: the supervisor's and the gateway's logs
    access_log_path: Path
    config: dict[str, Any] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # the workers', by name

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_log(self) -> list[dict[str, Any]]:
        return read_access_log(self.access_log_path)

    def worker_pid(self, port: int) -> int:
        """The process `vgate up` started for the worker on `port` (its group's leader)."""
        table = processes()
        for pid in descendants(self.popen.pid):
            _ppid, pgid, state, cmdline = table.get(pid, (0, 0, "", ""))
            if pgid == pid and state != "Z" and f"--port {port}" in cmdline:
                return pid
        raise AssertionError(f"no worker process on port {port} under {self.popen.pid}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                for pid in descendants(self.popen.pid):
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
                self.popen.kill()
                self.popen.wait(10)
                raise AssertionError(
                    f"vgate up did not stop in {timeout_s}s:\n{self.log()}"
                ) from None
        return self.popen.returncode


def write_config(log_dir: Path, config: dict[str, Any]) -> tuple[Path, int]:
    # No drain delay unless the test asks (a stop is at once, as for tests.servers' gateways).
    server = {
        "host": "127.0.0.1",
        "port": free_port(),
        "drain_delay_s": 0,
        "access_log_flush_s": 0,  # every line out at once: tests count them
        **config.get("server", {}),
    }
    port = int(server["port"])
    config = {"keys": {"file": str(KEYS_FILE)}, **config, "server": server}
    path = log_dir / f"up-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port


LAUNCHED: list[Up] = []  # every `vgate up` started, for stop_launched()


def stop_launched(since: int = 0) -> None:
    """Stop every `vgate up` launched since LAUNCHED had `since` items (a test that failed
    midway leaves nothing)."""
    while len(LAUNCHED) > since:
        LAUNCHED.pop().stop(timeout_s=30)


def launch(log_dir: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> Up:
    path, port = write_config(log_dir, config)
    log_path = log_dir / f"up-{port}.log"
    access = log_dir / f"up-{port}.access.jsonl"
    with log_path.open("wb") as log, access.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli.main", "up", "--config", str(path)],
            stdout=out,
            stderr=log,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    ports = {w["name"]: int(w["port"]) for w in config.get("workers", [])}
    up = Up(popen, f"http://127.0.0.1:{port}", path, log_path, access, config, ports)
    LAUNCHED.append(up)
    return up


def start_up(
    log_dir: Path,
    config: dict[str, Any],
    *,
    timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
) -> Up:
    """`vgate up` on a free port, returned once its /ready answers 200."""
    up = launch(log_dir, config, env)
    deadline = time.monotonic() + timeout_s
    while True:
        if up.popen.poll() is not None:
            raise RuntimeError(f"vgate up exited with {up.popen.returncode}:\n{up.log()}")
        try:
            if httpx.get(up.url + "/ready", timeout=2.0).status_code == 200:
                return up
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            up.stop()
            raise RuntimeError(f"vgate up not ready after {timeout_s}s:\n{up.log()}")
        time.sleep(0.1)


def ready_state(up: Up) -> dict[str, Any]:
    """/ready's models: {route: {"live": [...], "down": [...]}}."""
    models: dict[str, Any] = httpx.get(up.url + "/ready", timeout=5.0).json()["models"]
    return models
