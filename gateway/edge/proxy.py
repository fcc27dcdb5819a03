"""The proxied OpenAI endpoints: authenticate, read and check the body, hand to the router.

A pure ASGI endpoint rather than a Starlette request/response one: the response is either
a whole body or a stream of events, written with two `send` calls or one per event batch,
and a client that leaves cancels the upstream request at once (`DisconnectWatch`).
"""

from __future__ import annotations

import time

from gateway.asgi import (
    BodyTooLarge,
    ClientDisconnected,
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
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    PermissionDenied,
)
from gateway.router.core import Route, Router, StreamInterrupted
from gateway.wire.validation import Endpoint, ProxyRequest, parse_request
from policies.admission import Priority
from policies.affinity import request_key
from policies.guardrails import Guardrails
from policies.limits import ALLOWED, NO_LIMITS, LimitStore, estimate_tokens
from policies.limits_local import LocalLimits

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class ProxyEndpoint:
    def __init__(
        self,
        endpoint: Endpoint,
        *,
        router: Router,
        keys: KeyRing,
        max_body_bytes: int,
        guardrails: Guardrails | None = None,
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
        self.router = router
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.guardrails = guardrails or Guardrails()
        # Not `or`: an empty LocalLimits is falsy (it has __len__), and must still be shared.
        self.limits = limits if limits is not None else LocalLimits()
        self.default_max_tokens_estimate = default_max_tokens_estimate
        self.tokens = tokens  # with jwt.enabled: bearer JWTs beside API keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record: RequestRecord = scope["vgate.record"]
        record.endpoint = self.label
        try:
            authorization = header(scope, b"authorization")
            try:
                caller = self.keys.authenticate(authorization)
            except AuthenticationError as refused:  # perhaps a JWT
                caller = await token_caller(self.keys, self.tokens, authorization, refused)
            record.caller = caller.name
            scope["vgate.caller"] = caller  # for the per-key usage count at the end
            priority = Priority.BATCH if caller.tier == "batch" else Priority.INTERACTIVE
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
            route = route_for(self.router, caller, request.model)
            record.model = route.name
            if caller.guardrails is not None or self.guardrails.active:
                try:
                    self.guardrails.check(request, caller.guardrails)  # may cap max_tokens, n
                except InvalidRequest:
                    if caller.limits is not NO_LIMITS:
                        await self._charge_refusal(caller, request)
                    raise
            _routing_hints(scope, caller, route, request)
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
                verdict = await self.limits.admit(caller.id, caller.limits, estimate)
                if not verdict.allowed:
                    raise verdict.error()
            # Whether the key gets back what it was charged: only for the gateway's and the
            # upstream's faults. A client's own error (a 4xx) is charged like a success,
            # or a prompt the upstream refuses could be sent without limit.
            failed = True
            try:
                admission = self.router.admission
                async with DisconnectWatch(receive) as watch:
                    if not admission.try_acquire():
                        queued = time.perf_counter()
                        await admission.acquire(priority)
                        record.waited_s = time.perf_counter() - queued
                    try:
                        if request.stream:
                            await self._stream(route, request, record, send, verdict.headers)
                        else:
                            await self._complete(route, request, record, send, verdict.headers)
                    finally:
                        admission.release()
                if watch.disconnected:
                    record.status = CLIENT_CLOSED_REQUEST
                    record.error = "client_disconnected"
                    failed = False  # what it used is charged; the client chose to leave
                else:
                    # Set only by a stream that broke after its first byte: upstream's fault.
                    failed = record.error is not None
            except GatewayError as error:
                failed = not client_fault(error)
                raise
            finally:
                if verdict.ticket is not None:
                    self.limits.settle_nowait(verdict.ticket, _used(record), failed=failed)
        except GatewayError as error:
            record.error = error.code or error.type
            await send_error(send, error)

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
        route: Route,
        request: ProxyRequest,
        record: RequestRecord,
        send: Send,
        limit_headers: list[tuple[bytes, bytes]],
    ) -> None:
        completion = await self.router.complete(route, request, record)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", completion.content_type.encode("latin-1")),
                    (b"content-length", str(len(completion.body)).encode()),
                    (b"x-vgate-model", (record.model or route.name).encode()),
                    (b"x-vgate-backend", (record.backend or "").encode()),
                    *limit_headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": completion.body})

    async def _stream(
        self,
        route: Route,
        request: ProxyRequest,
        record: RequestRecord,
        send: Send,
        limit_headers: list[tuple[bytes, bytes]],
    ) -> None:
        stream = await self.router.open_stream(route, request, record)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        *_SSE_HEADERS,
                        (b"x-vgate-model", (record.model or route.name).encode()),
                        (b"x-vgate-backend", stream.backend.name.encode()),
                        *limit_headers,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": stream.first, "more_body": True})
            record.ttft_s = time.perf_counter() - record.start
            try:
                async for events in stream.rest():
                    await send({"type": "http.response.body", "body": events, "more_body": True})
            except StreamInterrupted as interrupted:
                # Never a clean-looking end: an error event, and no [DONE].
                record.error = interrupted.code
                await send({"type": "http.response.body", "body": interrupted.event()})
                return
            await send({"type": "http.response.body", "body": b""})
        finally:
            stream.close()
            record.record_usage(stream.usage)
            record.dropped_events = stream.dropped_events


def client_fault(error: GatewayError) -> bool:
    """Whether a request failed through its client's fault, and so is charged as a success.

    A 4xx is the client's (an upstream's 400 for a prompt too long, a 404, a guardrail's
    refusal), except 408 and 429: an upstream out of time or capacity is not the client's
    doing. Every 5xx (the gateway's 502, 503, 504 for timeouts and connect failures) is
    given back.
    """
    return 400 <= error.status < 500 and error.status not in (408, 429)


def route_for(router: Router, caller: Caller, model: str) -> Route:
    """The route serving `model`, for this caller: to a key limited to some models, a model
    it may not use and one that does not exist are the same 404, naming only its own."""
    if caller.models is None:
        return router.route_for(model)
    try:
        route = router.route_for(model)
    except ModelNotFound:
        raise caller.model_not_found(model) from None
    if route.name not in caller.models:
        raise caller.model_not_found(model)
    return route


def _used(record: RequestRecord) -> int | None:
    """The tokens the upstream reported, to reconcile the estimate with (None: unknown)."""
    if record.prompt_tokens is None and record.completion_tokens is None:
        return None
    return (record.prompt_tokens or 0) + (record.completion_tokens or 0)


def _routing_hints(scope: Scope, caller: Caller, route: Route, request: ProxyRequest) -> None:
    """Where the caller asked, or is configured, to be routed: a pin, an affinity key."""
    pin = header(scope, b"x-vgate-pin")
    if pin is not None:
        if not caller.may_pin:
            raise PermissionDenied(
                "This API key may not choose a backend: X-VGate-Pin needs the key's may_pin "
                "right in the keys file.",
                code="pin_not_allowed",
            )
        name = pin.decode("latin-1").strip()
        if route.backend_named(name) is None:
            names = ", ".join(backend.name for backend in route.backends)
            raise InvalidRequest(
                f"X-VGate-Pin names backend '{name[:64]}', which does not serve model "
                f"'{route.name}'. Its backends: {names}.",
                param="X-VGate-Pin",
                code="invalid_value",
            )
        request.pin, request.pin_forced = name, True
    elif caller.pins:
        request.pin = next((n for n in caller.pins if route.backend_named(n) is not None), None)
    if route.config.strategy == "affinity":
        settings = route.config.affinity
        request.affinity_key = request_key(settings.header, scope["headers"], request.payload)
