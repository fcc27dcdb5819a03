"""OpenAI's API (api.openai.com or anything at the configured base URL).

OpenAI has no health endpoint; listing models is the cheapest authenticated call. The key
is read from the variable `api_key_env` names; a backend without one sends no Authorization
(an OpenAI-compatible server that takes no key).
"""

from __future__ import annotations

import os

from gateway.config import BackendConfig, UpstreamConfig
from gateway.errors import MissingCredential
from providers._http import OpenAICompatibleAdapter
from providers.http1 import ByteBudget


class OpenAIAdapter(OpenAICompatibleAdapter):
    provider = "openai"
    health_path = "/v1/models"

    def __init__(
        self,
        backend: BackendConfig,
        *,
        connect_timeout_s: float,
        upstream: UpstreamConfig | None = None,
        budget: ByteBudget | None = None,
    ) -> None:
        api_key = None
        if backend.api_key_env is not None:
            api_key = os.environ.get(backend.api_key_env)
            if not api_key:  # a variable named but unset is a mistake, not a keyless upstream
                raise MissingCredential(f"environment variable {backend.api_key_env} is not set")
        super().__init__(
            backend,
            connect_timeout_s=connect_timeout_s,
            api_key=api_key,
            upstream=upstream,
            budget=budget,
        )
