"""The router: model name → route → backend → one upstream exchange, under phase timeouts.

It knows models, backends and failure, and nothing of HTTP framing: it hands the edge
either a complete body or a stream of whole SSE events, and raises `GatewayError`s.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
import pybreaker

from gateway.config import BackendConfig, ModelRoute, Timeouts
from gateway.edge.record import RequestRecord
from gateway.errors import (
    ContextTooLong,
    GatewayError,
    ModelNotFound,
    NoLiveBackend,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
)
from gateway.router.hooks import RouterHooks
from gateway.router.readtimer import ReadTimer
from gateway.wire.assemble import Assembler, Incomplete, can_assemble, streaming_payload
from gateway.wire.sse import DONE_EVENT, ChunkRecorder, SSEObserver, error_event
from gateway.wire.validation import Endpoint, ProxyRequest
from policies.adaptive import AdaptiveLimit, latency_sample
from policies.admission import Admission
from policies.affinity import key_hash
from policies.breaker import BackendBreaker
from policies.health import HealthState
from policies.load import UpstreamLoad
from policies.resume import Diverged, Splice, Transcript, prefill_payload
from policies.retry import AttemptFailed, RetryPolicy
from policies.selection import Selector, create_selector
from providers import Adapter, UpstreamBroken, UpstreamConnectError, UpstreamResponse
from providers.base import UpstreamBufferFull, retry_after_seconds
from providers.http1 import ByteBudget

# A backend that refused a connection sits out this long; nothing was sent to it, so
# skipping it costs nobody anything. Active health checks come with the health policy.
CONNECT_FAILURE_EJECT_S = 2.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
LATENCY_EWMA_ALPHA = 0.3  # weight of the newest sample
T = TypeVar("T")


@dataclass(slots=True)
class Backend:
    config: BackendConfig
    adapter: Adapter
    upstream_model: str
    breaker: BackendBreaker
    health: HealthState = field(default_factory=HealthState)
    ejected_until: float = 0.0
    in_flight: int = 0
    latency_ewma_s: float = 0.0  # upstream time to answer (or to the first event), smoothed
    upstream: UpstreamLoad = field(default_factory=UpstreamLoad)  # what vLLM says it runs
    limiter: AdaptiveLimit | None = None  # with adaptive_concurrency: the limit in force

    @property
    def weight(self) -> int:
        return self.config.weight

    @property
    def load(self) -> int:
        """Requests it works on: ours in flight, plus others' while its report is fresh."""
        return self.in_flight + self.upstream.extra

    def observe_latency(self, seconds: float) -> None:
        ewma = self.latency_ewma_s
        self.latency_ewma_s = (
            seconds if ewma == 0.0 else ewma + LATENCY_EWMA_ALPHA * (seconds - ewma)
        )

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def max_in_flight(self) -> int:
        return self.config.max_in_flight or self.config.max_connections

    @property
    def concurrency_limit(self) -> int:
        return self.max_in_flight if self.limiter is None else self.limiter.limit

    def usable(self, now: float) -> bool:
        return (
            self.health.healthy
            and self.ejected_until <= now
            and self.in_flight < self.concurrency_limit
            and self.breaker.allows()
        )

    def answered(self, latency_s: float, *, stream: bool, completion_tokens: int | None) -> None:
        """An attempt's answer (a stream's first event) came after `latency_s`."""
        self.observe_latency(latency_s)
        if self.limiter is not None:
            sample, signal = latency_sample(
                latency_s, stream=stream, completion_tokens=completion_tokens
            )
            # A finished exchange has left in_flight already; a stream that just started has not.
            in_flight = self.in_flight if stream else self.in_flight + 1
            self.limiter.on_sample(sample, signal=signal, in_flight=in_flight)

    def overloaded(self) -> None:
        """A timeout, 429 or 503: the adaptive limit backs off."""
        if self.limiter is not None:
            self.limiter.on_sample(0.0, dropped=True)


