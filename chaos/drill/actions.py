"""The vgate extension's actions for Chaos Toolkit drill files.

In a drill's method or rollbacks::

    - type: action
      name: backend-w1-down
      provider:
        type: python
        module: chaos.drill.actions
        func: start_experiment
        arguments: {name: outage, fault: {kind: refuse}, backends: [w1], duration_s: 30}

Each action does one thing to the gateway or what it stands on, and fails (ActivityFailed,
which fails the drill) when that thing did not happen: a drill whose fault was never made
must not pass. Those that undo something (stop_experiment, restore_config, start_redis,
resume_worker) succeed when there is nothing left to undo, so rollbacks can always run.

They run on Chaos Toolkit's thread, synchronously: plain blocking calls are right here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
from chaoslib.exceptions import ActivityFailed

from chaos.drill.session import DrillSession, session_of

__all__ = [
    "exhaust_quota",
    "kill_worker",
    "pause_worker",
    "reload_config",
    "restore_config",
    "resume_worker",
    "start_experiment",
    "start_redis",
    "stop_experiment",
    "stop_redis",
    "swap_config",
]

ADMIN_TIMEOUT_S = 30.0
BACKUP_SUFFIX = ".drill-backup"
SIGNAL_TIMEOUT_S = 10.0  # for a SIGKILL or SIGSTOP to show in the process table


def start_experiment(
    name: str,
    fault: dict[str, Any],
    routes: list[str] | str | None = None,
    backends: list[str] | str | None = None,
    keys: list[str] | str | None = None,
    rate: float = 1.0,
    duration_s: float | None = None,
    start_after_s: float = 0.0,
    seed: int = 0,
    configuration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Starts a chaos experiment on the gateway (`PUT /admin/chaos/{name}`). Targets are
    lists of names, or one string of names separated by commas (from an environment
    variable, through the drill's configuration)."""
    body: dict[str, Any] = {"fault": fault, "rate": rate, "seed": seed}
    body.update(start_after_s=start_after_s, routes=_names(routes), backends=_names(backends))
    body.update(keys=_names(keys))
    if duration_s is not None:
        body["duration_s"] = duration_s
    return _admin(configuration, "PUT", f"/admin/chaos/{name}", json=body)


