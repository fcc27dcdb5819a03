"""Adapters: each knows one upstream API. They forward and report; they never decide."""

from providers.base import (
    Adapter,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamResponse,
)
from providers.openai import MissingCredential
from providers.registry import AdapterFactory, create_adapter

__all__ = [
    "Adapter",
    "AdapterFactory",
    "MissingCredential",
    "UpstreamBroken",
    "UpstreamConnectError",
    "UpstreamResponse",
    "create_adapter",
]