@dataclass(slots=True)
class Route:
    config: ModelRoute
    backends: list[Backend]
    retry: RetryPolicy
    fallbacks: tuple[Route, ...] = ()
    selector: Selector = field(init=False)

    def __post_init__(self) -> None:
        self.selector = create_selector(
            self.config.strategy,
            [backend.weight for backend in self.backends],
            self.config.seed,
            names=[backend.name for backend in self.backends],
            epsilon=self.config.affinity.epsilon,
        )

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def timeouts(self) -> Timeouts:
        return self.config.timeouts

    def backend_named(self, name: str) -> Backend | None:
        for backend in self.backends:
            if backend.name == name:
                return backend
        return None

    def choose(
        self,
        now: float,
        avoid: Collection[Backend] = (),
        key: str | None = None,
        pin: Backend | None = None,
        decisions: list[Decision] | None = None,
    ) -> Backend:
        """The next backend by the route's strategy among the usable ones, preferring any
        not in `avoid`; `key` is the request's affinity key, if any. A pinned request goes
        to its backend or nowhere. With `decisions`, the decision's inputs are appended to
        it, enough to replay it (`vgate route explain`)."""
        if decisions is not None:
            state = self.selector.state()
            loads = [(b.load, b.latency_ewma_s, b.usable(now), b in avoid) for b in self.backends]
        if pin is not None:
            if not pin.usable(now):
                raise NoLiveBackend(
                    f"Backend '{pin.name}', which this request is pinned to, is not taking "
                    "requests: failing its health checks, refusing connections, at its "
                    "in-flight limit, or behind an open circuit breaker.",
                    headers={"Retry-After": str(self._retry_in(now))},
                )
            if decisions is not None:
                decisions.append(Decision(self, state, key, pin.name, loads, pin.name, "pin"))
            return pin
        backends = self.backends
        usable = [backend.usable(now) for backend in backends]
        index = None
        if avoid:
            index = self.selector.pick(
                backends,
                [ok and backend not in avoid for ok, backend in zip(usable, backends, strict=True)],
                key,
            )
        reason: str = self.config.strategy
        if avoid:
            reason += ", avoiding backends tried" if index is not None else ", only tried left"
        if index is None:
            index = self.selector.pick(backends, usable, key)
        if decisions is not None:
            choice = backends[index].name if index is not None else None
            decisions.append(Decision(self, state, key, None, loads, choice, reason))
        if index is None:
            raise NoLiveBackend(
                f"No live backend for model '{self.name}': every backend is failing its "
                "health checks, refusing connections, at its in-flight limit, or behind an "
                "open circuit breaker.",
                headers={"Retry-After": str(self._retry_in(now))},
            )
        return backends[index]

    def _retry_in(self, now: float) -> int:
        waits = [max(b.ejected_until - now, 0.0) for b in self.backends if b.ejected_until > now]
        waits.append(self.config.breaker.open_s if not waits else min(waits))
        return max(1, math.ceil(min(waits)))


@dataclass(slots=True)
class Decision:
    """One backend choice and everything it depended on: logged, and replayable."""

    route: Route
    state: Any  # the selector's state before the pick
    key: str | None
    pin: str | None
    loads: list[tuple[int, float, bool, bool]]  # per backend: load, latency, usable, tried
    choice: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        route = self.route
        return {
            "route": route.name,
            "strategy": route.config.strategy,
            "seed": route.config.seed,
            "state": self.state,
            "key_hash": None if self.key is None else key_hash(self.key),
            "pin": self.pin,
            "candidates": [
                {
                    "name": backend.name,
                    "weight": backend.weight,
                    "load": load,
                    "latency_s": latency,
                    "usable": usable,
                    "tried": tried,
                }
                for backend, (load, latency, usable, tried) in zip(
                    route.backends, self.loads, strict=True
                )
            ],
            "choice": self.choice,
            "reason": self.reason,
        }


@dataclass(slots=True)
class Completion:
    body: bytes
    content_type: str


Attempt = Callable[[Route, Backend, ProxyRequest, RequestRecord, float], Awaitable[T]]


@dataclass(frozen=True, slots=True)
class AnswerBounds:
    """What an answer the gateway assembles from a stream may hold (`upstream:` config):
    `max_bytes` of events for one answer, and the process's shared `budget` of answers
    held in memory at once, which whole-body reads in the adapters count against too."""

    max_bytes: int = 16 * 1024 * 1024
    budget: ByteBudget = field(default_factory=lambda: ByteBudget(256 * 1024 * 1024))


