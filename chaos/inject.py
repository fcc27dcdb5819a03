"""Fault injection at the router's adapter seam: a real backend, made to misbehave on purpose.

`Chaos` holds the experiments in force for one gateway (`chaos:` in its config, and those
started at run time); `Chaos.wrap` turns the gateway's adapter factory into one whose
adapters are `ChaosAdapter`s around the real ones. An adapter asked for an exchange picks
the experiment that applies and acts its fault where the real failure would arise, so the
router's retries, breakers, fallbacks, resumption and limits see what they would see from a
failing upstream, and react the same way:

- before the upstream is asked: `latency` (then the real exchange), `error` (a synthetic
  answer in OpenAI's error shape, with Retry-After), `refuse` (`UpstreamConnectError`),
  `reset` (`UpstreamBroken`, before the response's headers), `hang` (no answer: the router's
  timeouts end it);
- in the real answer's body (a 200's; another status passes as it is): `slow_first_token`,
  `slow_tokens`, `cut` (`UpstreamBroken` after N events), `stall` (nothing after N events),
  `malformed` (one event of broken JSON after N) and `no_done` (the `[DONE]` event dropped).
  Events are counted by the blank lines that end them, across reads: an upstream read may
  hold several events, or part of one. A non-streamed JSON body (`read()`) is cut (it breaks
  off) or slowed (`slow_first_token`); the stream faults leave it alone.

Which experiment applies to an exchange: the one the request asked for (`X-VGate-Chaos`,
which the edge passes on only from keys allowed to ask) if it is in its window and targets
the exchange, else the first in order that does and is not `on_request`. Only that one
counts the exchange against its rate, so experiments that overlap share requests, never
hit one twice. Every fault that takes effect is added to the request's
`RequestContext.injected` ("experiment:fault", one per attempt hit) and reported to
`on_injected(experiment, fault)`; health checks and `/metrics` scrapes are never touched.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final, NoReturn

import orjson

from chaos.experiments import Experiment
from gateway.config import (
    MAX_CHAOS_EXPERIMENTS,
    BackendConfig,
    ChaosConfig,
    ChaosExperiment,
    ChaosFault,
    GatewayConfig,
    Timeouts,
    UpstreamConfig,
)
from gateway.errors import (
    ChaosDisabled,
    InvalidRequest,
    TooManyExperiments,
    UpstreamBroken,
    UpstreamConnectError,
)
from gateway.wire.sse import data_event, is_done
from providers.base import Adapter, RequestContext, UpstreamResponse
from providers.http1 import ByteBudget
from providers.registry import AdapterFactory

__all__ = ["Chaos", "ChaosAdapter", "backend_routes"]

InjectedListener = Callable[[str, str], None]  # experiment name, fault kind


def _ignore(experiment: str, fault: str) -> None:
    pass


class Chaos:
    """The experiments in force for one gateway; shared by every ChaosAdapter it wraps.

    While chaos is disabled (`chaos.enabled: false`, the master switch) none runs, the
    config's included, and none can be started.
    """

    def __init__(
        self,
        config: ChaosConfig,
        *,
        on_injected: InjectedListener = _ignore,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._on_injected = on_injected
        self._clock = clock
        # In force, in order (the first that applies is applied). Empty while disabled, so
        # an adapter's exchange costs one check of it.
        self._running: list[Experiment] = []
        # What wrapped adapters serve, to refuse an experiment aimed at nothing.
        self._routes: set[str] = set()
        self._backends: set[str] = set()
        if config.enabled:
            now = clock()
            self._running = [Experiment(experiment, now) for experiment in config.experiments]

    @property
    def enabled(self) -> bool:
        return self._config.enabled

    def experiments(self) -> list[dict[str, Any]]:
        """Each experiment's config, whether it is in its window now (`active`), the
        requests it `matched`, `picked` by its rate and `injected` a fault into, and how
        long ago it started (None: it never did, chaos being disabled)."""
        if not self.enabled:
            idle = {"active": False, "matched": 0, "picked": 0, "injected": 0}
            return [
                {**experiment.model_dump(mode="json"), **idle, "started_s_ago": None}
                for experiment in self._config.experiments
            ]
        now = self._clock()
        return [running.report(now) for running in self._running]

    def start(self, experiment: ChaosExperiment) -> None:
        """Start `experiment`, its window from now; one of the same name is replaced (in
        its place, its counts from nothing). `ChaosDisabled` while chaos is disabled,
        `TooManyExperiments` beside 32 others, `InvalidRequest` for a route or backend
        that no wrapped adapter serves."""
        if not self.enabled:
            raise ChaosDisabled(
                f"Chaos is disabled in this gateway's config (chaos.enabled: false): "
                f"experiment '{experiment.name}' cannot be started."
            )
        self._check_targets(experiment)
        running = Experiment(experiment, self._clock())
        for index, other in enumerate(self._running):
            if other.config.name == experiment.name:
                self._running[index] = running
                return
        if len(self._running) >= MAX_CHAOS_EXPERIMENTS:
            raise TooManyExperiments(
                f"{MAX_CHAOS_EXPERIMENTS} chaos experiments are running, the most there may be:"
                f" stop one before starting '{experiment.name}'."
            )
        self._running.append(running)

    def stop(self, name: str) -> bool:
        """Stop the experiment `name`; False if there was none."""
        for index, running in enumerate(self._running):
            if running.config.name == name:
                del self._running[index]
                return True
        return False

    def wrap(self, factory: AdapterFactory, route_of: Mapping[str, str]) -> AdapterFactory:
        """A factory whose adapters are ChaosAdapters around `factory`'s. `route_of` maps
        each backend's name to its route's; a backend it does not name is a LookupError."""
        routes = dict(route_of)
        self._backends.update(routes)
        self._routes.update(routes.values())

        def make(
            backend: BackendConfig,
            timeouts: Timeouts,
            upstream: UpstreamConfig,
            budget: ByteBudget,
            /,
        ) -> ChaosAdapter:
            if backend.name not in routes:
                raise LookupError(f"chaos: backend '{backend.name}' is in no route given")
            inner = factory(backend, timeouts, upstream, budget)
            return ChaosAdapter(inner, self, route=routes[backend.name], backend=backend.name)

        return make

    def _check_targets(self, experiment: ChaosExperiment) -> None:
        if not self._routes:
            return  # nothing wrapped yet: nothing to check against
        for param, names, known in (
            ("routes", experiment.routes, self._routes),
            ("backends", experiment.backends, self._backends),
        ):
            unknown = [name for name in names if name not in known]
            if unknown:
                raise InvalidRequest(
                    f"Chaos experiment '{experiment.name}' targets {param} this gateway does"
                    f" not have: {', '.join(repr(name[:64]) for name in unknown[:5])}.",
                    param=param,
                    code="chaos_target_not_found",
                )

    def _choose(self, route: str, backend: str, context: RequestContext) -> Experiment | None:
        """The experiment whose fault this exchange gets, if any (counted against its rate)."""
        now = self._clock()
        asked = context.chaos
        caller = context.caller
        chosen = None
        for running in self._running:
            config = running.config
            if config.name == asked:
                if running.active(now) and running.targets(route, backend, caller):
                    chosen = running
                    break
            elif (
                chosen is None
                and not config.on_request
                and running.active(now)
                and running.targets(route, backend, caller)
            ):
                chosen = running
                if asked is None:
                    break
        if chosen is None or not chosen.pick():
            return None
        return chosen

    def _injected(self, running: Experiment, context: RequestContext) -> None:
        running.injected += 1
        if context.injected is None:
            context.injected = [running.label]
        else:
            context.injected.append(running.label)
        self._on_injected(running.config.name, running.config.fault.kind)


def backend_routes(config: GatewayConfig) -> dict[str, str]:
    """Each backend's name to its route's: the `route_of` that `Chaos.wrap` takes."""
    return {backend.name: route.name for route in config.models for backend in route.backends}


class ChaosAdapter:
    """An `Adapter` acting the faults of `chaos`'s experiments on `inner`'s exchanges.

    Health checks and metrics scrapes go to `inner` untouched: health's and the load
    scraper's bookkeeping see the real backend, never an injected failure."""

    __slots__ = ("_chaos", "backend", "inner", "name", "route")

    def __init__(self, inner: Adapter, chaos: Chaos, *, route: str, backend: str) -> None:
        self.inner = inner
        self.name = inner.name
        self.route = route
        self.backend = backend
        self._chaos = chaos

    async def start(self) -> None:
        await self.inner.start()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def health(self, timeout_s: float) -> bool:
        return await self.inner.health(timeout_s)

    async def metrics(self) -> bytes | None:
        return await self.inner.metrics()

    async def post(self, path: str, body: bytes, context: RequestContext) -> UpstreamResponse:
        chaos = self._chaos
        if not chaos._running:
            return await self.inner.post(path, body, context)
        running = chaos._choose(self.route, self.backend, context)
        if running is None:
            return await self.inner.post(path, body, context)
        return await self._inject(running, path, body, context)

    async def _inject(
        self, running: Experiment, path: str, body: bytes, context: RequestContext
    ) -> UpstreamResponse:
        chaos = self._chaos
        fault = running.config.fault
        kind = fault.kind
        by = f"(injected by chaos experiment '{running.config.name}')"
        if kind == "latency":
            chaos._injected(running, context)
            await asyncio.sleep(running.delay_s())
            return await self.inner.post(path, body, context)
        if kind == "error":
            chaos._injected(running, context)
            return InjectedError(running.config.name, fault)
        if kind == "refuse":
            chaos._injected(running, context)
            raise UpstreamConnectError(f"connection refused {by}", timed_out=False)
        if kind == "reset":
            chaos._injected(running, context)
            raise UpstreamBroken(f"connection reset before the response's headers {by}")
        if kind == "hang":
            chaos._injected(running, context)
            await _forever()
        response = await self.inner.post(path, body, context)
        if response.status != 200:
            return response  # the upstream's own refusal: no answer for the fault to spoil
        return FaultyAnswer(response, running, lambda: chaos._injected(running, context))


