"""`POST /v1/embeddings`: deterministic unit vectors in vLLM's response shape.

Each input's vector depends only on (model, input): float32 from SHAKE-256, scaled to unit
length, as a list of floats or base64 of the little-endian bytes. An embedding request takes
one `max_num_seqs` slot for its time to first token, like a prefill, and counts its inputs as
prompt tokens and finished requests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import sys
import time
from array import array
from typing import Any

import orjson

from chaos.sim.engine import Engine
from chaos.sim.parsing import RequestParser
from chaos.sim.protocol import (
    HTTPError,
    RequestIds,
    error,
    field_error,
    read_json,
    rejected,
    send_json,
)
from chaos.sim.settings import SimSettings
from chaos.sim.tokens import words
from gateway.asgi import DisconnectWatch, Receive, Scope, Send

__all__ = ["Embeddings", "vector"]


class Embeddings:
    """The embeddings endpoint of one worker."""

    __slots__ = ("_engine", "_ids", "_parser", "_settings")

    def __init__(
        self, settings: SimSettings, parser: RequestParser, engine: Engine, ids: RequestIds
    ) -> None:
        self._settings = settings
        self._parser = parser
        self._engine = engine
        self._ids = ids

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            data = await read_json(scope, receive)
            inputs = _inputs(data.get("input"))
            encoding = data.get("encoding_format")
            if encoding is None:
                encoding = "float"
            elif encoding not in ("float", "base64"):
                raise field_error("encoding_format", "'float' or 'base64'")
            model, stats = self._parser.model(data)
            if data.get("dimensions") is not None:
                raise error(
                    f'Model "{model}" does not support matryoshka representation, changing '
                    "output dimensions will lead to poor results.",
                    "BadRequestError",
                    400,
                )
            limit = self._settings.max_model_len
            for _, tokens in inputs:
                if tokens > limit:
                    raise rejected(
                        f"This model's maximum context length is {limit} tokens. However, you "
                        f"requested {tokens} tokens in the input for embedding generation. "
                        "Please reduce the length of the input.",
                        "input_tokens",
                        tokens,
                    )
        except HTTPError as exc:
            await exc.send(send)
            return
        engine = self._engine
        if not engine.immediate():
            async with DisconnectWatch(receive) as watch:
                await engine.acquire(stats)
                try:
                    if engine.ttft:
                        await asyncio.sleep(engine.ttft)
                except asyncio.CancelledError:
                    stats.finished["abort"] += len(inputs)
                    raise
                finally:
                    engine.release(stats)
            if watch.disconnected:
                return
        prompt_tokens = sum(tokens for _, tokens in inputs)
        stats.prompt_tokens += prompt_tokens
        stats.finished["stop"] += len(inputs)
        items = []
        dimensions = self._settings.embedding_dim
        for index, (item, _) in enumerate(inputs):
            values = vector(orjson.dumps([model, item]), dimensions)
            embedding: list[float] | str
            if encoding == "base64":
                if sys.byteorder == "big":
                    values.byteswap()
                embedding = base64.b64encode(values.tobytes()).decode()
            else:
                embedding = values.tolist()
            items.append({"index": index, "object": "embedding", "embedding": embedding})
        body = {
            "id": self._ids.new("embd-"),
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": items,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }
        await send_json(send, 200, orjson.dumps(body))


def _inputs(value: Any) -> list[tuple[Any, int]]:
    """The inputs of a request, each with its token count: text, token ids, or a batch."""
    if type(value) is str:
        return [(value, words(value))]
    if type(value) is list and value:
        if all(type(item) is str for item in value):
            return [(item, words(item)) for item in value]
        if all(type(item) is int for item in value):
            return [(value, len(value))]
        if all(type(item) is list and all(type(i) is int for i in item) for item in value):
            return [(item, len(item)) for item in value]
    raise field_error("input", "a string, a list of strings, or token ids")


def vector(material: bytes, dimensions: int) -> array[float]:
    """A unit-length float32 vector that depends only on `material`."""
    raw = array("i")
    raw.frombytes(hashlib.shake_256(material).digest(4 * dimensions))
    scale = 1.0 / (math.hypot(*raw) or 1.0)
    return array("f", [value * scale for value in raw])
