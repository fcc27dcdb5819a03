"""The processes a benchmark run starts: pinned to a core, on a free port, always stopped.

Every child is started with a parent-death signal, so that even a `kill -9` of the
benchmark leaves no server or load generator behind; `Processes.stop_all` is the normal way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """Something that makes the run's numbers worthless: reported, and the run fails."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cores() -> int:
    return len(os.sched_getaffinity(0))


def pinned(core: int | None, argv: Sequence[str]) -> list[str]:
    """`argv` under `taskset -c core` (taskset execs, so the pid stays the process's own)."""
    if core is None or shutil.which("taskset") is None:
        return list(argv)
    return ["taskset", "-c", str(core), *argv]


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads, live or gone), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def wait_http_ok(
    url: str, *, timeout_s: float, alive: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll `url` until it answers 2xx; bounded by `timeout_s`, and by the process staying up."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise BenchError(f"process exited with {alive.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                if 200 <= response.status < 300:
                    return
                last = f"status {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.05)
    raise BenchError(f"{url} not ready after {timeout_s:.0f}s ({last})")


def wait_redis_ok(port: int, *, timeout_s: float, alive: subprocess.Popen[bytes]) -> None:
    """Poll a redis-server with PING until it answers PONG; bounded, and by it staying up."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if alive.poll() is not None:
            raise BenchError(f"redis-server exited with {alive.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                answer = sock.recv(64)
                if answer.startswith(b"+PONG"):
                    return
                last = repr(answer)
        except OSError as exc:
            last = str(exc)
        time.sleep(0.02)
    raise BenchError(f"redis-server on port {port} not ready after {timeout_s:.0f}s ({last})")


@dataclass
class Server:
    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Processes:
    """Owns every child process of the run; `stop_all` (in a `finally`) ends them all."""

    log_dir: Path
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def popen(
        self,
        argv: Sequence[str],
        *,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=cwd,
            preexec_fn=_die_with_parent,  # the orchestrator starts no threads
        )
        self.children.append(child)
        return child

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a command to completion (a load generator), bounded, stopped if it overruns."""
        child = self.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
        try:
            out, err = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{argv[0]} ran past {timeout_s:.0f}s: {' '.join(argv)}") from None
        finally:
            self.stop(child)  # a no-op once it has exited; else (timeout, Ctrl-C) ends it
        return subprocess.CompletedProcess(list(argv), child.returncode, out, err)

    def server(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int,
        ready_path: str = "/health",
        stdout_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout_s: float = 30.0,
    ) -> Server:
        """Start a server and wait (bounded) until it answers on 127.0.0.1:`port`."""
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log, contextlib.ExitStack() as stack:
            out = stack.enter_context(stdout_path.open("wb")) if stdout_path else log
            child = self.popen(argv, stdout=out, stderr=log, env=env, cwd=cwd)
        server = Server(name, child, f"http://127.0.0.1:{port}", log_path)
        try:
            wait_http_ok(server.url + ready_path, timeout_s=timeout_s, alive=child)
        except BenchError as exc:
            raise BenchError(f"{name} did not start: {exc}\n{server.log_tail()}") from None
        return server

    def redis(self, name: str, core: int | None, *, timeout_s: float = 10.0) -> Server | None:
        """An empty redis-server of the run's own (nothing on disk) on a free port, pinned to
        `core`; None when redis-server is not installed (the caller skips what needs it)."""
        binary = shutil.which("redis-server")
        if binary is None:
            return None
        port = free_port()
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            child = self.popen(
                pinned(core, [binary, *args]),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.log_dir,
            )
        server = Server(name, child, f"redis://127.0.0.1:{port}", log_path)
        try:
            wait_redis_ok(port, timeout_s=timeout_s, alive=child)
        except BenchError as exc:
            raise BenchError(f"{name} did not start: {exc}\n{server.log_tail()}") from None
        return server

    def stop(self, child: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
            try:
                child.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                child.wait(5)
        self.forget(child)

    def forget(self, child: subprocess.Popen[bytes]) -> None:
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child)
