"""Run `vllm serve` workers for `vgate up`: start, wait until ready, restart, stop.

One asyncio task per worker owns its process:

- **start**: the port is checked free and a model given as a path checked present first; then
  the command runs in its own process group (in the gateway's session: see
  deploy/vllm/README.md, "1-second stalls"), stdout and stderr appended to
  `<log_dir>/<name>.log`. It is ready when `GET /health` answers 200.
- **ready**: `on_change(name, True)`: the gateway puts its backend in rotation.
- **died**: `on_change(name, False)` at once (its backend leaves rotation), what is left of
  its process group is stopped, the cause is logged with the log's last lines, and it is
  started again after a capped exponential backoff with jitter. More than
  `restart.max_restarts_per_window` restarts within `restart.window_s` and it is given up on,
  loudly; the gateway serves on with the other workers.
- **stop** (`aclose`): SIGTERM to the worker's own process (vLLM's API server stops its
  engine and workers in order), `stop_timeout_s`, then SIGKILL to the whole group; it returns
  once no process of the group is left, zombies included.

A worker that fails to start is described by a `WorkerFailure`: what went wrong in words
(port taken, model not found, out of memory, not ready in time, exit status), read from its
exit and its log, and the log's last lines. `start()` fails fast on the first one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.config import WorkerConfig
from gateway.errors import UpstreamBroken, UpstreamConnectError
from providers.http1 import ConnectionPool

logger = logging.getLogger("vgate.supervisor")

REPO = Path(__file__).resolve().parents[2]  # gateway/runtime/supervisor.py → the checkout
TAIL_LINES = 20  # shown in a failure report
SCAN_LINES = 300  # searched for the cause
TAIL_BYTES = 256 * 1024  # of the log, read for those lines
PROBE_INTERVAL_S = 0.5  # GET /health while a worker starts
EXIT_POLL_S = 0.1  # how soon a death is noticed

# What a worker's log says, searched from the end, in this order.
_PORT_TAKEN = re.compile(r"address already in use|\[errno 98\]|eaddrinuse", re.I)
_OUT_OF_MEMORY = re.compile(
    r"out of memory|outofmemoryerror|cannot allocate memory|\bmemoryerror\b|bad_alloc"
    r"|no available memory for the cache blocks|insufficient memory|\bOOM\b|(^|\s)Killed(\s|$)",
    re.I | re.M,
)
_MODEL_NOT_FOUND = re.compile(
    r"does not appear to have a file named|localentrynotfounderror"
    r"|cannot find an appropriate cached snapshot|repositorynotfounderror|repository not found"
    r"|hfvalidationerror|repo id must be|is not a local folder and is not a valid model identifier"
    r"|gatedrepoerror|\bmodel\b.{0,120}\b(not found|does not exist)\b",
    re.I,
)


# uvicorn's access lines for the gateway's own polling: left out of tails (they would be all
# of them); vLLM's `--disable-access-log-for-endpoints /health,/metrics` leaves them out of logs.
_POLLING = re.compile(r'"GET /(health|metrics|v1/models) HTTP/1\.[01]" \d{3}')


def default_command() -> list[str]:
    """`vllm serve {model} ...`: the checkout's CPU build where deploy/vllm/install.sh put it
    (its `vllm` script cannot start: see deploy/vllm/serve.py), else `vllm` on the PATH."""
    python = REPO / ".venv-vllm" / "bin" / "python"
    launcher = REPO / "deploy" / "vllm" / "serve.py"
    program = [str(python), str(launcher)] if python.is_file() and launcher.is_file() else ["vllm"]
    return [
        *program,
        "serve",
        "{model}",
        "--served-model-name",
        "{served_name}",
        "--host",
        "{host}",
        "--port",
        "{port}",
    ]


def command_line(worker: WorkerConfig) -> list[str]:
    """The worker's argv: its command (or the default) and args, placeholders filled in."""
    values = {
        "name": worker.name,
        "model": worker.model,
        "served_name": worker.model_name,
        "host": worker.host,
        "port": str(worker.port),
    }
    template = [*(worker.command or default_command()), *worker.args]
    return [item.format(**values) for item in template]


@dataclass
class WorkerFailure:
    """Why a worker did not start (or died): `kind` for programs, `reason` for people."""

    worker: str
    # port_taken | model_not_found | out_of_memory | not_ready | killed | exited | cannot_run
    kind: str
    reason: str
    log_path: Path
    tail: str = ""

    def report(self, what: str = "failed to start") -> str:
        lines = [f"worker {self.worker} {what}: {self.reason}"]
        if self.tail:
            lines.append(f"  last lines of {self.log_path}:")
            lines += [f"    | {line}" for line in self.tail.splitlines()]
        else:
            lines.append(f"  log: {self.log_path}")
        return "\n".join(lines)


