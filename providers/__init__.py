"""Adapters: each knows one upstream API. They forward and report; they never decide.

How an exchange fails (`UpstreamConnectError`, `UpstreamBroken`) and a missing credential
(`MissingCredential`) are in the one exception tree, gateway/errors.py; they are named
here too for the adapters' callers.
"""

from gateway.errors import MissingCredential, UpstreamBroken, UpstreamConnectError
from providers.base import Adapter, UpstreamResponse
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