class Router:
    def __init__(
        self,
        routes: Iterable[Route],
        *,
        admission: Admission | None = None,
        answers: AnswerBounds | None = None,
        hooks: RouterHooks | None = None,
    ) -> None:
        self.routes = tuple(routes)
        self.hooks = hooks or RouterHooks()
        self.answers = answers or AnswerBounds()
        self.admission = admission or Admission(limit=1024, max_waiting=256, timeout_s=1.0)
        self._by_name: dict[str, Route] = {}
        for route in self.routes:
            for name in (route.name, *route.config.aliases):
                self._by_name[name] = route
        by_route_name = {route.name: route for route in self.routes}
        for route in self.routes:
            route.fallbacks = tuple(by_route_name[name] for name in route.config.fallbacks)
        self._available = ", ".join(sorted(self._by_name))

    @property
    def backends(self) -> list[Backend]:
        return [backend for route in self.routes for backend in route.backends]

    def route_for(self, model: str) -> Route:
        route = self._by_name.get(model)
        if route is None:
            shown = model if len(model) <= 100 else model[:100] + "…"
            raise ModelNotFound(
                f"The model '{shown}' does not exist. Available models: {self._available}.",
                param="model",
            )
        return route

    async def complete(
        self, route: Route, request: ProxyRequest, record: RequestRecord
    ) -> Completion:
        return await self._run(route, request, record, self._complete_once)

    async def open_stream(
        self, route: Route, request: ProxyRequest, record: RequestRecord
    ) -> ClientStream:
        """Start a stream and wait for its first event; failures so far are HTTP errors.

        Once it has reached the client, a stream that breaks is resumed on another backend
        of the route that answered, where the route allows it (see `ResumableStream`).
        """
        resumable = request.payload.get("n") in (None, 1)

        async def once(
            route: Route,
            backend: Backend,
            request: ProxyRequest,
            record: RequestRecord,
            deadline: float,
        ) -> UpstreamStream:
            settings = route.config.resume
            recorder = None
            if resumable and settings.enabled:
                chat = request.endpoint is Endpoint.CHAT
                recorder = Transcript(chat=chat, max_chars=settings.max_text_chars)
            return await self._stream_once(route, backend, request, record, deadline, recorder)

        stream = await self._run(route, request, record, once)
        transcript = stream.observer.recorder
        if not isinstance(transcript, Transcript):
            return stream
        answering = self.route_for(record.model) if record.model else route
        return ResumableStream(self, answering, request, record, stream, transcript)

    async def _run(
        self, route: Route, request: ProxyRequest, record: RequestRecord, once: Attempt[T]
    ) -> T:
        """Attempts on `route` under its retry policy, then on its fallbacks, in order.

        One deadline, the first route's `total_s`, covers every attempt and every wait.
        A fallback is tried when a route has no usable backend or runs out of attempts; a
        prompt too long for a route goes only to fallbacks with a larger context window.
        A client error (400, 404...) from an upstream ends the request as it is.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + route.timeouts.total_s
        current = route
        # X-VGate-Pin reproduces one backend's behaviour: never hidden by a fallback.
        candidates = [] if request.pin_forced else list(route.fallbacks)
        while True:
            try:
                return await self._on_route(current, request, record, once, deadline)
            except NoLiveBackend as error:
                last: GatewayError = error
            except _RouteExhausted as exhausted:
                last = exhausted.failure.error
            except AttemptFailed as failure:
                last = failure.error
                if isinstance(failure.error, ContextTooLong):
                    window = current.config.context_window or 0
                    candidates = [c for c in candidates if (c.config.context_window or 0) > window]
                elif not failure.retryable:
                    raise failure.error from None
            if not candidates or loop.time() >= deadline:
                raise last
            previous, current = current, candidates.pop(0)
            record.model = current.name
            record.fallback_from = record.fallback_from or route.name
            self.hooks.on_fallback(previous.name, current.name)

    async def _on_route(
        self,
        route: Route,
        request: ProxyRequest,
        record: RequestRecord,
        once: Attempt[T],
        deadline: float,
        avoid: Collection[Backend] = (),
    ) -> T:
        """Attempts on one route's backends, a different one each time while any is left."""
        loop = asyncio.get_running_loop()
        tried: list[Backend] = list(avoid)
        failures: list[AttemptFailed] = []
        pin = route.backend_named(request.pin) if request.pin is not None else None

        async def attempt(number: int) -> T:
            try:
                backend = route.choose(
                    loop.time(), tried, request.affinity_key, pin, record.decisions
                )
            except NoLiveBackend:
                if failures:  # the last real failure says more than "nothing left"
                    raise _RouteExhausted(failures[-1]) from None
                raise
            tried.append(backend)
            record.backend = backend.name
            record.attempts += 1
            try:
                return await once(route, backend, request, record, deadline)
            except pybreaker.CircuitBreakerError:
                # Opened between selection and the attempt: skip it, no fault of its own.
                raise AttemptFailed(
                    NoLiveBackend(f"Backend '{backend.name}' is not taking requests."),
                    backend=backend.name,
                    retryable=True,
                    backend_fault=False,
                ) from None
            except AttemptFailed as failure:
                failures.append(failure)
                if failure.retry_after_s is not None:
                    _honour_retry_after(route, backend, failure, loop.time())
                raise

        def on_retry(failure: AttemptFailed, delay: float) -> None:
            record.waited_s += delay
            self.hooks.on_retry(route.name, delay)

        return await route.retry.run(attempt, deadline=deadline, on_retry=on_retry)

    async def _complete_once(
        self,
        route: Route,
        backend: Backend,
        request: ProxyRequest,
        record: RequestRecord,
        deadline: float,
    ) -> Completion:
        if (
            route.config.non_stream == "assemble"
            and request.endpoint is not Endpoint.EMBEDDINGS
            and can_assemble(request.payload)
        ):
            return await self._assemble_once(route, backend, request, record, deadline)
        loop = asyncio.get_running_loop()
        body = _upstream_body(request, backend, ask_usage=False)
        asked = loop.time()
        sent = time.perf_counter()
        response: UpstreamResponse | None = None
        backend.in_flight += 1
        with backend.breaker.attempt():
            try:
                async with asyncio.timeout_at(deadline):
                    response = await backend.adapter.post(
                        request.endpoint.value, body, record.request_id, record.traceparent
                    )
                    if response.status != 200:
                        raise await _rejection(backend, response)
                    content_type = response.content_type
                    if not _is_json(content_type):
                        raise _broken(
                            backend,
                            f"answered with '{content_type[:64] or 'no content type'}', not JSON",
                        )
                    data = await response.read(MAX_RESPONSE_BYTES)
            except TimeoutError:
                backend.overloaded()
                # The deadline is the first route's, so a fallback's own total_s is not it.
                left = deadline - asked
                raise AttemptFailed(
                    UpstreamTimeout(
                        f"Backend '{backend.name}' did not answer within the {left:.3g}s left "
                        f"of the request's total time (timeouts.total_s)."
                    ),
                    backend=backend.name,
                    retryable=False,
                    backend_fault=True,
                ) from None
            except UpstreamConnectError as exc:
                raise _connect_failure(backend, exc, loop.time()) from None
            except UpstreamBroken as exc:
                raise _broken(backend, f"failed mid-response: {exc}") from None
            finally:
                backend.in_flight -= 1
                if response is not None:
                    response.close()
                record.add_upstream(time.perf_counter() - sent)
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError:
                payload = None
            if not isinstance(payload, dict):
                raise _broken(backend, "answered with a body that is not JSON")
        record.record_usage(payload.get("usage"))
        backend.answered(record.backend_s, stream=False, completion_tokens=record.completion_tokens)
        # Checked to be JSON above; the upstream's own label (its parameters, its vendor
        # type) is not the client's business.
        return Completion(data, "application/json")

    async def _assemble_once(
        self,
        route: Route,
        backend: Backend,
        request: ProxyRequest,
        record: RequestRecord,
        deadline: float,
    ) -> Completion:
        """A non-streaming answer asked for as a stream and put together here (see
        gateway.wire.assemble): the stream's phase timeouts apply, and an answer that breaks
        at any point is an attempt that failed, retried before the client has anything."""
        assembler = Assembler(chat=request.endpoint is Endpoint.CHAT)
        payload = streaming_payload(request.payload)
        stream = await self._stream_once(
            route, backend, request, record, deadline, assembler, payload
        )
        first_at = time.perf_counter()
        observer = stream.observer
        bounds = self.answers
        budget = bounds.budget
        # What the events hold is what the answer being built holds: bounded per answer
        # (the upstream's fault past it) and, with every other answer in memory, per process
        # (the gateway's overload: 503, retried by the client, counted by no breaker).
        held = 0
        failure: AttemptFailed | None = None

        def hold(events: bytes) -> None:
            nonlocal held
            if held + len(events) > bounds.max_bytes:
                raise _broken(
                    backend,
                    f"answered more than {bounds.max_bytes} bytes (upstream.max_body_bytes)",
                )
            if not budget.take(len(events)):
                raise UpstreamBufferFull(budget.limit)
            held += len(events)

        try:
            hold(stream.first)
            async for events in stream.rest():
                hold(events)
            if observer.malformed:
                # Its text is missing from the answer: never a whole-looking 200 that is not.
                raise _broken(backend, f"sent {observer.malformed} events that are not JSON")
            answer = assembler.answer(observer.usage)
        except StreamInterrupted as interrupted:
            failure = _interrupted(backend, interrupted, stream.deadline)
        except Incomplete as incomplete:
            failure = _broken(backend, str(incomplete))
        except AttemptFailed as caught:
            failure = caught
        finally:
            stream.close()
            budget.give(held)
            # The whole answer was the upstream's time, as a non-streaming one's is.
            rest = time.perf_counter() - first_at
            record.backend_s += rest
            record.upstream_s = (record.upstream_s or 0.0) + rest
        if failure is not None:
            _blame(backend, failure)
            raise failure
        record.record_usage(observer.usage)
        return Completion(orjson.dumps(answer), "application/json")

    async def _stream_once(
        self,
        route: Route,
        backend: Backend,
        request: ProxyRequest,
        record: RequestRecord,
        deadline: float,
        recorder: ChunkRecorder | None = None,
        payload: dict[str, Any] | None = None,
    ) -> UpstreamStream:
        loop = asyncio.get_running_loop()
        timeouts = route.timeouts
        # Ask for usage even when the client did not, so tokens are always accounted.
        body = _upstream_body(
            request, backend, ask_usage=not request.client_wants_usage, payload=payload
        )
        observer = SSEObserver(drop_usage_chunk=not request.client_wants_usage)
        observer.recorder = recorder
        now = loop.time()
        stream = UpstreamStream(backend, observer, deadline=deadline, idle_s=timeouts.idle_s)
        first_token_deadline = min(now + timeouts.first_token_s, deadline)
        sent = time.perf_counter()
        with backend.breaker.attempt():
            try:
                async with asyncio.timeout_at(first_token_deadline):
                    stream.response = response = await backend.adapter.post(
                        request.endpoint.value, body, record.request_id, record.traceparent
                    )
                    if response.status != 200:
                        raise await _rejection(backend, response)
                    if not response.content_type.startswith("text/event-stream"):
                        raise _broken(
                            backend,
                            f"answered a stream request with "
                            f"'{response.content_type or 'no content type'}', not an event stream",
                        )
                    stream.first = await stream.first_events()
            except TimeoutError:
                stream.close()
                backend.overloaded()
                in_time = first_token_deadline < deadline
                phase = "first_token_s" if in_time else "total_s"
                raise AttemptFailed(
                    UpstreamTimeout(
                        f"Backend '{backend.name}' sent no first token within "
                        f"{first_token_deadline - now:g}s (timeouts.{phase}).",
                    ),
                    backend=backend.name,
                    retryable=in_time,
                    backend_fault=True,
                ) from None
            except UpstreamConnectError as exc:
                stream.close()
                raise _connect_failure(backend, exc, loop.time()) from None
            except UpstreamBroken as exc:
                stream.close()
                raise _broken(backend, f"failed before the first token: {exc}") from None
            except BaseException:
                stream.close()
                raise
            finally:
                record.add_upstream(time.perf_counter() - sent)
            if observer.error is not None:
                stream.close()
                raise _first_event_error(backend, observer.error)
        backend.answered(record.backend_s, stream=True, completion_tokens=None)
        return stream


