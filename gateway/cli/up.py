"""`vgate up --config FILE`: start the config's workers, wait until they are ready, serve.

The order, and why:

1. the gateway's own port is checked free, so a taken one fails in a second, not after the
   workers' minute of start-up;
2. the supervisor starts every worker and waits for each `GET /health`; the first that cannot
   start stops everything, with its reason and the last lines of its log (exit status 1);
3. the gateway serves, as `vgate serve` does (uvicorn, same settings). The supervisor keeps
   watching: a worker that dies leaves rotation at once and rejoins once it is ready again;
4. SIGTERM: /ready answers 503 for `server.drain_delay_s` while the gateway serves on (as
   `vgate serve`: gateway/runtime/drain.py); then, as at once on Ctrl-C, uvicorn stops
   accepting and drains (`server.graceful_shutdown_s`), the gateway closes, then the
   workers are stopped (SIGTERM, `stop_timeout_s`, SIGKILL to their
   process groups). A second Ctrl-C skips the waiting. Nothing started is left running.

Workers run in their own process groups, so a Ctrl-C at the terminal reaches only vgate,
which stops them in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from gateway.config import GatewayConfig, ServerConfig
from gateway.errors import ConfigError
from gateway.runtime.app import create_app
from gateway.runtime.drain import DrainingServer
from gateway.runtime.gateway import Gateway
from gateway.runtime.supervisor import Supervisor, WorkerStartError, port_problem

logger = logging.getLogger("vgate.up")


def up(config: GatewayConfig, server: ServerConfig, uvicorn_options: dict[str, Any]) -> int:
    if not config.workers:
        print(
            f"vgate: {config.source} has no workers: section"
            " (`vgate serve` runs the gateway without workers)",
            file=sys.stderr,
        )
        return 2
    try:
        gateway = Gateway.from_config(config)
    except ConfigError as exc:
        print(f"vgate: invalid configuration: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_up(config, server, gateway, uvicorn_options))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - not on Windows
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def mark_backends(gateway: Gateway) -> Callable[[str, bool], None]:
    """The supervisor's hook: a worker's backend is in rotation exactly while it is ready.
    Its health state is set outright (counters reset), so the health checker's next probes
    start from the supervisor's word. The backend is looked up in the router in force (a
    config reload may have replaced it)."""

    def mark(name: str, ready: bool) -> None:
        backend = next((b for b in gateway.router.backends if b.name == name), None)
        if backend is None:  # no longer in the config: nothing to mark
            return
        state = backend.health
        changed = state.healthy != ready
        state.healthy, state.probed, state.failures, state.successes = ready, True, 0, 0
        if changed:
            gateway.metrics.health_changed(name, ready)
            logger.warning("backend %s is %s", name, "in rotation" if ready else "out of rotation")

    return mark


async def _up(
    config: GatewayConfig, server: ServerConfig, gateway: Gateway, options: dict[str, Any]
) -> int:
    import uvicorn

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    supervisor = Supervisor(config.workers, on_change=mark_backends(gateway))
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stopping:
            supervisor.hurry()
        loop.call_soon_threadsafe(stop.set)

    # Plain handlers rather than the loop's: uvicorn puts its own in place while it serves,
    # and puts these back (and calls them) when it is done.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    if hasattr(signal, "SIGHUP"):  # reloads the config, as for `vgate serve`
        previous[signal.SIGHUP] = signal.signal(
            signal.SIGHUP, lambda signum, frame: gateway.request_reload("SIGHUP")
        )
    try:
        if server.port and (problem := port_problem(server.host, server.port)):
            print(f"vgate: the gateway cannot listen: {problem}", file=sys.stderr)
            return 1
        started = time.monotonic()
        names = ", ".join(f"{w.name} ({w.url})" for w in config.workers)
        logger.info("starting %d workers: %s", len(config.workers), names)
        try:
            starting = loop.create_task(supervisor.start())
            interrupted = loop.create_task(stop.wait())
            await asyncio.wait({starting, interrupted}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                logger.warning("interrupted while the workers start: stopping them")
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError, WorkerStartError):
                    await starting
                return 0
            interrupted.cancel()
            try:
                starting.result()
            except WorkerStartError as exc:
                print(f"vgate: {exc}", file=sys.stderr)
                return 1
            logger.info(
                "%d workers ready in %.1fs; vgate on http://%s:%d",
                len(config.workers),
                time.monotonic() - started,
                server.host,
                server.port,
            )
            # SIGTERM: /ready 503 for server.drain_delay_s while serving, then the drain
            # (as `vgate serve`); the workers are stopped once the gateway has drained.
            uvicorn_server = DrainingServer(
                uvicorn.Config(
                    create_app(gateway),
                    host=server.host,
                    port=server.port,
                    http=gateway.connections.protocol_class(),
                    **options,
                ),
                gateway=gateway,
                drain_delay_s=server.drain_delay_s,
            )
            try:
                await uvicorn_server.serve()
            except SystemExit as exc:  # uvicorn's way out of a failed start-up
                return exc.code if isinstance(exc.code, int) else 1
            return 0 if uvicorn_server.started else 1
        finally:
            stopping = True
            logger.info("stopping the workers")
            await supervisor.aclose()
            logger.info("workers stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
