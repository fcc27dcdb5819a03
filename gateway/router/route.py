"""A route: one model's backends, its selection strategy, and the replayable `Decision`."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from gateway.config import ModelRoute, Timeouts
from gateway.errors import NoLiveBackend
from gateway.router.backend import Backend
from gateway.wire.headers import retry_after
from policies.affinity import key_hash
from policies.retry import RetryPolicy
from policies.selection import Selector, create_selector


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
        exclude: Collection[Backend] = (),
    ) -> Backend:
        """The next backend by the route's strategy among the usable ones, preferring any
        not in `avoid` and never one in `exclude`; `key` is the request's affinity key, if
        any. A pinned request goes to its backend or nowhere. With `decisions`, the
        decision's inputs are appended to it, enough to replay it (`vgate route explain`)."""
        if decisions is not None:
            state = self.selector.state()
            loads = [
                (b.load, b.latency_ewma_s, b.usable(now) and b not in exclude, b in avoid)
                for b in self.backends
            ]
        if pin is not None:
            if pin in exclude:
                raise NoLiveBackend(
                    f"Backend '{pin.name}', which this request is pinned to, already timed "
                    "out on it."
                )
            if not pin.usable(now):
                raise NoLiveBackend(
                    f"Backend '{pin.name}', which this request is pinned to, is not taking "
                    "requests: failing its health checks, refusing connections, at its "
                    "in-flight limit, or behind an open circuit breaker.",
                    headers={"Retry-After": retry_after(self._retry_in(now))},
                )
            if decisions is not None:
                decisions.append(Decision(self, state, key, pin.name, loads, pin.name, "pin"))
            return pin
        backends = self.backends
        usable = [backend.usable(now) and backend not in exclude for backend in backends]
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
                headers={"Retry-After": retry_after(self._retry_in(now))},
            )
        return backends[index]

    def _retry_in(self, now: float) -> float:
        """When a backend of the route may take requests again, as far as is known."""
        waits = [max(b.ejected_until - now, 0.0) for b in self.backends if b.ejected_until > now]
        return min(waits) if waits else self.config.breaker.open_s


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
