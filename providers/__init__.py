"""Adapters: each knows one upstream API. They forward and report; they never decide."""

from providers.base import (
    Adapter,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamResponse,
)
from providers.openai import MissingCredential
from providers.registry import create_adapter

__all__ = [
    "Adapter",
    "MissingCredential",
    "UpstreamBroken",
    "UpstreamConnectError",
    "UpstreamResponse",
    "create_adapter",
]
