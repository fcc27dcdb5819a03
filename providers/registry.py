"""Build the adapter a backend's `provider` names, and the seam for building another."""

from __future__ import annotations

from typing import Protocol

from gateway.config import BackendConfig, Timeouts, UpstreamConfig
from providers.base import Adapter
from providers.http1 import ByteBudget
from providers.openai import OpenAIAdapter
from providers.vllm import VLLMAdapter


class AdapterFactory(Protocol):
    """Makes the adapter of one backend. The gateway is given one (`create_adapter` unless
    told otherwise): the seam where tests put a fake adapter and chaos wraps a real one.

    `budget` bounds the answers every adapter of the process holds at once; the gateway
    passes the same one for every backend. A backend whose credential is missing raises
    `MissingCredential`, which the gateway reports as a configuration error.
    """

    def __call__(
        self,
        backend: BackendConfig,
        timeouts: Timeouts,
        upstream: UpstreamConfig,
        budget: ByteBudget,
        /,
    ) -> Adapter: ...


def create_adapter(
    backend: BackendConfig,
    timeouts: Timeouts,
    upstream: UpstreamConfig | None = None,
    budget: ByteBudget | None = None,
) -> Adapter:
    """`budget` bounds the answers every adapter of the process holds at once: pass the
    same one to each (without one, the adapter has its own, of upstream.max_buffered_bytes)."""
    if backend.provider == "openai":
        return OpenAIAdapter(
            backend, connect_timeout_s=timeouts.connect_s, upstream=upstream, budget=budget
        )
    return VLLMAdapter(
        backend, connect_timeout_s=timeouts.connect_s, upstream=upstream, budget=budget
    )