class WorkerStartError(Exception):
    """One or more workers could not be started; `failures` say why."""

    def __init__(self, failures: Sequence[WorkerFailure]) -> None:
        self.failures = list(failures)
        super().__init__("\n".join(f.report() for f in self.failures))


def diagnose(
    worker: WorkerConfig,
    log_text: str,
    returncode: int | None,
    *,
    killed_by_oom: bool | None = None,
) -> tuple[str, str]:
    """(kind, reason) for a worker that exited with `returncode`, from its log's last lines."""
    lines = log_text.splitlines()[-SCAN_LINES:]
    text = "\n".join(lines)
    if _PORT_TAKEN.search(text):
        return "port_taken", f"port {worker.port} is taken: {worker.host}:{worker.port} is in use"
    if killed_by_oom:
        return "out_of_memory", "out of memory: the kernel's OOM killer killed it"
    if _OUT_OF_MEMORY.search(text):
        return "out_of_memory", "out of memory" + _status(returncode)
    if returncode == -signal.SIGKILL:
        if killed_by_oom is None:  # nothing to tell: the OOM killer is the usual sender
            return "out_of_memory", "killed by SIGKILL, most likely out of memory (OOM killer)"
        return "killed", "killed by SIGKILL from outside vgate (not the OOM killer)"
    if _MODEL_NOT_FOUND.search(text):
        return "model_not_found", f"model not found: {worker.model!r}" + _status(returncode)
    if returncode is None:
        return "exited", "stopped"
    return "exited", "exited" + _status(returncode)


def _status(returncode: int | None) -> str:
    if returncode is None:
        return ""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f" (killed by {signal.Signals(-returncode).name})"
        return f" (killed by signal {-returncode})"
    return f" (exit status {returncode})"


def port_problem(host: str, port: int) -> str | None:
    """Why nothing could listen on host:port now, or None if it could (checked by binding,
    with SO_REUSEADDR as servers do, so a closed connection in TIME_WAIT does not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} is taken: another process listens on {host}:{port}"
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def group_members(pgid: int, *, zombies: bool = False) -> list[int]:
    """The processes of a process group, from /proc (zombies left out unless asked)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and (zombies or fields[0] != b"Z"):
            members.append(int(entry.name))
    return members


async def _members(pgid: int, *, zombies: bool = False) -> list[int]:
    """`group_members` off the event loop: a scan of /proc reads a file per process, tens
    of milliseconds on a node with a thousand of them, polled while the gateway serves."""
    return await asyncio.to_thread(group_members, pgid, zombies=zombies)


def _oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed: in this process's cgroup (v2
    memory.events, v1 memory.oom_control), else on the machine (/proc/vmstat); None if
    none of them can be read. A SIGKILL with this count unchanged was not the OOM killer."""
    candidates = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                candidates.append(Path("/sys/fs/cgroup", path.lstrip("/"), "memory.events"))
            elif "memory" in controllers.split(","):
                where = Path("/sys/fs/cgroup/memory", path.lstrip("/"))
                candidates.append(where / "memory.oom_control")
    candidates.append(Path("/proc/vmstat"))
    for candidate in candidates:
        with contextlib.suppress(OSError, ValueError):
            for line in candidate.read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    return None


def _model_path(worker: WorkerConfig) -> Path | None:
    """The model folder, when `model` is a path and the command passes it on."""
    uses_model = any("{model}" in item for item in (*(worker.command or ["{model}"]), *worker.args))
    return Path(worker.model) if uses_model and worker.model.startswith("/") else None


class _Worker:
    """One worker's process and state, owned by its supervising task."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.name = config.name
        self.argv = command_line(config)
        self.log_path = config.log_dir / f"{config.name}.log"
        self.state = "stopped"  # starting | ready | backoff | failed | stopped
        self.popen: subprocess.Popen[bytes] | None = None
        self.signalled = False  # vgate signalled the current process
        self.log_offset = 0
        self.oom_kills: int | None = None
        self.started_at = 0.0
        self.ready_s: float | None = None  # the last start's time to ready
        self.restarts: deque[float] = deque()
        self.first: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    def tail(self, lines: int = TAIL_LINES) -> str:
        """The current run's last lines (the log holds every run of this `vgate up`), read
        from at most its last TAIL_BYTES: a worker's log can grow to gigabytes."""
        try:
            with self.log_path.open("rb") as log:
                start = max(self.log_offset, log.seek(0, os.SEEK_END) - TAIL_BYTES)
                log.seek(start)
                data = log.read(TAIL_BYTES)
        except OSError:
            return ""
        if start > self.log_offset:
            data = data.partition(b"\n")[2]  # the first line is cut: not a line of the log
        text = data.decode("utf-8", "replace")
        out = [line for line in text.splitlines() if not _POLLING.search(line)][-lines:]
        return "\n".join(line if len(line) <= 300 else line[:300] + " ..." for line in out)


