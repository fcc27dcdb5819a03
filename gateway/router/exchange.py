"""One upstream exchange: a request to one backend, under the request's phase timeouts.

Each function here is one attempt. It either returns what the client gets (a whole body,
or a stream whose first event has arrived) or raises `AttemptFailed`, a fact for the retry
loop in gateway/router/router.py: retry or not, the backend's fault or not.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import (
    BreakerOpen,
    GatewayError,
    StreamInterrupted,
    UpstreamBroken,
    UpstreamBufferFull,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.router.backend import Backend
from gateway.router.outcome import AttemptRecord, Completion, Outcome
from gateway.router.plan import Plan
from gateway.router.route import Route
from gateway.router.streams import UpstreamStream
from gateway.wire.assemble import Assembler, Incomplete, can_assemble, streaming_payload
from gateway.wire.headers import retry_after_seconds
from gateway.wire.sse import ChunkRecorder, SSEObserver
from gateway.wire.upstream import (
    MAX_ERROR_BODY_BYTES,
    Verdict,
    is_event_stream,
    is_json,
    rejection,
    stream_error,
)
from gateway.wire.validation import Endpoint, ProxyRequest
from policies.retry import AttemptFailed
from providers import UpstreamResponse
from providers.http1 import ByteBudget

# A backend that refused a connection sits out this long; nothing was sent to it, so
# skipping it costs nobody anything.
CONNECT_FAILURE_EJECT_S = 2.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class Window:
    """An attempt's time, in event-loop time: its answer (a stream's first token) by
    `answer_by`, a stream's last event by `end_by`, the request's one deadline. They differ
    while the route has fallbacks, which keep the rest (`timeouts.fallback_reserve_s`)."""

    answer_by: float
    end_by: float

    def phase(self) -> str:
        """The config that set `answer_by`, for a timeout's message."""
        if self.answer_by < self.end_by:
            return "total_s less the fallback_reserve_s kept for the route's fallbacks"
        return "total_s"


@dataclass(frozen=True, slots=True)
class AnswerBounds:
    """What an answer the gateway assembles from a stream may hold (`upstream:` config):
    `max_bytes` of events for one answer, and the process's shared `budget` of answers
    held in memory at once, which whole-body reads in the adapters count against too."""

    max_bytes: int = 16 * 1024 * 1024
    budget: ByteBudget = field(default_factory=lambda: ByteBudget(256 * 1024 * 1024))


async def complete(
    plan: Plan,
    outcome: Outcome,
    route: Route,
    backend: Backend,
    window: Window,
    answers: AnswerBounds,
    tried: AttemptRecord,
) -> Completion:
    """A non-streaming answer: passed through whole, or assembled from a stream."""
    request = plan.request
    if (
        route.config.non_stream == "assemble"
        and request.endpoint is not Endpoint.EMBEDDINGS
        and can_assemble(request.payload)
    ):
        return await _assemble(plan, outcome, route, backend, window, answers, tried)
    loop = asyncio.get_running_loop()
    body = upstream_body(request, backend, ask_usage=False)
    asked = loop.time()
    sent = time.perf_counter()
    response: UpstreamResponse | None = None
    backend.in_flight += 1
    with backend.breaker.attempt():
        try:
            async with asyncio.timeout_at(window.answer_by):
                response = await backend.adapter.post(request.endpoint.value, body, plan.context)
                tried.first_byte = time.perf_counter()
                tried.status = response.status
                if response.status != 200:
                    raise await _refused(backend, response)
                content_type = response.content_type
                if not is_json(content_type):
                    raise broken(
                        backend,
                        f"answered with '{content_type[:64] or 'no content type'}', not JSON",
                    )
                data = await response.read(MAX_RESPONSE_BYTES)
        except TimeoutError:
            backend.overloaded()
            # The deadline is the first route's, so a fallback's own total_s is not it.
            left = window.answer_by - asked
            raise AttemptFailed(
                UpstreamTimeout(
                    f"Backend '{backend.name}' did not answer within the {left:.3g}s left "
                    f"of the request's total time (timeouts.{window.phase()})."
                ),
                backend=backend.name,
                retryable=False,
                backend_fault=True,
            ) from None
        except UpstreamConnectError as exc:
            raise _connect_failure(backend, exc, loop.time()) from None
        except UpstreamBroken as exc:
            raise broken(backend, f"failed mid-response: {exc}") from None
        finally:
            backend.in_flight -= 1
            if response is not None:
                response.close()
            tried.end = ended = time.perf_counter()
            outcome.add_upstream(ended - sent)
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            raise broken(backend, "answered with a body that is not JSON")
    outcome.record_usage(payload.get("usage"))
    backend.answered(outcome.backend_s, stream=False, completion_tokens=outcome.completion_tokens)
    # Checked to be JSON above; the upstream's own label (its parameters, its vendor type)
    # is not the client's business.
    return Completion(data, "application/json", route.name, backend.name)