def _honour_retry_after(route: Route, backend: Backend, failure: AttemptFailed, now: float) -> None:
    """A Retry-After speaks for the backend that sent it, not for the request.

    When another backend can answer now, this one sits out the (capped) time and the
    retry goes elsewhere at once; otherwise the retry itself waits that long.
    """
    if not any(other.usable(now) for other in route.backends if other is not backend):
        return
    assert failure.retry_after_s is not None
    rest = min(failure.retry_after_s, route.config.retries.retry_after_max_s)
    backend.ejected_until = max(backend.ejected_until, now + rest)
    failure.retry_after_s = None


class _RouteExhausted(Exception):
    """A retry found no usable backend left on its route."""

    def __init__(self, failure: AttemptFailed) -> None:
        super().__init__(failure.error.message)
        self.failure = failure


class StreamInterrupted(GatewayError):
    """A stream broke after its first byte reached the client."""

    def event(self) -> bytes:
        return error_event(self.payload())


class UpstreamStream:
    """An upstream event stream whose first event has arrived."""

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.observer.usage

    @property
    def dropped_events(self) -> int:
        return self.observer.malformed

    __slots__ = (
        "_chunks",
        "_closed",
        "_timer",
        "backend",
        "deadline",
        "first",
        "idle_s",
        "observer",
        "response",
    )

    def __init__(
        self, backend: Backend, observer: SSEObserver, *, deadline: float, idle_s: float
    ) -> None:
        # The stream counts against its backend's in-flight limit until it is closed.
        backend.in_flight += 1
        self._closed = False
        self.backend = backend
        self.observer = observer
        self.deadline = deadline
        self.idle_s = idle_s
        self.response: UpstreamResponse | None = None
        self.first = b""
        self._chunks: AsyncIterator[bytes] | None = None
        self._timer: ReadTimer | None = None

    async def first_events(self) -> bytes:
        while True:
            events = await self._next()
            if events is None:
                raise UpstreamBroken("the stream ended before its first event")
            if events or self.observer.error is not None:
                return events

    async def rest(self) -> AsyncIterator[bytes]:
        """Events after the first, each batch as soon as it is whole; ends after [DONE].

        Raises `StreamInterrupted` when the upstream breaks, stalls past `idle_s`, runs
        past `total_s`, or ends before it finished.
        """
        observer = self.observer
        name = self.backend.name
        # One timer for every read: asyncio.timeout_at around each would cost more than
        # the event's own handling (gateway.router.readtimer).
        self._timer = timer = ReadTimer(self.idle_s, self.deadline)
        try:
            while not observer.done:
                timer.start()
                try:
                    events = await self._next()
                except asyncio.CancelledError:
                    if not timer.expired():
                        raise
                    if observer.finished:
                        break  # the answer is whole; only its [DONE] is late
                    if timer.idle_expired:
                        reason = f"sent nothing for {self.idle_s:g}s (timeouts.idle_s)"
                    else:
                        reason = "ran past the request's total time (timeouts.total_s)"
                    raise StreamInterrupted(
                        f"Backend '{name}' {reason}; the stream was cut off.",
                        code="upstream_timeout",
                    ) from None
                except UpstreamBroken as exc:
                    if observer.finished:
                        break
                    raise StreamInterrupted(
                        f"Backend '{name}' broke off the stream: {exc}",
                        code="upstream_stream_broken",
                    ) from None
                finally:
                    timer.stop()
                if events is None:
                    if observer.finished:
                        break
                    raise StreamInterrupted(
                        f"Backend '{name}' ended the stream before the answer finished.",
                        code="upstream_stream_incomplete",
                    )
                if observer.error is not None:
                    if events:
                        yield events  # what came before the error is part of the answer
                    raise StreamInterrupted(
                        f"Backend '{name}' reported an error mid-stream: "
                        f"{observer.error.get('message', 'no message')}",
                        code="upstream_stream_error",
                    )
                if events:
                    yield events
        finally:
            timer.close()
        if not observer.done:
            # Finished but forgot [DONE], or lost it: the answer is whole, so complete it.
            observer.done = True
            yield DONE_EVENT

    async def _next(self) -> bytes | None:
        """Whole events from the next read (maybe b""), or None at end of stream."""
        if self._chunks is None:
            assert self.response is not None
            self._chunks = self.response.chunks()
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            tail = self.observer.flush()
            return tail or None
        return self.observer.feed(chunk)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.backend.in_flight -= 1
        if self._timer is not None:
            self._timer.close()  # a consumer that left without closing `rest()` too
        if self.response is not None:
            self.response.close()


