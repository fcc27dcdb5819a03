"""Real servers for tests: `vgate sim` and `vgate serve` as subprocesses on free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

REPO = Path(__file__).resolve().parent.parent
DEMO_KEY = "vg-demo-0123456789abcdef"
KEYS_FILE = REPO / "config" / "keys.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def spawn(
    name: str,
    args: Sequence[str],
    *,
    port: int,
    log_dir: Path,
    ready_path: str = "/health",
    stdout_path: Path | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> Process:
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("wb")
    out = stdout_path.open("wb") if stdout_path is not None else log_file
    popen = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli.main", *args],
        stdout=out,
        stderr=log_file,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    process = Process(name, popen, log_path, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + timeout_s
    while True:
        if popen.poll() is not None:
            raise RuntimeError(f"{name} exited with {popen.returncode}:\n{process.log()}")
        try:
            if httpx.get(process.url + ready_path, timeout=1.0).status_code < 500:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(f"{name} not ready after {timeout_s}s:\n{process.log()}")
        time.sleep(0.05)


def start_sim(
    log_dir: Path, *, models: Sequence[str] = ("tiny-llama", "tiny-embed"), **options: Any
) -> Process:
    port = free_port()
    args = ["sim", "--port", str(port)]
    for model in models:
        args += ["--model", model]
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            args.append(flag)  # a switch
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return spawn(f"sim-{port}", args, port=port, log_dir=log_dir)


def backend(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "provider": "vllm", "url": url, **extra}


def gateway_config(models: list[dict[str, Any]], **server: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", **server},
        "keys": {"file": str(KEYS_FILE)},
        "models": models,
    }


def read_access_log(path: Path) -> list[dict[str, Any]]:
    """The access log's whole lines, parsed. The gateway may be writing the last line as it is
    read, and a read racing a write can see part of it: that line is left for the next read."""
    lines = path.read_bytes().split(b"\n")[:-1]
    return [orjson.loads(line) for line in lines if line.strip()]


@dataclass
class Gateway(Process):
    access_log_path: Path | None = None

    def access_log(self) -> list[dict[str, Any]]:
        assert self.access_log_path is not None
        return read_access_log(self.access_log_path)

    def wait_for_log(self, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """The access log once it holds at least `count` lines; fails after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            entries = self.access_log()
            if len(entries) >= count:
                return entries
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: {len(entries)} access-log lines after {timeout_s}s, "
                    f"expected at least {count}"
                )
            time.sleep(0.02)


def start_gateway(
    log_dir: Path, config: dict[str, Any], env: dict[str, str] | None = None
) -> Gateway:
    port = free_port()
    # No drain delay (a test that wants one sets it): a stop is at once, as before the drain.
    # No drain delay (a test stops its gateway at once) and every access-log line out at once
    # (tests count the lines a test's requests wrote: none may lag into the next test).
    server = {"drain_delay_s": 0, "access_log_flush_s": 0, **config.get("server", {})}
    config = {**config, "server": {**server, "port": port}}
    config_path = log_dir / f"gateway-{port}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    access_log = log_dir / f"gateway-{port}.access.jsonl"
    process = spawn(
        f"gateway-{port}",
        ["serve", "--config", str(config_path)],
        port=port,
        log_dir=log_dir,
        stdout_path=access_log,
        env=env,
    )
    return Gateway(process.name, process.popen, process.log_path, process.url, access_log)


@dataclass
class RedisServer(Process):
    port: int = 0

    def kill(self) -> None:
        """Die at once, as a crashed server does: no goodbye to its clients."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


def start_redis(
    log_dir: Path,
    *,
    port: int | None = None,
    timeout_s: float = 10.0,
    extra_args: Sequence[str] = (),
) -> RedisServer:
    """A real, empty redis-server of the tests' own (nothing on disk) on a free port, or
    on `port` to bring one back where its clients expect it. `extra_args`: more of
    redis-server's options (`--unixsocket PATH`, `--requirepass` makes PING answer NOAUTH,
    which still proves the server up)."""
    port = port if port is not None else free_port()
    log_path = log_dir / f"redis-{port}.log"
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += extra_args
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            ["redis-server", *args], stdout=log, stderr=subprocess.STDOUT, cwd=log_dir
        )
    server = RedisServer(f"redis-{port}", popen, log_path, f"redis://127.0.0.1:{port}", port)
    deadline = time.monotonic() + timeout_s
    while True:
        if popen.poll() is not None:
            raise RuntimeError(f"redis-server exited with {popen.returncode}:\n{server.log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"redis-server not ready after {timeout_s}s:\n{server.log()}")
        time.sleep(0.01)


def poll_until(predicate: Any, timeout_s: float = 30.0, interval_s: float = 0.02) -> Any:
    """Call `predicate` until it returns something truthy; fail after `timeout_s` (generous:
    a slow, loaded CI machine must not fail a condition that does come true)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last: {result!r})")
        time.sleep(interval_s)


def sim_gauge(sim_url: str, name: str) -> float:
    """Sum of a gauge over its label sets in a worker's /metrics."""
    total = 0.0
    for line in httpx.get(sim_url + "/metrics", timeout=2).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def iter_stop(processes: Iterator[Process]) -> None:
    for process in processes:
        process.stop()