async def _assemble(
    plan: Plan,
    outcome: Outcome,
    route: Route,
    backend: Backend,
    window: Window,
    bounds: AnswerBounds,
    tried: AttemptRecord,
) -> Completion:
    """A non-streaming answer asked for as a stream and put together here (see
    gateway.wire.assemble): the stream's phase timeouts apply, and an answer that breaks
    at any point is an attempt that failed, retried before the client has anything."""
    request = plan.request
    assembler = Assembler(chat=request.endpoint is Endpoint.CHAT)
    payload = streaming_payload(request.payload)
    stream = await open_stream(plan, outcome, route, backend, window, tried, assembler, payload)
    first_at = time.perf_counter()
    observer = stream.observer
    budget = bounds.budget
    # What the events hold is what the answer being built holds: bounded per answer (the
    # upstream's fault past it) and, with every other answer in memory, per process (the
    # gateway's overload: 503, retried by the client, counted by no breaker).
    held = 0
    failure: AttemptFailed | None = None

    def hold(events: bytes) -> bool:
        nonlocal held
        if held + len(events) > bounds.max_bytes:
            raise broken(
                backend,
                f"answered more than {bounds.max_bytes} bytes (upstream.max_body_bytes)",
            )
        if not budget.take(len(events)):
            raise UpstreamBufferFull(budget.limit)
        held += len(events)
        return False

    try:
        hold(stream.first)
        await stream.pump(hold, _no_client)  # read by callback: no task wake-up per read
        if observer.malformed:
            # Its text is missing from the answer: never a whole-looking 200 that is not.
            raise broken(backend, f"sent {observer.malformed} events that are not JSON")
        answer = assembler.answer(observer.usage)
    except StreamInterrupted as interrupted:
        failure = _interrupted(backend, interrupted, stream.deadline)
    except Incomplete as incomplete:
        failure = broken(backend, str(incomplete))
    except AttemptFailed as caught:
        failure = caught
    finally:
        stream.close()
        budget.give(held)
        # The whole answer was the upstream's time, as a non-streaming one's is.
        rest = time.perf_counter() - first_at
        outcome.backend_s += rest
        outcome.upstream_s = (outcome.upstream_s or 0.0) + rest
    if failure is not None:
        blame(backend, failure)
        raise failure
    outcome.record_usage(observer.usage)
    return Completion(orjson.dumps(answer), "application/json", route.name, backend.name)


