"""One backend as the router sees it: its adapter, and what is known of its state now."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.config import BackendConfig
from policies.adaptive import AdaptiveLimit, latency_sample
from policies.breaker import BackendBreaker
from policies.health import HealthState
from policies.load import UpstreamLoad
from providers import Adapter

LATENCY_EWMA_ALPHA = 0.3  # weight of the newest sample


@dataclass(slots=True, eq=False)  # one object per backend: compared and hashed by identity
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
