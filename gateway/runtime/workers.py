"""`server.workers: N`: N gateway processes serving one port, under one parent.

The parent binds the listening socket, then forks the workers: each builds its own `Gateway`
and event loop after the fork (nothing of either exists in the parent, which starts no thread
and no loop), and runs the same `DrainingServer` as `vgate serve` on the inherited socket. The
kernel hands each accepted connection to one of the processes waiting on the shared socket
(measured against one SO_REUSEPORT socket per worker: bench/workers.py and the README).

The parent then only supervises:

- SIGTERM, SIGINT: passed on to every worker, which drains as `vgate serve` does
  (gateway/runtime/drain.py); the parent exits once all have, 0 when all exited cleanly;
- SIGHUP: passed on, so every worker reloads its config;
- a worker that dies while the server is not stopping is replaced (after `_backoff_s`);
  more than `MAX_CRASHES` deaths within `CRASH_WINDOW_S` stop the server with an error (a
  worker that cannot start, or dies on every request, would otherwise loop forever); a
  worker that exits 2 (an invalid configuration, say a keys file gone) stops it at once.

Workers sit in process groups of their own, so a Ctrl-C at a terminal reaches the parent
only, which passes one SIGINT on to each (a second one from the terminal would make each
stop at once). Each worker holds the read end of a pipe whose write end only the parent
holds: should the parent die without a word (SIGKILL), every worker sees the pipe close and
drains as on SIGTERM, so no worker outlives it.

/metrics: every worker serves its own registry to its siblings on a unix socket in the
parent's run dir, and the worker a scrape reaches answers with the sum
(gateway/runtime/peer_metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.config import GatewayConfig, ServerConfig

logger = logging.getLogger("vgate.workers")

MAX_CRASHES = 5  # worker deaths within CRASH_WINDOW_S before the server gives up
CRASH_WINDOW_S = 60.0
BACKLOG = 2048
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
CONFIG_ERROR = 2  # a worker's exit status for an invalid configuration: not worth retrying


@dataclass
class _Worker:
    index: int
    pid: int | None = None
    restart_at: float | None = None  # time.monotonic(), while waiting to be replaced


def listen_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The server's listening socket, bound (SO_REUSEPORT: one per worker, each bound to the
    same port; the kernel spreads connections by a hash of their addresses)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


class Workers:
    """The parent: start, watch, pass signals on, replace, stop."""

    def __init__(
        self,
        count: int,
        run_worker: Callable[[int, socket.socket | None, int, str], int],
        *,
        listener: socket.socket | None,
        run_dir: str,
    ) -> None:
        self._workers = [_Worker(i) for i in range(count)]
        self._run_worker = run_worker  # (index, socket, parent-death fd, run dir) -> status
        self._listener = listener  # None: each worker binds its own (SO_REUSEPORT)
        self._run_dir = run_dir
        self._crashes: deque[float] = deque()
        self._stopping = False
        self._signals: list[int] = []  # received, not yet passed on
        self._failed: int | None = None  # the exit status once the server gives up
        self._unclean = False  # a worker that exited other than 0 while stopping
        self._death_r, self._death_w = os.pipe()

    def run(self) -> int:
        if threading.active_count() > 1:  # fork copies only the calling thread
            logger.warning("forking workers with %d threads running", threading.active_count())
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _FORWARDED}
        try:
            for worker in self._workers:
                self._start(worker)
            while any(w.pid is not None or w.restart_at is not None for w in self._workers):
                self._pass_signals_on()
                self._reap()
                self._restart_due()
                time.sleep(0.05)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(self._death_w)
            os.close(self._death_r)
        if self._failed is not None:
            return self._failed
        return 1 if self._unclean else 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)  # acted on by the loop, at most 50 ms later

    def _pass_signals_on(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum != signal.SIGHUP and not self._stopping:
                self._stopping = True
                logger.warning(
                    "%s: stopping %d workers (each drains)",
                    signal.Signals(signum).name,
                    len(self._workers),
                )
                for worker in self._workers:
                    worker.restart_at = None  # one waiting to be replaced is not
            self._signal_all(signum)

    def _signal_all(self, signum: int) -> None:
        for worker in self._workers:
            if worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)

    def _start(self, worker: _Worker) -> None:
        # Signals stay blocked across the fork: the child must not run the parent's
        # handlers before it has put the defaults back.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        try:
            pid = os.fork()
            if pid == 0:  # the worker
                status = 1
                try:
                    os.setpgid(0, 0)
                    for sig in _FORWARDED:
                        signal.signal(sig, signal.SIG_DFL)
                    os.close(self._death_w)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
                    status = self._run_worker(
                        worker.index, self._listener, self._death_r, self._run_dir
                    )
                except SystemExit as exc:
                    status = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    logger.exception("worker %d failed", worker.index)
                finally:
                    with contextlib.suppress(Exception):
                        sys.stdout.flush()
                        sys.stderr.flush()
                    os._exit(status)  # never back into the parent's code
            worker.pid, worker.restart_at = pid, None
            logger.info("worker %d started (pid %d)", worker.index, pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)

    def _reap(self) -> None:
        for worker in self._workers:
            if worker.pid is None:
                continue
            pid, wait_status = os.waitpid(worker.pid, os.WNOHANG)
            if pid == 0:
                continue
            worker.pid = None
            status = os.waitstatus_to_exitcode(wait_status)
            if self._stopping:
                if status != 0:
                    self._unclean = True
                    logger.warning("worker %d exited with status %d", worker.index, status)
                continue
            self._crashed(worker, status)

    def _crashed(self, worker: _Worker, status: int) -> None:
        how = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and self._crashes[0] < now - CRASH_WINDOW_S:
            self._crashes.popleft()
        if status == CONFIG_ERROR:
            self._give_up(f"worker {worker.index} {how} (invalid configuration)", CONFIG_ERROR)
        elif len(self._crashes) > MAX_CRASHES:
            self._give_up(
                f"worker {worker.index} {how}: {len(self._crashes)} worker deaths within"
                f" {CRASH_WINDOW_S:g}s, giving up",
                1,
            )
        else:
            worker.restart_at = now + _backoff_s(len(self._crashes) - 1)
            logger.error("worker %d %s: replacing it", worker.index, how)

    def _give_up(self, reason: str, status: int) -> None:
        logger.error("%s; stopping the server", reason)
        print(f"vgate: {reason}", file=sys.stderr)
        self._failed = status
        self._stopping = True
        for worker in self._workers:
            worker.restart_at = None
        self._signal_all(signal.SIGTERM)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for worker in self._workers:
            if worker.restart_at is not None and now >= worker.restart_at and not self._stopping:
                self._start(worker)


def _backoff_s(recent_crashes: int) -> float:
    return float(min(0.1 * 2**recent_crashes, 5.0))


def serve_workers(
    config: GatewayConfig, server: ServerConfig, options: dict[str, Any], *, reuse_port: bool
) -> int:
    """`vgate serve` with server.workers > 1 (gateway/cli/main.py has read the config)."""
    listener = None
    if not reuse_port:
        try:
            listener = listen_socket(server.host, server.port)
        except OSError as exc:
            print(f"vgate: cannot listen on {server.host}:{server.port}: {exc}", file=sys.stderr)
            return 1
        # Port 0 (tests): the workers share whatever port the kernel chose.
        logger.info("listening on %s:%d", server.host, listener.getsockname()[1])
    run_dir = tempfile.mkdtemp(prefix="vgate-workers-")
    try:

        def run(index: int, sock: socket.socket | None, death_fd: int, run_dir: str) -> int:
            return _worker(config, server, options, index, sock, death_fd, run_dir, reuse_port)

        logger.info("starting %d worker processes", server.workers)
        return Workers(server.workers, run, listener=listener, run_dir=run_dir).run()
    finally:
        if listener is not None:
            listener.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def _worker(
    config: GatewayConfig,
    server: ServerConfig,
    options: dict[str, Any],
    index: int,
    sock: socket.socket | None,
    death_fd: int,
    run_dir: str,
    reuse_port: bool,
) -> int:
    """One worker process, after the fork: what `vgate serve` does with one."""
    import uvicorn

    from gateway.errors import ConfigError
    from gateway.runtime.app import create_app
    from gateway.runtime.drain import DrainingServer
    from gateway.runtime.gateway import Gateway
    from gateway.runtime.peer_metrics import PeerMetrics

    if sock is None:  # SO_REUSEPORT: a socket of its own on the shared port
        sock = listen_socket(server.host, server.port, reuse_port=True)
    try:
        gateway = Gateway.from_config(config)
    except ConfigError as exc:
        print(f"vgate: invalid configuration: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    # SIGHUP reloads the config, as for `vgate serve` (the parent passes it on to each).
    signal.signal(signal.SIGHUP, lambda signum, frame: gateway.request_reload("SIGHUP"))
    peers = PeerMetrics(
        gateway.metrics.exposition, run_dir=run_dir, index=index, workers=server.workers
    )
    uvicorn_config = uvicorn.Config(
        create_app(gateway, scrape=peers.exposition),
        host=server.host,
        port=server.port,
        loop="uvloop",
        http=gateway.connections.protocol_class(),
        **options,
    )
    draining = DrainingServer(uvicorn_config, gateway=gateway, drain_delay_s=server.drain_delay_s)

    async def serve() -> None:
        loop = asyncio.get_running_loop()

        def parent_gone() -> None:
            loop.remove_reader(death_fd)
            logger.error("worker %d: the parent process is gone: draining", index)
            draining.handle_exit(signal.SIGTERM, None)

        loop.add_reader(death_fd, parent_gone)  # readable only at EOF: the parent died
        await peers.start()
        try:
            await draining.serve(sockets=[sock])
        finally:
            await peers.aclose()

    factory = uvicorn_config.get_loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(serve())
        except KeyboardInterrupt:
            return 130
    return 0 if draining.started else 3
