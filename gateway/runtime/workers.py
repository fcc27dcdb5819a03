"""`server.workers: N`: N gateway processes serving one port, under one parent.

The parent binds the listening socket, then forks the workers: each builds its own `Gateway`
and event loop after the fork (nothing of either exists in the parent, which starts no thread
and no loop), and runs the same `DrainingServer` as `vgate serve`.

Connections are dealt out by the parent: it accepts each and passes it, round robin, to the
next worker over a unix socket pair (SCM_RIGHTS), so N workers hold a Nth of the connections
each, to one. Keep-alive clients stay on the worker they first reached, so a split decided by
the kernel (every worker accepting on the shared socket, or one SO_REUSEPORT socket per
worker: `--balance shared|reuseport`, kept for measurements) stays as lopsided as it began:
with 16 connections and 2 workers, about half of the runs put more than 60 % of the requests
on one (bench/workers.py). The parent's cost is one accept and one sendmsg per connection.

The parent then only supervises:

- SIGTERM, SIGINT: passed on to every worker, which drains as `vgate serve` does
  (gateway/runtime/drain.py); the parent deals out connections for `server.drain_delay_s`
  after a SIGTERM (none after a SIGINT), then closes the listener, and exits once every
  worker has drained, 0 when all exited cleanly;
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

Every worker serves a private unix socket in the parent's run dir (gateway/runtime/peers.py):
the worker a /metrics scrape reaches answers with the sum of every worker's registry
(gateway/runtime/peer_metrics.py), and the worker an admin call reaches applies it, then has
every sibling apply it too (gateway/edge/admin_relay.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
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
from typing import Any, Literal

import uvicorn

from gateway.config import GatewayConfig, ServerConfig
from gateway.runtime.drain import DrainingServer
from gateway.runtime.gateway import Gateway

logger = logging.getLogger("vgate.workers")

MAX_CRASHES = 5  # worker deaths within CRASH_WINDOW_S before the server gives up
CRASH_WINDOW_S = 60.0
BACKLOG = 2048
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
CONFIG_ERROR = 2  # a worker's exit status for an invalid configuration: not worth retrying
ACCEPT_BATCH = 64  # connections accepted per wake-up before the parent looks at signals again
_STOP_MARGIN_S = 0.1
Balance = Literal["dispatch", "shared", "reuseport"]


@dataclass
class _Worker:
    index: int
    pid: int | None = None
    channel: socket.socket | None = None  # the parent's end: connections go to the worker
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
        run_worker: Callable[[int, socket.socket | None, socket.socket | None, int, str], int],
        *,
        listener: socket.socket | None,
        run_dir: str,
        balance: Balance = "dispatch",
        drain_delay_s: float = 0.0,
    ) -> None:
        self._workers = [_Worker(i) for i in range(count)]
        # (index, shared listener, connection channel, parent-death fd, run dir) -> status
        self._run_worker = run_worker
        self._listener = listener  # None: each worker binds its own (SO_REUSEPORT)
        self._balance = balance
        self._drain_delay_s = drain_delay_s
        self._accept_until: float | None = None  # time.monotonic(), once stopping
        self._next = 0  # the worker the next connection goes to
        self._selector = selectors.DefaultSelector()
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
        dealing = self._balance == "dispatch" and self._listener is not None
        try:
            for worker in self._workers:
                self._start(worker)
            if dealing:
                assert self._listener is not None
                self._listener.setblocking(False)
                self._selector.register(self._listener, selectors.EVENT_READ)
            while any(w.pid is not None or w.restart_at is not None for w in self._workers):
                self._pass_signals_on()
                self._reap()
                self._restart_due()
                until = self._accept_until
                if dealing and until is not None and time.monotonic() >= until:
                    dealing = False
                    self._stop_listening()
                if dealing:
                    wait_s = 0.05 if until is None else min(0.05, until - time.monotonic())
                    if self._selector.select(max(0.0, wait_s)):
                        self._deal()
                else:
                    time.sleep(0.05)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(self._death_w)
            os.close(self._death_r)
            self._selector.close()
            for worker in self._workers:
                if worker.channel is not None:
                    worker.channel.close()
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
                # As each worker does: accept on through the drain delay after a SIGTERM,
                # stopping a little before the workers do (their clock starts when the
                # signal reaches them, later; they look every 0.1 s), so no connection is
                # passed to a worker that no longer takes any.
                delay = self._drain_delay_s if signum == signal.SIGTERM else 0.0
                self._accept_until = time.monotonic() + max(0.0, delay - _STOP_MARGIN_S)
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
        channel = ours = None
        if self._balance == "dispatch":
            ours, channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
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
                    # What is the parent's alone: the listener (a worker holding it would
                    # keep the port open after the parent closed it), the other channels.
                    listener = self._listener
                    if ours is not None and listener is not None:
                        ours.close()
                        listener.close()
                        listener = None
                    for other in self._workers:
                        if other.channel is not None:
                            other.channel.close()
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
                    status = self._run_worker(
                        worker.index, listener, channel, self._death_r, self._run_dir
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
            if ours is not None and channel is not None:
                channel.close()
                ours.setblocking(False)
                worker.channel = ours
            logger.info("worker %d started (pid %d)", worker.index, pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)

    def _deal(self) -> None:
        """Accept what is waiting (at most ACCEPT_BATCH) and pass each connection to the next
        worker that takes it; one whose channel is full (stuck) or gone is passed over."""
        assert self._listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: try again on the next wake-up
                logger.error("accept failed: %s", exc)
                return
            with conn:
                count = len(self._workers)
                for step in range(count):
                    worker = self._workers[(self._next + step) % count]
                    if worker.channel is None:
                        continue
                    try:
                        socket.send_fds(worker.channel, [b"c"], [conn.fileno()])
                    except OSError:
                        continue
                    self._next = (worker.index + 1) % count
                    break
                else:
                    logger.error("no worker took a connection: closed")

    def _stop_listening(self) -> None:
        assert self._listener is not None
        self._selector.unregister(self._listener)
        self._listener.close()
        logger.warning("no longer accepting connections")

    def _reap(self) -> None:
        for worker in self._workers:
            if worker.pid is None:
                continue
            pid, wait_status = os.waitpid(worker.pid, os.WNOHANG)
            if pid == 0:
                continue
            worker.pid = None
            if worker.channel is not None:
                worker.channel.close()
                worker.channel = None
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
    config: GatewayConfig,
    server: ServerConfig,
    options: dict[str, Any],
    *,
    balance: Balance = "dispatch",
) -> int:
    """`vgate serve` with server.workers > 1 (gateway/cli/main.py has read the config)."""
    listener = None
    if balance != "reuseport":
        try:
            listener = listen_socket(server.host, server.port)
        except OSError as exc:
            print(f"vgate: cannot listen on {server.host}:{server.port}: {exc}", file=sys.stderr)
            return 1
        # Port 0 (tests): the workers share whatever port the kernel chose.
        logger.info("listening on %s:%d", server.host, listener.getsockname()[1])
    run_dir = tempfile.mkdtemp(prefix="vgate-workers-")
    try:

        def run(
            index: int,
            sock: socket.socket | None,
            channel: socket.socket | None,
            death_fd: int,
            run_dir: str,
        ) -> int:
            worker = _WorkerSetup(config, server, options, index, run_dir, death_fd)
            return worker.run(sock, channel)

        logger.info("starting %d worker processes", server.workers)
        workers = Workers(
            server.workers,
            run,
            listener=listener,
            run_dir=run_dir,
            balance=balance,
            drain_delay_s=server.drain_delay_s,
        )
        return workers.run()
    finally:
        if listener is not None:
            listener.close()
        shutil.rmtree(run_dir, ignore_errors=True)


@dataclass
class _WorkerSetup:
    """One worker process, after the fork: what `vgate serve` does with one."""

    config: GatewayConfig
    server: ServerConfig
    options: dict[str, Any]
    index: int
    run_dir: str
    death_fd: int

    def run(self, sock: socket.socket | None, channel: socket.socket | None) -> int:
        from gateway.errors import ConfigError
        from gateway.runtime.app import create_app
        from gateway.runtime.peer_metrics import PeerMetrics
        from gateway.runtime.peers import ADMIN, METRICS, PeerAdmin, PeerServer

        server = self.server
        if sock is None and channel is None:  # SO_REUSEPORT: a socket of its own
            sock = listen_socket(server.host, server.port, reuse_port=True)
        try:
            gateway = Gateway.from_config(self.config)
        except ConfigError as exc:
            print(f"vgate: invalid configuration: {exc}", file=sys.stderr)
            return CONFIG_ERROR
        # SIGHUP reloads the config, as for `vgate serve` (the parent passes it on to each).
        signal.signal(signal.SIGHUP, lambda signum, frame: gateway.request_reload("SIGHUP"))
        peer_metrics = PeerMetrics(
            gateway.metrics.exposition,
            run_dir=self.run_dir,
            index=self.index,
            workers=server.workers,
        )
        peer_admin = PeerAdmin(run_dir=self.run_dir, index=self.index, workers=server.workers)
        peers = PeerServer(
            self.run_dir,
            self.index,
            {METRICS: peer_metrics.answer, ADMIN: peer_admin.answer},
        )
        uvicorn_config = uvicorn.Config(
            create_app(gateway, scrape=peer_metrics.exposition, siblings=peer_admin),
            host=server.host,
            port=server.port,
            loop="uvloop",
            http=gateway.connections.protocol_class(),
            **self.options,
        )
        draining = _DealtServer(
            uvicorn_config, gateway=gateway, drain_delay_s=server.drain_delay_s, channel=channel
        )

        async def serve() -> None:
            loop = asyncio.get_running_loop()

            def parent_gone() -> None:
                loop.remove_reader(self.death_fd)
                logger.error("worker %d: the parent process is gone: draining", self.index)
                draining.handle_exit(signal.SIGTERM, None)

            loop.add_reader(self.death_fd, parent_gone)  # readable only at EOF: parent died
            await peers.start()
            try:
                await draining.serve(sockets=[] if sock is None else [sock])
            finally:
                await peers.aclose()

        with asyncio.Runner(loop_factory=uvicorn_config.get_loop_factory()) as runner:
            try:
                runner.run(serve())
            except KeyboardInterrupt:
                return 130
        return 0 if draining.started else 3


class _DealtServer(DrainingServer):
    """A `DrainingServer` whose connections come from the parent over `channel` (none:
    from its own listener): taken from the start-up's end until its shutdown begins."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        gateway: Gateway,
        drain_delay_s: float,
        channel: socket.socket | None,
    ) -> None:
        super().__init__(config, gateway=gateway, drain_delay_s=drain_delay_s)
        self._channel = channel
        self._connecting: set[asyncio.Task[Any]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self._channel is not None and self.started and not self.should_exit:
            self._channel.setblocking(False)
            asyncio.get_running_loop().add_reader(self._channel.fileno(), self._receive)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._stop_receiving()  # as uvicorn closes its listener
        await super().shutdown(sockets=sockets)

    def _stop_receiving(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._channel.fileno())
            self._channel.close()
            self._channel = None

    def _receive(self) -> None:
        assert self._channel is not None
        loop = asyncio.get_running_loop()
        config = self.config

        def protocol() -> asyncio.Protocol:  # as uvicorn's start-up makes them
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=loop,
            )

        while self._channel is not None:
            try:
                data, fds, _flags, _address = socket.recv_fds(self._channel, 16, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._stop_receiving()
                return
            if not data and not fds:  # the parent closed its end
                self._stop_receiving()
                return
            for fd in fds:
                conn = socket.socket(fileno=fd)
                conn.setblocking(False)
                task = loop.create_task(loop.connect_accepted_socket(protocol, conn))
                self._connecting.add(task)
                task.add_done_callback(self._connecting.discard)
