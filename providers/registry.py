"""Build the adapter a backend's `provider` names."""

from __future__ import annotations

from gateway.config import BackendConfig, Timeouts, UpstreamConfig
from providers.base import Adapter
from providers.http1 import ByteBudget
from providers.openai import OpenAIAdapter
from providers.vllm import VLLMAdapter


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
