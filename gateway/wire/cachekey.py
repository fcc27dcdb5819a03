"""The response cache's key for one request: pure, no I/O.

The key is a fixed-length hash of the request as it goes upstream (after the gateway's own
rewrites), its endpoint, its route and its scope. Every field of the body counts except
those in `IGNORED_FIELDS`, known not to change the answer: a deny-list, so a parameter the
gateway has never heard of (a new sampling knob, a vLLM extension) makes a different key
rather than being silently ignored. The prompt itself is only ever hashed, never stored as
a key.

A key is `<route tag>:<scope tag>:<request hash>`, each tag a short hash of its name, so a
store can drop one route's or one scope's entries by prefix without holding any name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import orjson

# Fields that never change the answer's content: how it is delivered (stream,
# stream_options), who is asking (user, metadata: the scope says whose answer it is), whether
# the upstream keeps it (store), and the model's name (the route stands for it: an alias and
# its route's name share answers).
IGNORED_FIELDS = frozenset({"stream", "stream_options", "user", "metadata", "store", "model"})
GLOBAL_SCOPE = "global"
_TAG_BYTES = 8  # 16 hex characters: a route's or a scope's tag


def tag(name: str) -> str:
    """A short fixed-length stand-in for a route's or a scope's name in a key."""
    return hashlib.blake2b(name.encode("utf-8"), digest_size=_TAG_BYTES).hexdigest()


def cache_key(endpoint: str, route: str, scope: str, payload: dict[str, Any]) -> str:
    """The key of `payload` sent to `endpoint` on `route`, for callers in `scope`."""
    body = {name: value for name, value in payload.items() if name not in IGNORED_FIELDS}
    canonical = orjson.dumps([endpoint, body], option=orjson.OPT_SORT_KEYS)
    digest = hashlib.blake2b(canonical, digest_size=32).hexdigest()
    return f"{tag(route)}:{tag(scope)}:{digest}"


def is_deterministic(payload: dict[str, Any]) -> bool:
    """Whether the request asks for a reproducible answer: temperature 0, or a seed."""
    temperature = payload.get("temperature")
    if type(temperature) in (int, float) and temperature == 0:
        return True
    seed = payload.get("seed")
    return type(seed) is int


def directives(headers: Sequence[tuple[bytes, bytes]]) -> tuple[bool, bool]:
    """The client's `Cache-Control` for its own request: (no_cache, no_store). no-cache:
    do not answer from the cache, but keep the fresh answer (a refresh); no-store: neither
    read nor keep."""
    no_cache = no_store = False
    for name, value in headers:
        if name.lower() != b"cache-control":
            continue
        for part in value.lower().split(b","):
            part = part.strip()
            if part == b"no-cache":
                no_cache = True
            elif part == b"no-store":
                no_store = True
    return no_cache, no_store