class ResumableStream:
    """A client's stream, continued on another backend of its route when its upstream breaks.

    Resumption happens only after the stream reached the client (before that, a failure is
    the retry policy's). It is bounded by the route's `resume.attempts`, the request's
    deadline and the route's retry budget, and it never hides the original failure: when
    it cannot go on, the client's error event names what broke and why resuming failed.
    """

    __slots__ = (
        "_dropped",
        "_router",
        "_splice",
        "_stream",
        "backend",
        "first",
        "record",
        "request",
        "resumptions",
        "route",
        "transcript",
    )

    def __init__(
        self,
        router: Router,
        route: Route,
        request: ProxyRequest,
        record: RequestRecord,
        stream: UpstreamStream,
        transcript: Transcript,
    ) -> None:
        self._router = router
        self.route = route
        self.request = request
        self.record = record
        self._stream = stream
        self._splice: Splice | None = None
        self._dropped = 0
        self.transcript = transcript
        self.backend = stream.backend  # the one whose name the response headers carry
        self.first = stream.first
        self.resumptions = 0

    @property
    def usage(self) -> dict[str, Any] | None:
        usage = self._stream.observer.usage
        return usage if self._splice is None else self._splice.adjust_usage(usage)

    @property
    def dropped_events(self) -> int:
        return self._dropped + self._stream.observer.malformed

    async def rest(self) -> AsyncIterator[bytes]:
        """Events after the first, across resumptions; raises `StreamInterrupted` as
        `UpstreamStream.rest` does when the stream cannot be continued."""
        while True:
            try:
                async for events in self._stream.rest():
                    if self._splice is not None:
                        events = self._spliced(events)
                    if events:
                        yield events
                return
            except StreamInterrupted as interrupted:
                if interrupted.code == _DIVERGED:
                    raise
                first = await self._resume(interrupted)
            if first:
                yield first

    def _spliced(self, events: bytes) -> bytes:
        assert self._splice is not None
        try:
            return self._splice.rewrite(events)
        except Diverged as diverged:
            self._count("prefill" if self._splice.prefill else "regenerate", "diverged")
            raise StreamInterrupted(
                f"The stream broke and was resumed on backend '{self._stream.backend.name}', "
                f"but {diverged}; it was cut off rather than spliced.",
                code=_DIVERGED,
            ) from None

    async def _resume(self, interrupted: StreamInterrupted) -> bytes:
        """Continue on another backend and return its first events for the client, or
        raise `interrupted`, saying why not."""
        route = self.route
        settings = route.config.resume
        transcript = self.transcript
        why_not = None
        if not transcript.resumable:
            why_not = "its answer cannot be replayed (tool calls, several choices or too long)"
        elif self.resumptions >= settings.attempts:
            why_not = f"it was already resumed {self.resumptions} times (resume.attempts)"
        elif not route.retry.budget.can_spend():
            why_not = "the route's retry budget is spent"
        if why_not is not None:
            raise StreamInterrupted(
                f"{interrupted.message} It was not resumed: {why_not}.", code=interrupted.code
            ) from None
        route.retry.budget.spend()
        self.resumptions += 1
        self.record.resumptions += 1
        failed = self._stream.backend
        self._dropped += self._stream.observer.malformed
        self._stream.close()
        router = self._router
        chat = transcript.chat and bool(transcript.text)
        mode = "regenerate"

        async def once(
            route: Route,
            backend: Backend,
            request: ProxyRequest,
            record: RequestRecord,
            deadline: float,
        ) -> UpstreamStream:
            nonlocal mode
            prefill = chat and backend.config.can_prefill
            mode = "prefill" if prefill else "regenerate"
            payload = prefill_payload(request.payload, transcript) if prefill else None
            return await router._stream_once(
                route, backend, request, record, deadline, None, payload
            )

        try:
            stream = await router._on_route(
                route, self.request, self.record, once, self._stream.deadline, avoid=(failed,)
            )
        except (GatewayError, AttemptFailed, _RouteExhausted) as exc:
            self._count(mode, "failed")
            reason = _message_of(exc)
            raise StreamInterrupted(
                f"{interrupted.message} Resuming it failed: {reason}", code=interrupted.code
            ) from None
        self._stream = stream
        self._splice = Splice(transcript, prefill=mode == "prefill")
        self._count(mode, "resumed")
        return self._spliced(stream.first)

    def _count(self, mode: str, outcome: str) -> None:
        self._router.hooks.on_resume(self.route.name, mode, outcome)

    def close(self) -> None:
        self._stream.close()


