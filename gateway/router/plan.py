"""Where a request may go, settled before it costs anything: the route its caller may use,
a backend it is pinned to, its affinity key and its place in the admission queue."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.errors import InvalidRequest, PermissionDenied
from gateway.router.backend import Backend
from gateway.router.route import Route
from gateway.wire.validation import ProxyRequest
from policies.admission import Priority
from policies.affinity import request_key
from providers.base import RequestContext

if TYPE_CHECKING:
    from gateway.router.caching import Prefetch

# Not frozen, though never changed once made: a frozen dataclass's __init__ costs three times
# as much, and these are made once per request on the hot path.


@dataclass(slots=True)
class Call:
    """What the edge knows of a request beyond its body: who sent it, and what they asked
    of the routing. The router decides what it is allowed to mean."""

    request_id: str
    traceparent: bytes | None = None  # W3C trace context, passed to the upstream
    models: frozenset[str] | None = None  # route names the caller may use; None: every one
    pin: str | None = None  # a backend asked for by name (X-VGate-Pin)
    may_pin: bool = False  # whether the caller may ask for one
    pins: tuple[str, ...] = ()  # backends the caller is configured to use, where a route has them
    headers: Sequence[tuple[bytes, bytes]] = ()  # the request's, for a route's affinity header
    priority: Priority = Priority.INTERACTIVE
    caller: str | None = None  # the key's name
    chaos: str | None = None  # the chaos experiment asked for, by a key allowed to
    cache: bool = True  # False: the caller's key keeps its requests out of the response cache
    traced: bool = False  # whether a trace of the request may be exported (its Redis calls' spans)


@dataclass(slots=True)
class Plan:
    """One request, ready for the router: its body, its route and how to choose a backend."""

    request: ProxyRequest
    call: Call
    route: Route
    pin: Backend | None = None  # the only backend it may go to
    pin_forced: bool = False  # asked for by the client: never hidden behind a fallback
    affinity_key: str | None = None
    context: RequestContext = field(init=False)  # what every adapter is told of the request
    # Its place in a shared cache and the read already under way (`Router.prefetch`).
    prefetched: Prefetch | None = None

    def __post_init__(self) -> None:
        call = self.call
        self.context = RequestContext(call.request_id, call.traceparent, call.caller, call.chaos)


def plan(request: ProxyRequest, call: Call, route: Route) -> Plan:
    """`request` on `route` as its caller may send it; raises for a pin it may not use."""
    pin: Backend | None = None
    forced = False
    if call.pin is not None:
        if not call.may_pin:
            raise PermissionDenied(
                "This API key may not choose a backend: X-VGate-Pin needs the key's may_pin "
                "right in the keys file.",
                code="pin_not_allowed",
            )
        name = call.pin.strip()
        pin = route.backend_named(name)
        if pin is None:
            names = ", ".join(backend.name for backend in route.backends)
            raise InvalidRequest(
                f"X-VGate-Pin names backend '{name[:64]}', which does not serve model "
                f"'{route.name}'. Its backends: {names}.",
                param="X-VGate-Pin",
                code="invalid_value",
            )
        forced = True
    elif call.pins:
        pin = next(
            (b for b in map(route.backend_named, call.pins) if b is not None),
            None,
        )
    key = None
    if route.config.strategy == "affinity":
        key = request_key(route.config.affinity.header, call.headers, request.payload)
    return Plan(request, call, route, pin, forced, key)