class InjectedError:
    """An `UpstreamResponse` no upstream sent: an error status with OpenAI's error body."""

    __slots__ = ("_body", "content_type", "retry_after", "status")

    def __init__(self, experiment: str, fault: ChaosFault) -> None:
        assert fault.status is not None  # the config's check: an error fault has one
        status = fault.status
        code = fault.code or ("rate_limit_exceeded" if status == 429 else None)
        if status == 429:
            kind = "requests"
        elif status < 500:
            kind = "invalid_request_error"
        else:
            kind = "server_error"
        error = {
            "message": fault.message or f"Chaos experiment '{experiment}' injected this {status}.",
            "type": kind,
            "param": "messages" if code == "context_length_exceeded" else None,
            "code": code,
        }
        self.status: int = status
        self.content_type: str = "application/json"
        # Whole seconds, rounded up, as upstreams send it.
        seconds = fault.retry_after_s
        self.retry_after: str | None = None if seconds is None else str(math.ceil(seconds))
        self._body = orjson.dumps({"error": error})

    async def read(self, limit: int) -> bytes:
        if len(self._body) > limit:
            raise UpstreamBroken(f"the body exceeds {limit} bytes")
        return self._body

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    def close(self) -> None:
        pass


# One event an SSE parser cannot read as JSON: what `malformed` inserts.
MALFORMED_EVENT: Final = data_event(b"{not json")
# Where an event ends: a blank line, in any of SSE's three line endings.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class FaultyAnswer:
    """A real 200 answer whose body a stream fault spoils (`fault.kind` says how);
    `injected` is called once, when the fault takes effect."""

    __slots__ = ("_injected", "_inner", "_running", "content_type", "retry_after", "status")

    def __init__(
        self, inner: UpstreamResponse, running: Experiment, injected: Callable[[], None]
    ) -> None:
        self._inner = inner
        self._running = running
        self._injected = injected
        self.status: int = inner.status
        self.content_type: str = inner.content_type
        self.retry_after: str | None = inner.retry_after

    def close(self) -> None:
        self._inner.close()

    async def read(self, limit: int) -> bytes:
        kind = self._running.config.fault.kind
        if kind == "cut":
            self._injected()
            name = self._running.config.name
            raise UpstreamBroken(f"the body broke off (injected by chaos experiment '{name}')")
        if kind == "slow_first_token":
            self._injected()
            await asyncio.sleep(self._running.delay_s())
        return await self._inner.read(limit)

    async def chunks(self) -> AsyncIterator[bytes]:
        running = self._running
        fault = running.config.fault
        kind = fault.kind
        upstream = self._inner.chunks()
        if kind == "slow_first_token":
            first = True
            async for chunk in upstream:
                if first:
                    first = False
                    self._injected()
                    await asyncio.sleep(running.delay_s())
                yield chunk
        elif kind == "slow_tokens":
            first = True
            async for events in _whole_events(upstream):
                for event in events:
                    if first:
                        first = False
                        self._injected()
                    await asyncio.sleep(running.delay_s())
                    yield event
        elif kind == "no_done":
            dropped = False
            async for events in _whole_events(upstream):
                kept = [event for event in events if not is_done(event)]
                if len(kept) < len(events) and not dropped:
                    dropped = True
                    self._injected()
                if kept:
                    yield b"".join(kept)
        else:
            by = f"(injected by chaos experiment '{running.config.name}')"
            async for piece in _marked(upstream, fault.after_events):
                if isinstance(piece, bytes):
                    yield piece
                elif kind == "cut":
                    self._injected()
                    after = fault.after_events
                    raise UpstreamBroken(f"the stream broke off after {after} events {by}")
                elif kind == "stall":
                    self._injected()
                    await _forever()
                else:  # malformed
                    self._injected()
                    yield MALFORMED_EVENT