def _message_of(exc: BaseException) -> str:
    if isinstance(exc, _RouteExhausted):
        return exc.failure.error.message
    if isinstance(exc, AttemptFailed):
        return exc.error.message
    if isinstance(exc, GatewayError):
        return exc.message
    return str(exc)


ClientStream = UpstreamStream | ResumableStream
_DIVERGED = "stream_resume_diverged"


def _upstream_body(
    request: ProxyRequest,
    backend: Backend,
    *,
    ask_usage: bool,
    payload: dict[str, Any] | None = None,
) -> bytes:
    if payload is None:
        payload = request.payload
    payload["model"] = backend.upstream_model
    if request.stream and ask_usage:
        options = payload.get("stream_options") or {}
        payload["stream_options"] = {**options, "include_usage": True}
    return orjson.dumps(payload)


def _connect_failure(backend: Backend, exc: UpstreamConnectError, now: float) -> AttemptFailed:
    # Nothing reached the backend: always safe to try another.
    backend.ejected_until = now + CONNECT_FAILURE_EJECT_S
    error: GatewayError
    if exc.timed_out:
        error = UpstreamTimeout(
            f"Backend '{backend.name}' did not accept a connection in time (timeouts.connect_s)."
        )
    else:
        error = UpstreamError(
            f"Backend '{backend.name}' is unreachable: {exc}", code="upstream_unreachable"
        )
    return AttemptFailed(error, backend=backend.name, retryable=True, backend_fault=True)