async def open_stream(
    plan: Plan,
    outcome: Outcome,
    route: Route,
    backend: Backend,
    window: Window,
    tried: AttemptRecord,
    recorder: ChunkRecorder | None = None,
    payload: dict[str, Any] | None = None,
) -> UpstreamStream:
    """A stream from `backend` whose first event has arrived; `payload` replaces the
    request's own (a resumption's, an assembled answer's). Its attempt ends (`tried.end`)
    when the stream is closed."""
    loop = asyncio.get_running_loop()
    request = plan.request
    timeouts = route.timeouts
    # Ask for usage even when the client did not, so tokens are always accounted.
    body = upstream_body(
        request, backend, ask_usage=not request.client_wants_usage, payload=payload
    )
    observer = SSEObserver(drop_usage_chunk=not request.client_wants_usage)
    observer.recorder = recorder
    now = loop.time()
    stream = UpstreamStream(
        route, backend, observer, deadline=window.end_by, idle_s=timeouts.idle_s, tried=tried
    )
    first_token_deadline = min(now + timeouts.first_token_s, window.answer_by)
    sent = time.perf_counter()
    with backend.breaker.attempt():
        try:
            async with asyncio.timeout_at(first_token_deadline):
                stream.response = response = await backend.adapter.post(
                    request.endpoint.value, body, plan.context
                )
                tried.first_byte = time.perf_counter()
                tried.status = response.status
                if response.status != 200:
                    raise await _refused(backend, response)
                if not is_event_stream(response.content_type):
                    raise broken(
                        backend,
                        f"answered a stream request with "
                        f"'{response.content_type or 'no content type'}', not an event stream",
                    )
                stream.first = await stream.first_events()
                tried.first_token = time.perf_counter()
        except TimeoutError:
            stream.close()
            backend.overloaded()
            in_time = first_token_deadline < window.answer_by
            phase = "first_token_s" if in_time else window.phase()
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
            raise broken(backend, f"failed before the first token: {exc}") from None
        except BaseException:
            stream.close()
            raise
        finally:
            outcome.add_upstream(time.perf_counter() - sent)
        if observer.error is not None:
            stream.close()
            raise _failed(backend, stream_error(backend.name, observer.error))
    backend.answered(outcome.backend_s, stream=True, completion_tokens=None)
    return stream


def upstream_body(
    request: ProxyRequest,
    backend: Backend,
    *,
    ask_usage: bool,
    payload: dict[str, Any] | None = None,
) -> bytes:
    """The body sent to `backend`: the client's, with the backend's own model name. The
    client's payload is left as it is, for the next attempt to start from."""
    payload = dict(request.payload if payload is None else payload)
    payload["model"] = backend.upstream_model
    if request.stream and ask_usage:
        options = payload.get("stream_options") or {}
        payload["stream_options"] = {**options, "include_usage": True}
    return orjson.dumps(payload)


def broken(backend: Backend, what: str) -> AttemptFailed:
    return AttemptFailed(
        UpstreamError(f"Backend '{backend.name}' {what}."),
        backend=backend.name,
        retryable=True,
        backend_fault=True,
    )


def blame(backend: Backend, failure: AttemptFailed) -> None:
    """Count a failure after the first event against the backend's breaker (which counted
    the attempt's start as a success), as a non-streaming exchange that broke would be."""
    try:
        with backend.breaker.attempt():
            raise failure
    except (AttemptFailed, BreakerOpen):
        pass


async def _refused(backend: Backend, response: UpstreamResponse) -> AttemptFailed:
    """An upstream's non-200 answer, classified (gateway.wire.upstream)."""
    try:
        body: bytes | None = await response.read(MAX_ERROR_BODY_BYTES)
    except (UpstreamBroken, UpstreamBufferFull):
        body = None  # the status says enough; a body that could not be held is unread
    seconds = retry_after_seconds(response.retry_after)
    return _failed(backend, rejection(backend.name, response.status, body, seconds))


def _failed(backend: Backend, verdict: Verdict) -> AttemptFailed:
    if verdict.overloaded:
        backend.overloaded()
    return AttemptFailed(
        verdict.error,
        backend=backend.name,
        retryable=verdict.retryable,
        backend_fault=verdict.backend_fault,
        retry_after_s=verdict.retry_after_s,
    )


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


async def _no_client() -> None:
    """`pump`'s drain for an answer assembled in memory: nothing to wait for."""