async def _whole_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """The whole events (each with its blank line) each read of `chunks` completes; what
    is left unfinished at the end comes last, as it is."""
    pending = b""
    async for chunk in chunks:
        data = pending + chunk if pending else chunk
        events = []
        start = 0
        for end in _EVENT_END.finditer(data):
            events.append(data[start : end.end()])
            start = end.end()
        pending = data[start:]
        if events:
            yield events
    if pending:
        yield [pending]


class _Here:
    """The mark `_marked` puts after the n-th event."""


_HERE: Final = _Here()


async def _marked(chunks: AsyncIterator[bytes], n: int) -> AsyncIterator[bytes | _Here]:
    """`chunks` as whole events (a read's worth at a time), with `_HERE` right after the
    n-th event; none if the stream has fewer."""
    if n == 0:
        yield _HERE
    seen = 0
    async for events in _whole_events(chunks):
        if seen < n <= seen + len(events):
            split = n - seen
            yield b"".join(events[:split])
            yield _HERE
            rest = b"".join(events[split:])
            if rest:
                yield rest
        else:
            yield b"".join(events)
        seen += len(events)


async def _forever() -> NoReturn:
    """Wait until cancelled: what a silent upstream does to its caller."""
    await asyncio.get_running_loop().create_future()  # set by nobody: only cancelled
    raise AssertionError("unreachable")