def _interrupted(
    backend: Backend, interrupted: StreamInterrupted, deadline: float
) -> AttemptFailed:
    """A stream assembled for a non-streaming client broke: nothing reached the client, so
    another attempt may start afresh, while the request's time lasts."""
    error: GatewayError
    if interrupted.code == "upstream_timeout":
        error = UpstreamTimeout(interrupted.message)
    else:
        error = UpstreamError(interrupted.message, code=interrupted.code)
    in_time = asyncio.get_running_loop().time() < deadline
    return AttemptFailed(error, backend=backend.name, retryable=in_time, backend_fault=True)


def _blame(backend: Backend, failure: AttemptFailed) -> None:
    """Count a failure after the first event against the backend's breaker (which counted
    the attempt's start as a success), as a non-streaming exchange that broke would be."""
    try:
        with backend.breaker.attempt():
            raise failure
    except (AttemptFailed, pybreaker.CircuitBreakerError):
        pass


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _broken(backend: Backend, what: str) -> AttemptFailed:
    return AttemptFailed(
        UpstreamError(f"Backend '{backend.name}' {what}."),
        backend=backend.name,
        retryable=True,
        backend_fault=True,
    )


_RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
_CONTEXT_TOO_LONG = re.compile(
    r"context length|context window|too many tokens|prompt is too long", re.I
)


