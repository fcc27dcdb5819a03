"""`vllm serve`: OpenAI's API as vLLM speaks it, with `/health` for liveness."""

from __future__ import annotations

import os

from gateway.config import BackendConfig, UpstreamConfig
from providers._http import OpenAICompatibleAdapter
from providers.http1 import ByteBudget


class VLLMAdapter(OpenAICompatibleAdapter):
    provider = "vllm"
    health_path = "/health"

    def __init__(
        self,
        backend: BackendConfig,
        *,
        connect_timeout_s: float,
        upstream: UpstreamConfig | None = None,
        budget: ByteBudget | None = None,
    ) -> None:
        # `vllm serve --api-key` is optional; api_key_env names it when the worker uses one.
        api_key = os.environ.get(backend.api_key_env) if backend.api_key_env else None
        super().__init__(
            backend,
            connect_timeout_s=connect_timeout_s,
            api_key=api_key,
            upstream=upstream,
            budget=budget,
        )
