"""Embeddings cached item by item: a request's inputs are looked up one by one (one round
trip: `CacheStore.get_many`), only the missing ones go upstream, in one request, and the
answer is put together in the original order.

Each item's entry is its vector (as the upstream encoded it) and its share of the prompt
tokens: an upstream reports one `prompt_tokens` for all the inputs it embedded, which is
shared among them in proportion to their length (exact for one input; the shares always add
up to what the upstream reported). The answer's `usage` is the upstream's tokens plus the
cached items' shares; the key is charged only the upstream's. The item's key is the request
with that one input (so `model`'s route, `encoding_format`, `dimensions`, and every other
field count, as for any request).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from gateway.errors import UpstreamError
from gateway.router.caching import CachePlan, embedding_items
from gateway.router.outcome import Completion, Outcome
from gateway.wire.cachekey import cache_key
from policies.cache import CacheUnavailable, Entry, ResponseCache

if TYPE_CHECKING:
    from gateway.router.plan import Plan

ITEM_ENDPOINT = "/v1/embeddings#item"  # an item's key is never a whole request's


async def embed(
    cache: ResponseCache,
    caching: CachePlan,
    plan: Plan,
    outcome: Outcome,
    complete: Callable[[Plan, Outcome], Awaitable[Completion]],
) -> Completion:
    """The embeddings of every input: cached ones from the cache, the rest from upstream."""
    request = plan.request
    items = embedding_items(request.payload)
    assert items is not None  # cache_plan let only these through
    route = plan.route.name
    keys = [
        cache_key(ITEM_ENDPOINT, route, caching.owner, {**request.payload, "input": item})
        for item in items
    ]
    found: list[dict[str, Any] | None] = [None] * len(items)
    oldest = None
    if caching.read:
        try:
            entries = await cache.get_many(keys)
        except CacheUnavailable:
            cache.bypass("unavailable")
            outcome.cache = "bypass"
            entries = [None] * len(items)
        for index, entry in enumerate(entries):
            found[index] = _item(entry)
            if found[index] is not None and entry is not None:
                oldest = entry.created if oldest is None else min(oldest, entry.created)
    missing = [index for index, item in enumerate(found) if item is None]
    outcome.route = route
    outcome.request = request
    if not missing:
        cache.count("hit", route)
        outcome.cache = "hit"
        outcome.cache_age = max(0, int(time.time() - (oldest or time.time())))
        tokens = sum(item["tokens"] for item in found if item is not None)
        outcome.record_usage({"prompt_tokens": tokens, "total_tokens": tokens})
        body = _answer([item for item in found if item is not None], {"model": route}, tokens)
        return Completion(body, "application/json", route, "cache")
    if outcome.cache != "bypass":
        cache.count("miss", route)
        outcome.cache = "miss"
    asked = plan
    if len(missing) < len(items):
        payload = {**request.payload, "input": [items[index] for index in missing]}
        asked = dataclasses.replace(plan, request=dataclasses.replace(request, payload=payload))
    completion = await complete(asked, outcome)
    answer = _vectors(completion.body, len(missing))
    if answer is None:
        if len(missing) == len(items):
            return completion  # nothing of ours to merge: the upstream's answer as it is
        raise UpstreamError(
            f"Backend '{completion.backend}' answered embeddings that cannot be merged with "
            "the cached ones (not one vector per input, or no usage)."
        )
    vectors, upstream, upstream_tokens = answer
    shares = _shares(upstream_tokens, [_length(items[index]) for index in missing])
    keep = outcome.cache == "miss" and completion.route == route
    for position, index in enumerate(missing):
        item = {"embedding": vectors[position], "tokens": shares[position]}
        found[index] = item
        if keep:
            cache.keep(keys[index], orjson.dumps(item), caching.ttl_s)
    if len(missing) == len(items):
        return completion
    tokens = upstream_tokens + sum(
        item["tokens"] for index, item in enumerate(found) if index not in missing and item
    )
    body = _answer([item for item in found if item is not None], upstream, tokens)
    return Completion(body, "application/json", completion.route, completion.backend)


def _item(entry: Entry | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    try:
        item = orjson.loads(entry.body)
    except orjson.JSONDecodeError:
        return None
    if type(item) is not dict or "embedding" not in item or type(item.get("tokens")) is not int:
        return None
    return item


def _vectors(body: bytes, count: int) -> tuple[list[Any], dict[str, Any], int] | None:
    """The upstream's vectors in input order, its answer and its prompt tokens, if whole."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(answer) is not dict or type(answer.get("data")) is not list:
        return None
    data = answer["data"]
    usage = answer.get("usage")
    if len(data) != count or type(usage) is not dict:
        return None
    tokens = usage.get("prompt_tokens")
    if type(tokens) is not int:
        return None
    ordered: list[Any] = [None] * count
    for position, item in enumerate(data):
        if type(item) is not dict or "embedding" not in item:
            return None
        index = item.get("index", position)
        if type(index) is not int or not 0 <= index < count or ordered[index] is not None:
            return None
        ordered[index] = item["embedding"]
    return ordered, answer, tokens


def _length(item: Any) -> int:
    return max(1, len(item))  # characters of a string, ids of a token list


def _shares(total: int, weights: list[int]) -> list[int]:
    """`total` shared in proportion to `weights`, in whole tokens that add up to it."""
    whole = sum(weights)
    shares = [total * weight // whole for weight in weights]
    shares[-1] += total - sum(shares)
    return shares


def _answer(items: list[dict[str, Any]], upstream: dict[str, Any], tokens: int) -> bytes:
    """The answer to every input: the upstream's (its fields as it sent them) where it gave
    part of it, with every vector in order and the usage of them all."""
    usage = upstream.get("usage")
    return orjson.dumps(
        {
            "object": "list",
            **upstream,
            "data": [
                {"object": "embedding", "embedding": item["embedding"], "index": index}
                for index, item in enumerate(items)
            ],
            "usage": {
                **(usage if type(usage) is dict else {}),
                "prompt_tokens": tokens,
                "total_tokens": tokens,
            },
        }
    )