class Supervisor:
    """Starts, watches, restarts and stops the workers of a config (see the module's doc)."""

    def __init__(
        self,
        workers: Sequence[WorkerConfig],
        *,
        on_change: Callable[[str, bool], None] | None = None,
        rng: random.Random | None = None,
        probe_interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        self._workers = [_Worker(config) for config in workers]
        self._on_change = on_change
        self._rng = rng or random.Random()
        self._probe_interval_s = probe_interval_s
        self._closing = False
        self._hurry = False

    # -- public -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and return when all are ready. On the first that cannot start,
        raise `WorkerStartError` (the others keep going: call `aclose`)."""
        loop = asyncio.get_running_loop()
        for worker in self._workers:
            worker.log_path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # the previous `up`'s log, kept once
                worker.log_path.replace(worker.log_path.with_name(worker.log_path.name + ".1"))
            worker.first = loop.create_future()
            worker.task = loop.create_task(self._supervise(worker), name=f"worker-{worker.name}")
        pending = {worker.first for worker in self._workers if worker.first is not None}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failures = [
                exc.failures[0]
                for future in done
                if isinstance(exc := future.exception(), WorkerStartError)
            ]
            if failures:
                raise WorkerStartError(failures)

    async def aclose(self) -> None:
        """Stop every worker; returns when none of their processes is left."""
        self._closing = True
        tasks = [w.task for w in self._workers if w.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for worker in self._workers:
            if worker.first is not None and worker.first.done() and not worker.first.cancelled():
                worker.first.exception()  # retrieved: no "never retrieved" warning
        await asyncio.gather(*(self._stop(w, w.config.stop_timeout_s) for w in self._workers))
        for worker in self._workers:
            worker.state = "stopped"

    def hurry(self) -> None:
        """Stop without waiting for graceful exits any more (a second Ctrl-C)."""
        self._hurry = True

    def status(self) -> dict[str, dict[str, object]]:
        return {
            w.name: {
                "state": w.state,
                "pid": w.popen.pid if w.popen is not None and w.popen.poll() is None else None,
                "restarts": len(w.restarts),
                "ready_s": w.ready_s,
                "log": str(w.log_path),
            }
            for w in self._workers
        }

    # -- one worker ---------------------------------------------------------------------------

    async def _supervise(self, worker: _Worker) -> None:
        restart = worker.config.restart
        loop = asyncio.get_running_loop()
        failures_in_a_row = 0
        while True:
            failure = await self._launch(worker)
            if failure is None:
                worker.state = "ready"
                logger.info(
                    "worker %s ready in %.1fs (pid %d, %s)",
                    worker.name,
                    worker.ready_s,
                    worker.popen.pid if worker.popen else -1,
                    worker.config.url,
                )
                self._changed(worker, True)
                if worker.first is not None and not worker.first.done():
                    worker.first.set_result(None)
                ready_at = loop.time()
                returncode = await self._wait_exit(worker)
                self._changed(worker, False)
                if loop.time() - ready_at >= restart.max_s:
                    failures_in_a_row = 0  # it ran a while: back to the shortest wait
                failure = self._exited(worker, returncode)
                await self._stop(worker, 5.0)  # what is left of its group
                logger.error("%s", failure.report("died"))
            else:
                logger.error("%s", failure.report())
                if worker.first is not None and not worker.first.done():
                    worker.state = "failed"
                    worker.first.set_exception(WorkerStartError([failure]))
                    return
            now = loop.time()
            while worker.restarts and now - worker.restarts[0] > restart.window_s:
                worker.restarts.popleft()
            if len(worker.restarts) >= restart.max_restarts_per_window:
                worker.state = "failed"
                logger.error(
                    "worker %s: giving up after %d restarts within %gs; it stays out of rotation"
                    " until vgate is restarted. Last failure: %s",
                    worker.name,
                    len(worker.restarts),
                    restart.window_s,
                    failure.reason,
                )
                return
            cap = min(restart.max_s, restart.initial_s * 2 ** min(failures_in_a_row, 32))
            delay = cap * (0.5 + 0.5 * self._rng.random())
            failures_in_a_row += 1
            worker.state = "backoff"
            logger.warning(
                "worker %s: restarting in %.1fs (restart %d of at most %d within %gs)",
                worker.name,
                delay,
                len(worker.restarts) + 1,
                restart.max_restarts_per_window,
                restart.window_s,
            )
            await asyncio.sleep(delay)
            worker.restarts.append(loop.time())

    async def _launch(self, worker: _Worker) -> WorkerFailure | None:
        """Start the worker and wait until it is ready: None, or why it is not (nothing of
        it left running then)."""
        config = worker.config
        worker.log_offset = 0
        model = _model_path(config)
        if model is not None and not model.exists():
            return WorkerFailure(
                config.name, "model_not_found", f"model not found: {model} does not exist",
                worker.log_path,
            )  # fmt: skip
        problem = port_problem(config.host, config.port)
        if problem is not None:
            return WorkerFailure(config.name, "port_taken", problem, worker.log_path)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **config.env}
        with worker.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            command = shlex.join(worker.argv).replace("\n", "\\n")
            log.write(f"=== vgate {stamp}: starting {config.name}: {command}\n".encode())
            log.flush()
            worker.log_offset = log.tell()
            worker.oom_kills = _oom_kills()
            try:
                # Not asyncio's subprocesses: uvloop's have no process_group. Popen forks in C
                # (milliseconds, and never on a request's path).
                worker.popen = subprocess.Popen(  # noqa: ASYNC220
                    worker.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    process_group=0,
                )
            except OSError as exc:
                return WorkerFailure(
                    config.name, "cannot_run",
                    f"cannot run {worker.argv[0]!r}: {exc.strerror or exc}", worker.log_path,
                )  # fmt: skip
        worker.signalled = False
        worker.state = "starting"
        worker.started_at = time.monotonic()
        logger.info(
            "worker %s: starting (pid %d, log %s)", config.name, worker.popen.pid, worker.log_path
        )
        pool = ConnectionPool(config.url, max_connections=1, keepalive_s=0.0, connect_timeout_s=1.0)
        deadline = worker.started_at + config.ready_timeout_s
        try:
            while True:
                returncode = worker.popen.poll()
                if returncode is not None:
                    failure = self._exited(worker, returncode)
                    await self._stop(worker, 5.0)
                    return failure
                if await _healthy(pool):
                    worker.ready_s = time.monotonic() - worker.started_at
                    return None
                if time.monotonic() > deadline:
                    tail = worker.tail()
                    await self._stop(worker, config.stop_timeout_s)
                    reason = (
                        f"not ready after {config.ready_timeout_s:g}s"
                        f" (GET {config.url}/health never answered 200)"
                    )
                    return WorkerFailure(config.name, "not_ready", reason, worker.log_path, tail)
                await asyncio.sleep(self._probe_interval_s)
        finally:
            await pool.aclose()

    def _exited(self, worker: _Worker, returncode: int) -> WorkerFailure:
        oom = None
        if returncode == -signal.SIGKILL and worker.oom_kills is not None:
            now = _oom_kills()
            oom = now is not None and now > worker.oom_kills
        if worker.signalled:
            kind, reason = "exited", "stopped by vgate" + _status(returncode)
        else:
            tail = worker.tail(SCAN_LINES)
            kind, reason = diagnose(worker.config, tail, returncode, killed_by_oom=oom)
        return WorkerFailure(worker.name, kind, reason, worker.log_path, worker.tail())

    async def _wait_exit(self, worker: _Worker) -> int:
        assert worker.popen is not None
        while (returncode := worker.popen.poll()) is None:  # noqa: ASYNC110 (a process, not a task)
            await asyncio.sleep(EXIT_POLL_S)
        return returncode

    async def _stop(self, worker: _Worker, grace_s: float) -> None:
        """SIGTERM the worker's process (or, if it is gone, what is left of its group), wait up
        to `grace_s`, SIGKILL the group; return when nothing of the group is left."""
        popen = worker.popen
        if popen is None:
            return
        pgid = popen.pid  # process_group=0: the group is named after its first process
        worker.signalled = True
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, signal.SIGTERM)
        elif await _members(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while (popen.poll() is None or await _members(pgid)) and time.monotonic() < deadline:
            if self._hurry:
                break
            await asyncio.sleep(0.1)
        if popen.poll() is None or await _members(pgid):
            logger.warning("worker %s: still running after %gs: SIGKILL", worker.name, grace_s)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        # Its children outlive it as zombies until init reaps them: wait for that too.
        while time.monotonic() < deadline and (  # noqa: ASYNC110 (processes, not tasks)
            popen.poll() is None or await _members(pgid, zombies=True)
        ):
            await asyncio.sleep(0.05)
        left = await _members(pgid, zombies=True)
        if left:
            logger.error("worker %s: processes %s of its group are still there", worker.name, left)

    def _changed(self, worker: _Worker, ready: bool) -> None:
        if self._on_change is not None and not self._closing:
            try:
                self._on_change(worker.name, ready)
            except Exception:  # the hook's bug must not kill the supervisor
                logger.exception("worker %s: on_change hook failed", worker.name)


async def _healthy(pool: ConnectionPool) -> bool:
    try:
        async with asyncio.timeout(2.0):
            response = await pool.request(b"GET", b"/health", b"Connection: close\r\n", b"")
            await response.read(65536)
            return response.status == 200
    except (UpstreamConnectError, UpstreamBroken, TimeoutError, OSError):
        return False
