"""Embeddings cached item by item: only the missing inputs go upstream, merged in order."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.config import CacheConfig
from gateway.router import Call, Outcome, Router
from gateway.router.build import build_router
from gateway.wire.validation import Endpoint, ProxyRequest, parse_request
from policies.cache import memory_cache
from providers.fake import FakeAdapters, FakeRequest, Json
from tests.router.conftest import complete, gateway_config, route

ALICE = Call("req-a", caller="alice")
BOB = Call("req-b", caller="bob")


def vector(text: str | list[int]) -> list[float]:
    first = text[0]
    return [float(len(text)), float(ord(first) if isinstance(first, str) else first)]


def embeddings(request: FakeRequest) -> Json:
    """An upstream that embeds each input, 2 tokens per input."""
    inputs = request.body["input"]
    if isinstance(inputs, str) or type(inputs[0]) is int:
        inputs = [inputs]
    data = [
        {"object": "embedding", "embedding": vector(text), "index": index}
        for index, text in enumerate(inputs)
    ]
    tokens = 2 * len(inputs)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return Json({"object": "list", "data": data, "model": "fake-embed", "usage": usage})


def embed_request(inputs: Any, **fields: Any) -> ProxyRequest:
    body = {"model": "e", "input": inputs, **fields}
    return parse_request(Endpoint.EMBEDDINGS, orjson.dumps(body))


def router(fakes: FakeAdapters) -> Router:
    fakes["a"].then = embeddings
    cache = memory_cache(CacheConfig(enabled=True))
    return build_router(gateway_config(route("e", "a")), adapters=fakes, cache=cache)


def vectors(body: bytes) -> list[list[float]]:
    data = orjson.loads(body)["data"]
    assert [item["index"] for item in data] == list(range(len(data)))
    return [item["embedding"] for item in data]


async def test_only_the_missing_inputs_go_upstream(fakes: FakeAdapters) -> None:
    embedder = router(fakes)
    first = Outcome()
    answer = await complete(embedder, embed_request(["apple", "kiwi"]), first, ALICE)
    assert first.cache == "miss"
    assert vectors(answer.body) == [vector("apple"), vector("kiwi")]
    partial = Outcome()
    answer = await complete(embedder, embed_request(["kiwi", "fig", "apple"]), partial, ALICE)
    assert fakes["a"].requests[-1].body["input"] == ["fig"]  # the only miss
    assert vectors(answer.body) == [vector("kiwi"), vector("fig"), vector("apple")]
    body = orjson.loads(answer.body)
    assert body["usage"] == {"prompt_tokens": 6, "total_tokens": 6}  # 2 upstream + 2 x 2 kept
    assert partial.prompt_tokens == 2  # the key is charged the upstream's tokens alone
    whole = Outcome()
    answer = await complete(embedder, embed_request(["fig", "apple"]), whole, ALICE)
    assert whole.cache == "hit" and answer.backend == "cache"
    assert vectors(answer.body) == [vector("fig"), vector("apple")]
    assert orjson.loads(answer.body)["usage"]["prompt_tokens"] == 4
    assert len(fakes["a"].requests) == 2


async def test_a_single_input_and_token_lists(fakes: FakeAdapters) -> None:
    embedder = router(fakes)
    await complete(embedder, embed_request("plum"), Outcome(), ALICE)
    outcome = Outcome()
    await complete(embedder, embed_request(["plum"]), outcome, ALICE)
    assert outcome.cache == "hit"  # one input either way
    tokens = Outcome()
    await complete(embedder, embed_request([[1, 2, 3]]), tokens, ALICE)
    assert tokens.cache == "miss"
    again = Outcome()
    answer = await complete(embedder, embed_request([1, 2, 3]), again, ALICE)
    assert again.cache == "hit" and vectors(answer.body) == [vector([1, 2, 3])]


async def test_format_dimensions_and_keys_make_other_entries(fakes: FakeAdapters) -> None:
    embedder = router(fakes)
    await complete(embedder, embed_request(["pear"]), Outcome(), ALICE)
    for request, call in (
        (embed_request(["pear"], encoding_format="base64"), ALICE),
        (embed_request(["pear"], dimensions=1), ALICE),
        (embed_request(["pear"]), BOB),
    ):
        outcome = Outcome()
        await complete(embedder, request, outcome, call)
        assert outcome.cache == "miss"
    assert len(fakes["a"].requests) == 4


def test_token_shares_add_up() -> None:
    from gateway.router.embeddings import _shares

    assert _shares(10, [1, 1, 1]) == [3, 3, 4]
    assert sum(_shares(7, [5, 1, 2, 9])) == 7
    assert _shares(5, [3]) == [5]
