"""uvicorn's server with a drain delay: on SIGTERM, leave rotation first, then stop.

A rolling update sends SIGTERM while load balancers (kube-proxy, an ingress, NGINX) still
send this replica new connections: they learn it is going only after a propagation delay.
uvicorn alone closes its listener at once, and whatever sits in the kernel's accept queue,
or arrives until the balancers catch up, is reset. So on the first SIGTERM:

1. the gateway drains (`Gateway.drain`): /ready answers 503, so probing balancers take it
   out of rotation, and every response says `Connection: close`, so keep-alive clients
   (whose pooled connections no endpoint change reaches) move to fresh connections, which
   the balancers send elsewhere. Everything else serves and accepts as before;
2. after `server.drain_delay_s`, uvicorn's own shutdown: the listener closes, requests in
   flight get `server.graceful_shutdown_s` to finish, the gateway closes. The process exits
   0 (uvicorn would re-raise the signal and die by it; a finished drain is a clean exit).

SIGINT (Ctrl-C at a terminal) and a second signal during the delay skip what is left of it;
a SIGINT while stopping stops at once, as in uvicorn.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from gateway.runtime.gateway import Gateway

logger = logging.getLogger("vgate.drain")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, *, gateway: Gateway, drain_delay_s: float) -> None:
        super().__init__(config)
        self._gateway = gateway
        self._drain_delay_s = drain_delay_s
        self._drain_ends: float | None = None  # time.monotonic(), from the first SIGTERM
        self._drain_announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler (uvicorn installs it with `signal.signal` for SIGINT and
        SIGTERM): flag writes only, the main loop's tick acts on them. Unlike uvicorn's, it
        keeps no signal to re-raise after the shutdown."""
        first = self._drain_ends is None and not self.should_exit
        if first and sig == signal.SIGTERM and self._drain_delay_s > 0:
            self._drain_ends = time.monotonic() + self._drain_delay_s
            self._gateway.drain()
        elif self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's tick (every 0.1 s), which also ends the drain delay when it is due."""
        if self._drain_ends is not None and not self.should_exit:
            if not self._drain_announced:
                self._drain_announced = True
                # uvicorn rebuilds the default headers from these every second.
                self.config.encoded_headers = [*self.config.encoded_headers, _CLOSE]
                self.server_state.default_headers = [*self.server_state.default_headers, _CLOSE]
                logger.warning(
                    "SIGTERM: draining; /ready answers 503 for %gs while serving, then the "
                    "listener closes and requests in flight get %gs",
                    self._drain_delay_s,
                    self.config.timeout_graceful_shutdown or 0,
                )
            if time.monotonic() >= self._drain_ends:
                logger.warning(
                    "drain delay over: no longer accepting connections (%d open)",
                    len(self.server_state.connections),
                )
                self.should_exit = True
        return await super().on_tick(counter)


_CLOSE = (b"connection", b"close")