def stop_experiment(name: str, configuration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stops a chaos experiment; one already ended (or never started) is nothing to stop."""
    return _admin(configuration, "DELETE", f"/admin/chaos/{name}", missing_ok=True)


def reload_config(
    expect: str = "applied", configuration: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`POST /admin/config/reload`; `expect` "applied", or "refused" for a bad config
    (which must be refused with its reason while the old one serves on)."""
    if expect not in ("applied", "refused"):
        raise ActivityFailed(f"expect: {expect!r} is neither 'applied' nor 'refused'")
    response = _admin_response(configuration, "POST", "/admin/config/reload")
    if expect == "refused":
        if response.status_code != 400:
            raise ActivityFailed(
                f"the config was meant to be refused, but the reload answered "
                f"{response.status_code}: {response.text[:300]}"
            )
        return dict(response.json()["error"])
    if response.status_code != 200:
        raise ActivityFailed(f"the reload answered {response.status_code}: {response.text[:300]}")
    return dict(response.json())


def swap_config(
    replacement: str, expect: str = "applied", configuration: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Writes `replacement` (a path relative to the drill file) over the gateway's config
    file, keeping the original beside it for `restore_config`, then reloads."""
    session = session_of(configuration)
    served = _config_file(session)
    source = (session.drill_dir / replacement).resolve()
    if not source.is_file():
        raise ActivityFailed(f"replacement: {source} is not a file")
    backup = served.with_name(served.name + BACKUP_SUFFIX)
    if not backup.exists():  # a second swap keeps the first original
        shutil.copy2(served, backup)
    _replace(served, source.read_bytes())
    return reload_config(expect, configuration)


def restore_config(configuration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Puts back the config `swap_config` replaced and reloads it (nothing swapped: nothing
    to do)."""
    session = session_of(configuration)
    served = _config_file(session)
    backup = served.with_name(served.name + BACKUP_SUFFIX)
    if not backup.exists():
        return {"restored": False}
    _replace(served, backup.read_bytes())
    backup.unlink()
    return {"restored": True, **reload_config("applied", configuration)}


def exhaust_quota(
    key_env: str,
    model: str = "default",
    max_requests: int = 1000,
    configuration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sends small requests with the key in environment variable `key_env` until the
    gateway refuses it for its limits: 429 (a rate) or 403 `insufficient_quota` (a quota
    spent); fails if it never does within `max_requests`."""
    session = session_of(configuration)
    key = os.environ.get(key_env)
    if not key:
        raise ActivityFailed(f"key_env: the environment variable {key_env} is not set")
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=session.target.url, timeout=ADMIN_TIMEOUT_S) as client:
        for sent in range(1, max_requests + 1):
            response = client.post("/v1/chat/completions", json=body, headers=headers)
            if response.status_code == 200:
                continue
            code = _error_code(response)
            if response.status_code == 429 or code == "insufficient_quota":
                return {"requests": sent, "status": response.status_code, "code": code}
            raise ActivityFailed(
                f"request {sent} answered {response.status_code}: {response.text[:300]}"
            )
    raise ActivityFailed(f"the key was not refused after {max_requests} requests")


def kill_worker(
    port: int | str, signal_name: str = "SIGKILL", configuration: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Sends `signal_name` to the process listening on `port` (a worker; `vgate up`
    restarts its own). A SIGKILL returns once that process is dead; another signal (SIGTERM:
    a graceful stop) once it is sent. `port` may be a string (a drill's configuration from
    an environment variable)."""
    number, signum = _port(port), _signal(signal_name)
    pid = _listener(number)
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        raise ActivityFailed(f"the process listening on port {number} ({pid}) is gone") from None
    if signum == signal.SIGKILL:
        _wait(lambda: not _alive(pid), SIGNAL_TIMEOUT_S, f"{pid} lives on after SIGKILL")
    return {"pid": pid, "signal": signal_name}


def pause_worker(port: int | str, configuration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Freezes the worker listening on `port` and its children (SIGSTOP): connections are
    accepted by the kernel and never answered, the hardest outage to see. Returns once it
    is stopped."""
    number = _port(port)
    pid = _listener(number)
    for process in _family(pid):
        process.send_signal(signal.SIGSTOP)
    _wait(lambda: _stopped(pid), SIGNAL_TIMEOUT_S, f"{pid} is not stopped after SIGSTOP")
    return {"pid": pid}


def resume_worker(port: int | str, configuration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Thaws what `pause_worker` froze (SIGCONT to every stopped process that listens on
    `port`, and its children); none stopped: nothing to do."""
    number = _port(port)
    resumed = []
    for process in psutil.process_iter(["status"]):
        if process.info["status"] != psutil.STATUS_STOPPED:
            continue
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if any(c.laddr and c.laddr.port == number for c in process.net_connections("tcp")):
                for member in _family(process.pid):
                    member.send_signal(signal.SIGCONT)
                resumed.append(process.pid)
    return {"resumed": resumed}


def stop_redis(port: int, configuration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Shuts down the Redis server on 127.0.0.1:`port` without saving (SHUTDOWN NOSAVE)."""
    client = redis.Redis(port=port, socket_timeout=5)
    try:
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # the answer to SHUTDOWN is the connection closing
    finally:
        client.close()
    _wait(lambda: not _redis_answers(port), 10.0, f"Redis on port {port} still answers")
    return {"port": port}


def start_redis(port: int, configuration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Starts an empty Redis server on 127.0.0.1:`port` (nothing on disk), if none answers
    there; returns once it answers PING."""
    if _redis_answers(port):
        return {"port": port, "started": False}
    binary = shutil.which("redis-server")
    if binary is None:
        raise ActivityFailed("redis-server is not on the PATH")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    subprocess.Popen(  # outlives the drill: the stack that runs it stops it
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _wait(lambda: _redis_answers(port), 10.0, f"Redis on port {port} did not start")
    return {"port": port, "started": True}


def _error_code(response: httpx.Response) -> str | None:
    try:
        error = response.json().get("error")
    except ValueError:
        return None
    return str(error.get("code")) if isinstance(error, dict) else None


def _names(names: list[str] | str | None) -> list[str]:
    if isinstance(names, str):
        return [name.strip() for name in names.split(",") if name.strip()]
    return list(names or [])


def _config_file(session: DrillSession) -> Path:
    if session.target.config_file is None:
        raise ActivityFailed("the drill needs the gateway's config file: `vgate drill --config`")
    return session.target.config_file


def _replace(path: Path, content: bytes) -> None:
    """Writes the whole file at once, so the gateway's file watcher never reads half of it."""
    partial = path.with_name(path.name + ".drill-partial")
    partial.write_bytes(content)
    partial.replace(path)


def _admin_response(
    configuration: dict[str, Any] | None, method: str, path: str, **kwargs: Any
) -> httpx.Response:
    target = session_of(configuration).target
    if not target.admin_key:
        raise ActivityFailed("the drill needs the gateway's admin key: `vgate drill --admin-key`")
    headers = {"Authorization": f"Bearer {target.admin_key}"}
    try:
        with httpx.Client(base_url=target.url, timeout=ADMIN_TIMEOUT_S) as client:
            return client.request(method, path, headers=headers, **kwargs)
    except httpx.HTTPError as error:
        raise ActivityFailed(f"{method} {path}: {type(error).__name__}: {error}") from None


def _admin(
    configuration: dict[str, Any] | None,
    method: str,
    path: str,
    *,
    missing_ok: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    response = _admin_response(configuration, method, path, **kwargs)
    if missing_ok and response.status_code == 404:
        return {"found": False}
    if response.status_code != 200:
        raise ActivityFailed(
            f"{method} {path} answered {response.status_code}: {response.text[:300]}"
        )
    return dict(response.json())


def _port(value: int | str) -> int:
    """A port number; a drill's configuration substitutes strings (environment variables)."""
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ActivityFailed(f"port: {value!r} is not a port number") from None
    if not 0 < port < 65536:
        raise ActivityFailed(f"port: {value!r} is not a port number (1 to 65535)")
    return port


def _listener(port: int) -> int:
    """The process that listens on `port`. A worker whose forked children share its socket
    (`vllm serve --api-server-count`) shows the socket once, under any of them: its topmost
    holder is the worker."""
    pids = [
        int(connection.pid)
        for connection in psutil.net_connections("tcp")
        if connection.status == psutil.CONN_LISTEN
        and connection.laddr
        and connection.laddr.port == port
        and connection.pid is not None
    ]
    if not pids:
        raise ActivityFailed(f"no process of this user listens on port {port}")
    pid = min(pids)
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(pid).parent()
        while parent is not None and _listens(parent, port):
            pid, parent = parent.pid, parent.parent()
    return pid


def _listens(process: psutil.Process, port: int) -> bool:
    try:
        connections = process.net_connections("tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections
    )


def _alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (dead, not yet reaped by its parent) does not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


def _family(pid: int) -> list[psutil.Process]:
    process = psutil.Process(pid)
    return [process, *process.children(recursive=True)]


def _signal(name: str) -> signal.Signals:
    try:
        return signal.Signals[name]
    except KeyError:
        raise ActivityFailed(f"signal_name: {name!r} is not a signal") from None


def _redis_answers(port: int) -> bool:
    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _wait(done: Any, timeout_s: float, failure: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise ActivityFailed(failure)
        time.sleep(0.05)