async def _rejection(backend: Backend, response: UpstreamResponse) -> AttemptFailed:
    """What an upstream's non-200 answer means for the client and for the retry policy."""
    status = response.status
    if status in (429, 503):
        backend.overloaded()
    try:
        data = await response.read(MAX_ERROR_BODY_BYTES)
        payload: Any = orjson.loads(data)
    except (UpstreamBroken, UpstreamBufferFull, orjson.JSONDecodeError):
        payload = None  # the status says enough; a body that could not be held is unread
    message = _error_message(payload)
    retryable = status in _RETRYABLE_STATUSES
    seconds = retry_after_seconds(response.retry_after)
    retry_after = seconds if retryable else None
    error: GatewayError
    if status in (401, 403, 407):
        # The client's key was fine; the gateway's own credentials for this backend are not.
        error = UpstreamError(
            f"Backend '{backend.name}' refused the gateway's credentials ({status}).",
            code="upstream_auth_failed",
        )
        return AttemptFailed(error, backend=backend.name, retryable=True, backend_fault=True)
    if 400 <= status < 500:
        error_body = payload.get("error") if isinstance(payload, dict) else None
        # OpenAI's four keys, always: the upstream's values where it gave them.
        normalised = {
            "message": message or f"Backend '{backend.name}' answered {status}.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
            **(error_body if isinstance(error_body, dict) else {}),
        }
        # The client gets the parsed whole seconds, never the upstream's own bytes.
        headers = {"Retry-After": str(seconds)} if seconds is not None else {}
        rejected_type = (
            ContextTooLong
            if status == 400 and _CONTEXT_TOO_LONG.search(message or "")
            else UpstreamRejected
        )
        error = rejected_type(status, {"error": normalised}, headers)
        return AttemptFailed(
            error,
            backend=backend.name,
            retryable=retryable,
            backend_fault=False,
            retry_after_s=retry_after,
        )
    detail = f": {message}" if message else ""
    error = UpstreamError(
        f"Backend '{backend.name}' answered {status}{detail}", code="upstream_error"
    )
    return AttemptFailed(
        error,
        backend=backend.name,
        retryable=retryable,
        backend_fault=True,
        retry_after_s=retry_after,
    )


def _first_event_error(backend: Backend, error: dict[str, Any]) -> AttemptFailed:
    code = error.get("code")
    message = str(error.get("message") or "no message")
    if isinstance(code, int) and 400 <= code < 500 and code not in (401, 403, 407, 429):
        rejected_type = ContextTooLong if _CONTEXT_TOO_LONG.search(message) else UpstreamRejected
        return AttemptFailed(
            rejected_type(code, {"error": error}, {}),
            backend=backend.name,
            retryable=False,
            backend_fault=False,
        )
    return AttemptFailed(
        UpstreamError(f"Backend '{backend.name}' failed its stream at once: {message}"),
        backend=backend.name,
        retryable=True,
        backend_fault=code != 429,
    )


def _error_message(payload: Any) -> str | None:
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:500]
        if isinstance(payload.get("message"), str):
            return str(payload["message"])[:500]
    return None
