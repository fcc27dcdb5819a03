"""The proxied OpenAI endpoints: authenticate, read and check the body, hand to the router.

A pure ASGI endpoint rather than a Starlette request/response one: the response is either
a whole body or a stream of events, written with two `send` calls or one per event batch,
and a client that leaves cancels the upstream request at once (`DisconnectWatch`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Protocol

from gateway.asgi import (
    BODY_WRITER,
    BodyWriter,
    DisconnectWatch,
    Receive,
    Scope,
    Send,
    header,
    read_body,
)
from gateway.edge.auth import Caller, KeyRing
from gateway.edge.connections import BODY_TIMED_OUT
from gateway.edge.jwt_auth import TokenVerifier, token_caller
from gateway.edge.middleware import send_error
from gateway.edge.record import RequestRecord
from gateway.errors import (
    AuthenticationError,
    BodyTooLarge,
    ClientDisconnected,
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    PermissionDenied,
    StreamInterrupted,
)
from gateway.router import Call, Outcome, Plan, Router
from gateway.router.outcome import RedisCall
from gateway.router.streams import PUMPED
from gateway.wire.sse import error_event
from gateway.wire.validation import Endpoint, ProxyRequest, parse_request
from policies.admission import Priority
from policies.cache import WITHOUT_UPSTREAM
from policies.guardrails import Guardrails
from policies.limits import ALLOWED, NO_LIMITS, LimitStore, estimate_tokens
from policies.limits_local import LocalLimits
from policies.limits_redis import FailoverLimits

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class Serving(Protocol):
    """What serves requests now: a config reload replaces both at once. Each request reads
    them once, at its start, and keeps them to its end (`gateway.runtime.gateway.Gateway`)."""

    @property
    def router(self) -> Router: ...

    @property
    def guardrails(self) -> Guardrails: ...


class ProxyEndpoint:
    def __init__(
        self,
        endpoint: Endpoint,
        *,
        serving: Serving,
        keys: KeyRing,
        max_body_bytes: int,
        limits: LimitStore | None = None,
        default_max_tokens_estimate: int = 256,
        tokens: TokenVerifier | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.label = {
            Endpoint.CHAT: "chat",
            Endpoint.COMPLETIONS: "completions",
            Endpoint.EMBEDDINGS: "embeddings",
        }[endpoint]
        self.serving = serving  # read once per request: see Serving
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        # Not `or`: an empty LocalLimits is falsy (it has __len__), and must still be shared.
        self.limits = limits if limits is not None else LocalLimits()
        self._redis_limits = self.limits if isinstance(self.limits, FailoverLimits) else None
        self.default_max_tokens_estimate = default_max_tokens_estimate
        self.tokens = tokens  # with jwt.enabled: bearer JWTs beside API keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record: RequestRecord = scope["vgate.record"]
        record.endpoint = self.label
        # One router and one set of guardrails from start to end, across a config reload.
        serving = self.serving
        router, guardrails = serving.router, serving.guardrails
        try:
            authorization = header(scope, b"authorization")
            try:
                caller = self.keys.authenticate(authorization)
            except AuthenticationError as refused:  # perhaps a JWT
                caller = await token_caller(self.keys, self.tokens, authorization, refused)
            record.caller = caller.name
            record.key_id = caller.id  # for the per-key usage count at the end
            try:
                body = await read_body(scope, receive, self.max_body_bytes)
            except BodyTooLarge as exc:
                raise PayloadTooLarge(
                    f"Request body is larger than the gateway's limit of {exc.limit} bytes.",
                ) from None
            except ClientDisconnected:
                if scope.get(BODY_TIMED_OUT):  # the server answered 408 and closed
                    record.status, record.error = 408, "request_timeout"
                else:
                    record.status, record.error = CLIENT_CLOSED_REQUEST, "client_disconnected"
                return
            request = parse_request(self.endpoint, body)
            plan = router.plan(request, self._call(scope, caller, record))
            record.model = plan.route.name
            if caller.guardrails is not None or guardrails.active:
                try:
                    checked = guardrails.check(request, caller.guardrails)
                    if checked is not request:  # a token cap the request did not name
                        request = checked
                        plan = dataclasses.replace(plan, request=checked)
                except InvalidRequest:
                    if caller.limits is not NO_LIMITS:
                        await self._charge_refusal(caller, request)
                    raise
            record.stream = request.stream
            verdict = ALLOWED
            if caller.limits is not NO_LIMITS:
                # Once per client request, before routing: retries and fallbacks are never
                # charged again, and a refusal costs no upstream work and no quota.
                estimate = estimate_tokens(
                    request.payload,
                    self.endpoint.value,
                    self.default_max_tokens_estimate,
                    prompt=request.prompt,  # measured once, by validation
                )
                # A Redis call's span only for a request that may be traced: `record.trace`
                # is None where tracing is off or the caller's traceparent said "not
                # sampled" (gateway.edge.tracing), and such a request exports no span.
                shared = self._redis_limits if record.trace is not None else None
                started = time.perf_counter() if shared is not None else 0.0
                # The request's cache read (a shared cache) goes to Redis with the limit
                # check, in the same write: one round trip for both.
                router.prefetch(plan)
                admitted = False
                try:
                    verdict = await self.limits.admit(caller.id, caller.limits, estimate)
                    admitted = verdict.allowed
                finally:
                    if not admitted and plan.prefetched is not None:
                        plan.prefetched.drop()
                if shared is not None:
                    ended = time.perf_counter()
                    record.redis_calls = [
                        RedisCall("limits", "EVALSHA", started, ended, failed=shared.down)
                    ]
                if not verdict.allowed:
                    raise verdict.error()
            outcome = Outcome()
            # Whether the key gets back what it was charged: only for the gateway's and the
            # upstream's faults. A client's own error (a 4xx) is charged like a success,
            # or a prompt the upstream refuses could be sent without limit.
            failed = True
            try:
                async with DisconnectWatch(receive) as watch:
                    if request.stream:
                        failed = await self._stream(
                            router,
                            plan,
                            outcome,
                            record,
                            send,
                            verdict.headers,
                            scope.get(BODY_WRITER),
                        )
                    else:
                        await self._complete(router, plan, outcome, record, send, verdict.headers)
                        failed = False
                if watch.disconnected:
                    record.status = CLIENT_CLOSED_REQUEST
                    record.error = "client_disconnected"
                    failed = False  # what it used is charged; the client chose to leave
            except GatewayError as error:
                failed = not client_fault(error)
                raise
            finally:
                record.absorb(outcome)
                record.chaos = plan.context.injected
                if verdict.ticket is not None:
                    # A cached or shared answer counts as a request, but costs no tokens.
                    tokens = 0 if outcome.cache in WITHOUT_UPSTREAM else outcome.tokens
                    self.limits.settle_nowait(verdict.ticket, tokens, failed=failed)
        except GatewayError as error:
            record.error = error.code or error.type
            await send_error(send, error)

    @staticmethod
    def _call(scope: Scope, caller: Caller, record: RequestRecord) -> Call:
        """What the router is told of the request beyond its body."""
        pin = header(scope, b"x-vgate-pin")
        chaos = header(scope, b"x-vgate-chaos")
        if chaos is not None and not caller.may_chaos:
            raise PermissionDenied(
                "This API key may not ask for a chaos experiment: X-VGate-Chaos needs the "
                "key's may_chaos right in the keys file.",
                code="chaos_not_allowed",
            )
        return Call(
            record.request_id,
            record.traceparent,
            models=caller.models,
            pin=None if pin is None else pin.decode("latin-1"),
            may_pin=caller.may_pin,
            pins=caller.pins,
            headers=scope["headers"],
            priority=Priority.BATCH if caller.tier == "batch" else Priority.INTERACTIVE,
            caller=caller.name,
            chaos=None if chaos is None else chaos.decode("latin-1").strip() or None,
            cache=caller.cache,
            traced=record.trace is not None,
        )

    async def _charge_refusal(self, caller: Caller, request: ProxyRequest) -> None:
        """A guardrail's refusal counts as one of the key's requests (none of its tokens:
        nothing was read upstream), or refused prompts could be sent without limit. A key
        already over its limits is told that instead (429), as for any other request."""
        estimate = estimate_tokens(
            request.payload,
            self.endpoint.value,
            self.default_max_tokens_estimate,
            prompt=request.prompt,
        )
        verdict = await self.limits.admit(caller.id, caller.limits, estimate)
        if not verdict.allowed:
            raise verdict.error()
        if verdict.ticket is not None:
            self.limits.settle_nowait(verdict.ticket, 0, failed=False)

    async def _complete(
        self,
        router: Router,
        plan: Plan,
        outcome: Outcome,
        record: RequestRecord,
        send: Send,
        limit_headers: list[tuple[bytes, bytes]],
    ) -> None:
        completion = await router.complete(plan, outcome)
        record.absorb(outcome)  # before the response starts: its Server-Timing reads it
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", completion.content_type.encode("latin-1")),
                    (b"content-length", str(len(completion.body)).encode()),
                    (b"x-vgate-model", completion.route.encode()),
                    (b"x-vgate-backend", completion.backend.encode()),
                    *limit_headers,
                    *_cache_headers(outcome),
                ],
            }
        )
        await send({"type": "http.response.body", "body": completion.body})

    async def _stream(
        self,
        router: Router,
        plan: Plan,
        outcome: Outcome,
        record: RequestRecord,
        send: Send,
        limit_headers: list[tuple[bytes, bytes]],
        writer: BodyWriter | None,
    ) -> bool:
        """Send the stream; whether it broke (the upstream's fault) after it started.

        Under vgate's server (`writer`), a stream read from a backend is pumped: each read's
        events are written to the client from the read's own callback (a third of an
        event's cost; README "What a request costs"). Others go through `send`."""
        stream = await router.open_stream(plan, outcome)
        try:
            record.absorb(outcome)  # before the response starts: its Server-Timing reads it
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        *_SSE_HEADERS,
                        (b"x-vgate-model", stream.route.name.encode()),
                        (b"x-vgate-backend", stream.backend.name.encode()),
                        *limit_headers,
                        *_cache_headers(outcome),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": stream.first, "more_body": True})
            record.ttft_s = time.perf_counter() - record.start
            try:
                if writer is not None and isinstance(stream, PUMPED) and writer.writes_chunks():
                    await stream.pump(writer.write_chunk, writer.drain)
                else:
                    async for events in stream.rest():
                        await send(
                            {"type": "http.response.body", "body": events, "more_body": True}
                        )
            except StreamInterrupted as interrupted:
                # Never a clean-looking end: an error event, and no [DONE].
                record.error = interrupted.code
                await send({"type": "http.response.body", "body": error_event(interrupted)})
                return True
            await send({"type": "http.response.body", "body": b""})
            return False
        finally:
            stream.close()


def _cache_headers(outcome: Outcome) -> list[tuple[bytes, bytes]]:
    """X-VGate-Cache where the response cache was in play, and a hit's Age."""
    if outcome.cache is None:
        return []
    headers = [(b"x-vgate-cache", outcome.cache.encode())]
    if outcome.cache_age is not None:
        headers.append((b"age", str(outcome.cache_age).encode()))
    return headers


def client_fault(error: GatewayError) -> bool:
    """Whether a request failed through its client's fault, and so is charged as a success.

    A 4xx is the client's (an upstream's 400 for a prompt too long, a 404, a guardrail's
    refusal), except 408 and 429: an upstream out of time or capacity is not the client's
    doing. Every 5xx (the gateway's 502, 503, 504 for timeouts and connect failures) is
    given back.
    """
    return 400 <= error.status < 500 and error.status not in (408, 429)
