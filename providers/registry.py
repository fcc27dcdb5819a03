"""Build the adapter a backend's `provider` names."""

from __future__ import annotations

from gateway.config import BackendConfig, Timeouts
from providers.base import Adapter
from providers.openai import OpenAIAdapter
from providers.vllm import VLLMAdapter


def create_adapter(backend: BackendConfig, timeouts: Timeouts) -> Adapter:
    if backend.provider == "openai":
        return OpenAIAdapter(backend, connect_timeout_s=timeouts.connect_s)
    return VLLMAdapter(backend, connect_timeout_s=timeouts.connect_s)
