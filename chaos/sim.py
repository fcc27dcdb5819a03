"""A simulated vLLM worker: the OpenAI-compatible surface of `vllm serve`, without a model.

Tests, demos, drills and benchmarks talk to this instead of real vLLM. It answers with vLLM's
own JSON shapes, status codes, error bodies, SSE framing and Prometheus metric names, and it
keeps vLLM's scheduling behaviour that a gateway cares about: at most `max_num_seqs` requests
generate at once (the rest wait, FIFO), and a client that disconnects aborts its request at once.

Output is deterministic. Each generated token is one word, with a leading space, from a fixed
256-word vocabulary, picked by SHAKE-256 over (model, prompt or messages, seed). The same request
always gets the same text and a different prompt gets different text. Because SHAKE's output
is a stream, a shorter `max_tokens` yields a prefix of a longer one, as greedy decoding would.
A completion ends with finish_reason "length" after `max_tokens` tokens, or "stop" where one of
the request's `stop` strings appears (the text is cut before it and `stop_reason` names it).

Token counting, which every `usage` block and metric follows:

- A prompt token is one whitespace-separated word of the prompt text; a prompt given as token
  ids counts one token per id.
- A chat prompt is the sum over messages of the words of their text content (a string, or the
  `text` parts of a content list), plus `CHAT_TOKENS_PER_MESSAGE` per message and
  `CHAT_TOKENS_GENERATION_PROMPT` once, standing in for a chat template's role markers.
- A completion token is one generated word.

Where this differs from real vLLM, on purpose:

- A request without `max_tokens` gets `default_max_tokens` (capped by the context). Real vLLM
  gives a chat request everything left of `max_model_len`, and a completion request 16.
- One worker serves chat, completions and embeddings for every `--model`; real vLLM serves
  embeddings only from a pooling model. `n` other than 1, logprobs and tools are not simulated.
- A batch of completion prompts holds one `max_num_seqs` slot, not one per prompt.

It can also misbehave on purpose, to test a router's resilience: errors at a given rate,
latency, hangs, connections reset or cut mid-stream, stalled streams, in-stream error events,
slow tokens and a failing /health. `chaos.faults` describes them; `--fault-*` flags set them at
start, and `PUT/GET/DELETE /sim/faults` and `GET /sim/stats` control and count them at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import itertools
import math
import os
import sys
import time
from array import array
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chaos.faults import (
    FaultInjector,
    Faults,
    add_fault_arguments,
    drop_connection,
    faults_from_args,
)
from gateway.asgi import (
    BodyTooLarge,
    ClientDisconnected,
    DisconnectWatch,
    Message,
    Receive,
    Scope,
    Send,
    read_body,
)

__all__ = [
    "CHAT_TOKENS_GENERATION_PROMPT",
    "CHAT_TOKENS_PER_MESSAGE",
    "VOCABULARY",
    "Faults",
    "SimSettings",
    "SimWorker",
    "add_arguments",
    "run",
]

CHAT_TOKENS_PER_MESSAGE = 4
CHAT_TOKENS_GENERATION_PROMPT = 3
MAX_BODY_BYTES = 16 * 1024 * 1024

VOCABULARY: tuple[str, ...] = tuple(
    """
    the of and to in is that for it as was with be by on not he this are or his from at which
    but have an they you were her she there one all we their has been if more when will would
    who so no out up into do can time about other could than its some what only new them two
    like first then now also any these may our over such most after well way even made many
    before must through back years where much your down should because each just those people
    how too little state good very make world still own see men work long here get both between
    life being under never day same another know while last might us great old year off come
    since against go came right used take three states himself few house use during without
    again place around however home small found thought went say part once general high upon
    school every does got united left number course war until always away something fact though
    water less public put think almost hand enough far took head yet government system better
    set told nothing night end why called didn find look asked later knew point next program
    city business give group toward young let room side social present given several order
    national second possible rather per face among form important often things looked early
    white case become large big need four within felt along children saw best church ever least
    power development light thing seemed
    """.split()  # noqa: SIM905 (a word list reads better as words)
)
assert len(VOCABULARY) == 256  # one SHAKE output byte picks one word
_TOKENS = tuple(" " + word for word in VOCABULARY)

_FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass(frozen=True, slots=True)
class SimSettings:
    models: tuple[str, ...] = ("tiny-llama",)  # served model names; others get 404
    ttft_ms: float = 0.0  # delay before the first token (also before a non-stream reply)
    tokens_per_s: float = 0.0  # 0 = no delay between tokens
    tokens_per_chunk: int = 1  # tokens per SSE chunk
    max_num_seqs: int = 256  # requests generating at once; the rest wait
    max_model_len: int = 2048  # prompt_tokens + max_tokens over this gets 400
    default_max_tokens: int = 16
    embedding_dim: int = 384
    api_key: str | None = None  # when set, /v1/* requires "Authorization: Bearer <key>"
    # vLLM continues a final assistant message when asked (`continue_final_message`); off,
    # the worker refuses that field as OpenAI's API does, like a backend that cannot.
    continue_final_message: bool = True
    faults: Faults = field(default_factory=Faults)  # the faults to start with (chaos.faults)


# --------------------------------------------------------------------------------------------
# Errors, in the shapes vLLM's FastAPI app produces them


class _HTTPError(Exception):
    def __init__(
        self, status: int, content: Any, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = orjson.dumps(content)
        self.headers = headers or []

    async def send(self, send: Send) -> None:
        await _send_json(send, self.status, self.body, self.headers)


def _error_content(message: str, type_: str, status: int, param: str | None) -> Any:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def _error(message: str, type_: str, status: int, param: str | None = None) -> _HTTPError:
    return _HTTPError(status, _error_content(message, type_, status, param))


def _invalid(message: str, param: str | None = None) -> _HTTPError:
    # A request that fails FastAPI/pydantic validation: vLLM's handler for those reports the
    # HTTP phrase as the type, unlike the errors its serving code raises.
    return _error(message, "Bad Request", 400, param)


def _rejected(message: str, param: str, value: int) -> _HTTPError:
    # vLLM raises VLLMValidationError, whose str() appends the parameter and value.
    return _error(f"{message} (parameter={param}, value={value})", "BadRequestError", 400, param)


def _field_error(field: str, expected: str) -> _HTTPError:
    return _invalid(f"body.{field}: Input should be {expected}")


# --------------------------------------------------------------------------------------------
# Plain ASGI responses

_JSON = b"application/json"
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]
_METRICS_TYPE = CONTENT_TYPE_LATEST.encode()
_DONE = b"data: [DONE]\n\n"


async def _send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    response_headers = [(b"content-type", _JSON), (b"content-length", b"%d" % len(body))]
    if headers:
        response_headers.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})


async def _send_event(send: Send, content: Any) -> None:
    await send(
        {
            "type": "http.response.body",
            "body": b"data: " + orjson.dumps(content) + b"\n\n",
            "more_body": True,
        }
    )


_NOT_FOUND = _HTTPError(404, {"detail": "Not Found"})
_UNAUTHORIZED = _HTTPError(401, {"error": "Unauthorized"})

_Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


# --------------------------------------------------------------------------------------------
# Fault injection helpers (the worker's part is in SimWorker; what a fault is, in chaos.faults)

_INFERENCE = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_CHAT, _COMPLETIONS, _EMBEDDINGS = range(3)


def _status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _injected_content(status: int) -> Any:
    # The type is the HTTP phrase, as vLLM's handler for HTTPException reports it.
    return _error_content(
        f"Injected fault: the simulated worker answers {status}.",
        _status_phrase(status),
        status,
        None,
    )


def _injected_error(faults: Faults) -> _HTTPError:
    status = faults.error_status or 503
    headers = []
    if faults.retry_after_s is not None:
        headers.append((b"retry-after", b"%d" % math.ceil(faults.retry_after_s)))
    return _HTTPError(status, _injected_content(status), headers)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for a request whose body has been read already: the body again, then on."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# --------------------------------------------------------------------------------------------
# Scheduling state


class _ModelStats:
    __slots__ = ("finished", "generation_tokens", "prompt_tokens", "running", "waiting")

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = dict.fromkeys(_FINISH_REASONS, 0)


class _Slots:
    """`max_num_seqs` slots handed out first come, first served.

    A released slot goes straight to the longest waiter, so a newcomer can't barge past the
    queue, and a waiter cancelled after being handed a slot passes it on.
    """

    __slots__ = ("_free", "_waiters")

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class _Sequence:
    """One prompt's generated output; `pieces` holds each generated token's text."""

    __slots__ = ("finish_reason", "index", "pieces", "prompt_tokens", "stop_reason")

    def __init__(
        self,
        index: int,
        prompt_tokens: int,
        pieces: list[str],
        finish_reason: str,
        stop_reason: str | None,
    ) -> None:
        self.index = index
        self.prompt_tokens = prompt_tokens
        self.pieces = pieces
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason


class _Job:
    __slots__ = (
        "chat",
        "continuous_usage",
        "include_usage",
        "model",
        "prompt_tokens",
        "sequences",
        "stats",
        "stream",
    )

    def __init__(
        self,
        chat: bool,
        model: str,
        stats: _ModelStats,
        sequences: list[_Sequence],
        stream: bool,
        include_usage: bool,
        continuous_usage: bool,
    ) -> None:
        self.chat = chat
        self.model = model
        self.stats = stats
        self.sequences = sequences
        self.prompt_tokens = sum(seq.prompt_tokens for seq in sequences)
        self.stream = stream
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage

    @property
    def completion_tokens(self) -> int:
        return sum(len(seq.pieces) for seq in self.sequences)

    @property
    def longest(self) -> int:
        return max(len(seq.pieces) for seq in self.sequences)


def _generate(
    material: bytes, max_tokens: int, stop: tuple[str, ...], *, skip: int = 0
) -> _Sequence:
    """`max_tokens` tokens of the output for `material`, after its first `skip` tokens."""
    digest = hashlib.shake_256(material).digest(skip + max_tokens)
    pieces = [_TOKENS[byte] for byte in digest[skip:]]
    if stop:
        text = "".join(pieces)
        cut, reason = -1, ""
        for candidate in stop:
            at = text.find(candidate) if candidate else -1
            if at != -1 and (cut == -1 or at < cut):
                cut, reason = at, candidate
        if cut != -1:
            # Generation ends with the token that completes the stop string; the text keeps
            # only what came before it, as vLLM does unless include_stop_str_in_output is set.
            end = cut + len(reason)
            kept: list[str] = []
            position = 0
            for piece in pieces:
                start = position
                position += len(piece)
                kept.append(piece[: max(0, cut - start)])
                if position >= end:
                    break
            return _Sequence(0, 0, kept, "stop", reason)
    return _Sequence(0, 0, pieces, "length", None)


def _words(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------------------------
# The application


class SimWorker:
    """The ASGI app. One instance is one simulated `vllm serve` process."""

    def __init__(self, settings: SimSettings) -> None:
        if not settings.models:
            raise ValueError("SimSettings.models must name at least one model")
        if settings.max_num_seqs < 1 or settings.tokens_per_chunk < 1:
            raise ValueError("max_num_seqs and tokens_per_chunk must be at least 1")
        self.settings = settings
        self._ttft = max(0.0, settings.ttft_ms) / 1000.0
        self._tps = 0.0  # these two are set with the faults, which may change the token rate
        self._instant = True
        self._slots = _Slots(settings.max_num_seqs)
        self._stats = {name: _ModelStats() for name in settings.models}
        self._api_key = settings.api_key.encode() if settings.api_key is not None else None
        # Request ids look like vLLM's (32 hex digits) but cost a counter increment.
        self._id_prefix = os.urandom(8).hex()
        self._ids = itertools.count(1)
        self._started = time.time()
        self._models_body = self._render_models()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(self._stats, self._started))
        # A route's method "*" means its handler checks the method itself.
        self._routes: dict[str, tuple[str, _Handler]] = {
            "/v1/chat/completions": ("POST", self._chat),
            "/v1/completions": ("POST", self._completions),
            "/v1/embeddings": ("POST", self._embeddings),
            "/v1/models": ("GET", self._models),
            "/health": ("GET", self._health),
            "/metrics": ("GET", self._metrics),
            "/sim/faults": ("*", self._faults_endpoint),
            "/sim/stats": ("GET", self._fault_stats),
        }
        # While faults are set, the inference routes go through `_faulted` instead, so that a
        # worker without faults pays nothing for them.
        self._plain_routes = {path: self._routes[path] for path in _INFERENCE}
        self._faulted_routes: dict[str, tuple[str, _Handler]] = {
            "/v1/chat/completions": ("POST", self._faulted_chat),
            "/v1/completions": ("POST", self._faulted_completions),
            "/v1/embeddings": ("POST", self._faulted_embeddings),
        }
        self._injector = FaultInjector()
        self.set_faults(settings.faults)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        # vLLM checks the key in a middleware, before routing, and only under /v1.
        if (
            self._api_key is not None
            and path.startswith("/v1")
            and method != "OPTIONS"
            and not self._authorized(scope)
        ):
            await _UNAUTHORIZED.send(send)
            return
        route = self._routes.get(path)
        if route is None:
            await _NOT_FOUND.send(send)
            return
        allowed, handler = route
        if method != allowed and allowed != "*":
            await _HTTPError(
                405, {"detail": "Method Not Allowed"}, [(b"allow", allowed.encode())]
            ).send(send)
            return
        await handler(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _authorized(self, scope: Scope) -> bool:
        assert self._api_key is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token, self._api_key)
        return False

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{self._id_prefix}{next(self._ids):016x}"

    # ---- request parsing ---------------------------------------------------------------------

    async def _read_json(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        content_type = b""
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
                break
        if content_type.partition(b";")[0].strip().lower() != _JSON:
            raise _invalid("Unsupported Media Type: Only 'application/json' is allowed")
        try:
            body = await read_body(scope, receive, MAX_BODY_BYTES)
        except BodyTooLarge as exc:
            raise _error(str(exc), "BadRequestError", 413) from None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise _invalid(f"JSON decode error: {exc}") from None
        if not isinstance(data, dict):
            raise _invalid("body: Input should be a valid dictionary or object")
        return data

    def _model(self, data: dict[str, Any]) -> tuple[str, _ModelStats]:
        model = data.get("model")
        if model is None:
            model = self.settings.models[0]  # vLLM serves its first name when none is given
        elif type(model) is not str:
            raise _field_error("model", "a valid string")
        stats = self._stats.get(model)
        if stats is None:
            raise _error(f"The model `{model}` does not exist.", "NotFoundError", 404, "model")
        return model, stats

    def _max_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        limit = self.settings.max_model_len
        if prompt_tokens >= limit:
            raise _rejected(
                f"This model's maximum context length is {limit} tokens. However, your request "
                f"has {prompt_tokens} input tokens. Please reduce the length of the input "
                "messages.",
                "input_tokens",
                prompt_tokens,
            )
        if requested is None:
            return min(self.settings.default_max_tokens, limit - prompt_tokens)
        if prompt_tokens + requested > limit:
            raise _rejected(
                f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This "
                f"model's maximum context length is {limit} tokens and your request has "
                f"{prompt_tokens} input tokens ({requested} > {limit} - {prompt_tokens}).",
                "max_tokens",
                requested,
            )
        if requested < 1:
            raise _rejected(
                f"max_tokens must be at least 1, got {requested}.", "max_tokens", requested
            )
        return requested

    def _parse_generation(self, data: dict[str, Any], chat: bool) -> _Job:
        # Field checks first, as FastAPI validates the body before vLLM looks at the model.
        if chat:
            messages = data.get("messages")
            if type(messages) is not list or not messages:
                raise _field_error("messages", "a non-empty list of messages")
            prompt_tokens = CHAT_TOKENS_GENERATION_PROMPT + CHAT_TOKENS_PER_MESSAGE * len(messages)
            for message in messages:
                if type(message) is not dict or type(message.get("role")) is not str:
                    raise _field_error("messages", "a list of objects with a string role")
                content = message.get("content")
                if type(content) is str:
                    prompt_tokens += _words(content)
                elif type(content) is list:
                    for part in content:
                        if type(part) is not dict:
                            raise _field_error("messages.content", "a list of content parts")
                        text = part.get("text")
                        if part.get("type") == "text" and type(text) is str:
                            prompt_tokens += _words(text)
                elif content is not None:
                    raise _field_error("messages.content", "a string or a list of parts")
            skip, messages = self._continuation(data, messages)
            if skip is not None:
                # The final assistant message is continued, not closed and answered: its
                # role marker stands in for the generation prompt (ChatML, as vLLM renders it).
                prompt_tokens -= CHAT_TOKENS_PER_MESSAGE
            prompts: list[tuple[Any, int]] = [(messages, prompt_tokens)]
            requested = data.get("max_completion_tokens")
            if requested is None:
                requested = data.get("max_tokens")
        else:
            skip = None
            prompts = self._prompts(data.get("prompt"))
            requested = data.get("max_tokens")
        if requested is not None and type(requested) is not int:
            raise _field_error("max_tokens", "a valid integer")
        seed = data.get("seed")
        if seed is not None and type(seed) is not int:
            raise _field_error("seed", "a valid integer")
        stop_field = data.get("stop")
        if stop_field is None:
            stop: tuple[str, ...] = ()
        elif type(stop_field) is str:
            stop = (stop_field,)
        elif type(stop_field) is list and all(type(s) is str for s in stop_field):
            stop = tuple(stop_field)
        else:
            raise _field_error("stop", "a string or a list of strings")
        stream = data.get("stream")
        if stream is None:
            stream = False
        elif type(stream) is not bool:
            raise _field_error("stream", "a valid boolean")
        options = data.get("stream_options")
        if options is not None and type(options) is not dict:
            raise _field_error("stream_options", "a valid dictionary")
        if options and not stream:
            raise _invalid(
                "Value error, Stream options can only be defined when `stream=True`. "
                "(parameter=stream_options)",
                "stream_options",
            )
        include_usage = bool(options and options.get("include_usage"))
        continuous_usage = include_usage and bool(options and options.get("continuous_usage_stats"))

        model, stats = self._model(data)
        sequences = []
        for index, (prompt, prompt_tokens) in enumerate(prompts):
            max_tokens = self._max_tokens(prompt_tokens, requested)
            material = orjson.dumps([model, prompt, seed], option=orjson.OPT_SORT_KEYS)
            sequence = _generate(material, max_tokens, stop, skip=skip or 0)
            sequence.index = index
            sequence.prompt_tokens = prompt_tokens
            sequences.append(sequence)
        return _Job(chat, model, stats, sequences, stream, include_usage, continuous_usage)

    def _continuation(
        self, data: dict[str, Any], messages: list[Any]
    ) -> tuple[int | None, list[Any]]:
        """For `continue_final_message`: how many tokens of the answer the final assistant
        message already holds, and the messages the answer is generated for.

        A prefill that is the start of what this worker would answer anyway is continued
        where it stops, as greedy decoding would; any other prefill is generated for afresh.
        """
        flag = data.get("continue_final_message")
        if flag is None or flag is False:
            return None, messages
        if type(flag) is not bool:
            raise _field_error("continue_final_message", "a valid boolean")
        if not self.settings.continue_final_message:
            raise _invalid(
                "Unrecognized request argument supplied: continue_final_message",
                "continue_final_message",
            )
        if data.get("add_generation_prompt", True) is not False:
            raise _invalid(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            )
        final = messages[-1]
        prefill = final.get("content")
        if final.get("role") != "assistant" or type(prefill) is not str:
            raise _invalid(
                "continue_final_message is set but the final message is not an assistant "
                "message with text content.",
                "messages",
            )
        earlier = messages[:-1]
        words = _words(prefill)
        model = data.get("model")
        if model is None:
            model = self.settings.models[0]
        material = orjson.dumps([model, earlier, data.get("seed")], option=orjson.OPT_SORT_KEYS)
        if "".join(_generate(material, words, ()).pieces) == prefill:
            return words, earlier
        return 0, messages

    @staticmethod
    def _prompts(prompt: Any) -> list[tuple[Any, int]]:
        """The prompts of a completion request: text, token ids, or a batch of either."""
        if type(prompt) is str and prompt:
            return [(prompt, _words(prompt))]
        if type(prompt) is list and prompt:
            if all(type(item) is int for item in prompt):
                return [(prompt, len(prompt))]
            if all(type(item) is str for item in prompt):
                return [(item, _words(item)) for item in prompt]
            if all(
                type(item) is list and item and all(type(i) is int for i in item) for item in prompt
            ):
                return [(item, len(item)) for item in prompt]
        raise _invalid(
            "Value error, Either prompt or prompt_embeds must be provided and non-empty. "
            "(parameter=prompt)",
            "prompt",
        )

    # ---- chat and completions ------------------------------------------------------------------

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._injector.requests += 1
        await self._generation(scope, receive, send, chat=True)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._injector.requests += 1
        await self._generation(scope, receive, send, chat=False)

    async def _generation(self, scope: Scope, receive: Receive, send: Send, chat: bool) -> None:
        try:
            job = self._parse_generation(await self._read_json(scope, receive), chat)
        except _HTTPError as exc:
            await exc.send(send)
            return
        if job.stream:
            await self._stream(receive, send, job)
        elif self._instant and self._slots.try_acquire():
            # Nothing to wait for, so nothing a disconnect could abort: no watcher, and the
            # slot is free again before anything else runs.
            self._slots.release()
            self._record(job)
            await _send_json(send, 200, self._render(job))
        else:
            await self._delayed(receive, send, job)

    def _record(self, job: _Job) -> None:
        stats = job.stats
        stats.prompt_tokens += job.prompt_tokens
        stats.generation_tokens += job.completion_tokens
        for seq in job.sequences:
            stats.finished[seq.finish_reason] += 1

    async def _acquire(self, stats: _ModelStats) -> None:
        if not self._slots.try_acquire():
            stats.waiting += 1
            try:
                await self._slots.acquire()
            except asyncio.CancelledError:
                stats.finished["abort"] += 1
                raise
            finally:
                stats.waiting -= 1
        stats.running += 1

    def _release(self, stats: _ModelStats) -> None:
        stats.running -= 1
        self._slots.release()

    async def _delayed(self, receive: Receive, send: Send, job: _Job) -> None:
        """A non-streaming reply that has to wait for a slot, the first token, or both."""
        stats = job.stats
        async with DisconnectWatch(receive) as watch:
            await self._acquire(stats)
            try:
                delay = self._ttft
                if self._tps:
                    delay += (job.longest - 1) / self._tps
                if delay > 0:
                    await asyncio.sleep(delay)
            except asyncio.CancelledError:
                stats.finished["abort"] += 1
                raise
            finally:
                self._release(stats)
            self._record(job)
        if not watch.disconnected:
            await _send_json(send, 200, self._render(job))

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        }

    def _render(self, job: _Job) -> bytes:
        """A non-streaming reply: pydantic's model_dump() of vLLM's response, nulls included."""
        choices: list[dict[str, Any]]
        usage = self._usage(job.prompt_tokens, job.completion_tokens)
        usage["prompt_tokens_details"] = None
        if job.chat:
            seq = job.sequences[0]
            choices = [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "".join(seq.pieces),
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "reasoning": None,
                    },
                    "logprobs": None,
                    "finish_reason": seq.finish_reason,
                    "stop_reason": seq.stop_reason,
                    "token_ids": None,
                    "routed_experts": None,
                }
            ]
            return orjson.dumps(
                {
                    "id": self._new_id("chatcmpl-"),
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": job.model,
                    "choices": choices,
                    "service_tier": None,
                    "system_fingerprint": None,
                    "usage": usage,
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                    "prompt_text": None,
                    "kv_transfer_params": None,
                    "ec_transfer_params": None,
                    "metrics": None,
                }
            )
        choices = [
            {
                "index": seq.index,
                "text": "".join(seq.pieces),
                "logprobs": None,
                "finish_reason": seq.finish_reason,
                "stop_reason": seq.stop_reason,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "routed_experts": None,
            }
            for seq in job.sequences
        ]
        return orjson.dumps(
            {
                "id": self._new_id("cmpl-"),
                "object": "text_completion",
                "created": int(time.time()),
                "model": job.model,
                "choices": choices,
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage,
                "kv_transfer_params": None,
                "ec_transfer_params": None,
                "metrics": None,
            }
        )

    async def _stream(self, receive: Receive, send: Send, job: _Job) -> None:
        # vLLM sends the 200 and its headers at once, before the request is even scheduled:
        # a stream that is still queued looks exactly like one waiting for its first token.
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        async with DisconnectWatch(receive):
            await self._stream_events(send, job)

    async def _stream_events(self, send: Send, job: _Job) -> None:
        stats = job.stats
        chat = job.chat
        head: dict[str, Any] = {
            "id": self._new_id("chatcmpl-" if chat else "cmpl-"),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": job.model,
        }
        await self._acquire(stats)
        finished = False
        try:
            loop = asyncio.get_running_loop()
            first_token_at = loop.time() + self._ttft
            if self._ttft:
                await asyncio.sleep(self._ttft)
            stats.prompt_tokens += job.prompt_tokens
            if chat:
                # Chunks are model_dump_json(exclude_unset=True): only fields vLLM set appear.
                choice = {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                chunk = {**head, "choices": [choice]}
                if job.continuous_usage:
                    chunk["usage"] = self._usage(job.prompt_tokens, 0)
                chunk["prompt_token_ids"] = None
                chunk["prompt_text"] = None
                await _send_event(send, chunk)
            per_chunk = self.settings.tokens_per_chunk
            longest = job.longest
            for begin in range(0, longest, per_chunk):
                end = min(begin + per_chunk, longest)
                if self._tps and end > 1:
                    # Deadlines from the first token keep the rate exact however long sends take.
                    delay = first_token_at + (end - 1) / self._tps - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if end == longest:
                    # The engine is done with the request before its last chunk goes out.
                    self._release(stats)
                    finished = True
                    for seq in job.sequences:
                        stats.finished[seq.finish_reason] += 1
                for seq in job.sequences:
                    count = len(seq.pieces)
                    if begin >= count:
                        continue
                    stop = min(end, count)
                    stats.generation_tokens += stop - begin
                    text = "".join(seq.pieces[begin:stop])
                    last = stop == count
                    if chat:
                        choice = {"index": 0, "delta": {"content": text}, "logprobs": None}
                    else:
                        choice = {"index": seq.index, "text": text, "logprobs": None}
                    choice["finish_reason"] = seq.finish_reason if last else None
                    if last or not chat:
                        choice["stop_reason"] = seq.stop_reason if last else None
                    if not chat:
                        choice["prompt_token_ids"] = None
                    choice["token_ids"] = None
                    chunk = {**head, "choices": [choice]}
                    if job.continuous_usage:
                        chunk["usage"] = self._usage(seq.prompt_tokens, stop)
                    await _send_event(send, chunk)
            if job.include_usage:
                usage = self._usage(job.prompt_tokens, job.completion_tokens)
                await _send_event(send, {**head, "choices": [], "usage": usage})
            await send({"type": "http.response.body", "body": _DONE})
        except asyncio.CancelledError:
            if not finished:
                stats.finished["abort"] += 1
            raise
        finally:
            if not finished:
                self._release(stats)

    # ---- embeddings ----------------------------------------------------------------------------

    async def _embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._injector.requests += 1
        await self._embed(scope, receive, send)

    async def _embed(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            data = await self._read_json(scope, receive)
            inputs = self._embedding_inputs(data.get("input"))
            encoding = data.get("encoding_format")
            if encoding is None:
                encoding = "float"
            elif encoding not in ("float", "base64"):
                raise _field_error("encoding_format", "'float' or 'base64'")
            model, stats = self._model(data)
            if data.get("dimensions") is not None:
                raise _error(
                    f'Model "{model}" does not support matryoshka representation, changing '
                    "output dimensions will lead to poor results.",
                    "BadRequestError",
                    400,
                )
            limit = self.settings.max_model_len
            for _, tokens in inputs:
                if tokens > limit:
                    raise _rejected(
                        f"This model's maximum context length is {limit} tokens. However, you "
                        f"requested {tokens} tokens in the input for embedding generation. "
                        "Please reduce the length of the input.",
                        "input_tokens",
                        tokens,
                    )
        except _HTTPError as exc:
            await exc.send(send)
            return
        if not self._instant or not self._slots.try_acquire():
            async with DisconnectWatch(receive) as watch:
                await self._acquire(stats)
                try:
                    if self._ttft:
                        await asyncio.sleep(self._ttft)
                except asyncio.CancelledError:
                    stats.finished["abort"] += len(inputs)
                    raise
                finally:
                    self._release(stats)
            if watch.disconnected:
                return
        else:
            self._slots.release()
        prompt_tokens = sum(tokens for _, tokens in inputs)
        stats.prompt_tokens += prompt_tokens
        stats.finished["stop"] += len(inputs)
        items = []
        for index, (item, _) in enumerate(inputs):
            vector = self._vector(orjson.dumps([model, item]))
            embedding: list[float] | str
            if encoding == "base64":
                if sys.byteorder == "big":
                    vector.byteswap()
                embedding = base64.b64encode(vector.tobytes()).decode()
            else:
                embedding = vector.tolist()
            items.append({"index": index, "object": "embedding", "embedding": embedding})
        body = {
            "id": self._new_id("embd-"),
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
        await _send_json(send, 200, orjson.dumps(body))

    @staticmethod
    def _embedding_inputs(value: Any) -> list[tuple[Any, int]]:
        if type(value) is str:
            return [(value, _words(value))]
        if type(value) is list and value:
            if all(type(item) is str for item in value):
                return [(item, _words(item)) for item in value]
            if all(type(item) is int for item in value):
                return [(value, len(value))]
            if all(type(item) is list and all(type(i) is int for i in item) for item in value):
                return [(item, len(item)) for item in value]
        raise _field_error("input", "a string, a list of strings, or token ids")

    def _vector(self, material: bytes) -> array[float]:
        """A unit-length float32 vector that depends only on `material`."""
        raw = array("i")
        raw.frombytes(hashlib.shake_256(material).digest(4 * self.settings.embedding_dim))
        scale = 1.0 / (math.hypot(*raw) or 1.0)
        return array("f", [value * scale for value in raw])

    # ---- the rest ------------------------------------------------------------------------------

    def _render_models(self) -> bytes:
        created = int(self._started)
        return orjson.dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": name,
                        "object": "model",
                        "created": created,
                        "owned_by": "vllm",
                        "root": name,
                        "parent": None,
                        "max_model_len": self.settings.max_model_len,
                        "permission": [
                            {
                                "id": f"modelperm-{os.urandom(16).hex()}",
                                "object": "model_permission",
                                "created": created,
                                "allow_create_engine": False,
                                "allow_sampling": True,
                                "allow_logprobs": True,
                                "allow_search_indices": False,
                                "allow_view": True,
                                "allow_fine_tuning": False,
                                "organization": "*",
                                "group": None,
                                "is_blocking": False,
                            }
                        ],
                    }
                    for name in self.settings.models
                ],
            }
        )

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, self._models_body)

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = self._injector.faults.health_status
        headers = [(b"content-length", b"0")]
        await send(
            {
                "type": "http.response.start",
                "status": 200 if status is None else status,
                "headers": headers,
            }
        )
        await send({"type": "http.response.body", "body": b""})

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.render_metrics()
        headers = [(b"content-type", _METRICS_TYPE), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def render_metrics(self) -> bytes:
        """vLLM's metric names and labels, rendered by prometheus_client as vLLM's are."""
        return generate_latest(self._registry)

    # ---- fault injection -----------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._injector.faults

    def set_faults(self, faults: Faults) -> None:
        """Make `faults` the active ones, and count requests and faults afresh."""
        self._injector.set(faults)
        tps = self.settings.tokens_per_s if faults.tokens_per_s is None else faults.tokens_per_s
        self._tps = max(0.0, tps)
        self._instant = self._ttft == 0.0 and self._tps == 0.0
        self._routes.update(self._faulted_routes if faults.per_request else self._plain_routes)

    async def _faults_endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method == "PUT":
            try:
                data = orjson.loads(await read_body(scope, receive, MAX_BODY_BYTES))
                faults = Faults.from_json(data)
            except (orjson.JSONDecodeError, ValueError, BodyTooLarge) as exc:
                await _invalid(f"Invalid faults: {exc}").send(send)
                return
            except ClientDisconnected:
                return
            self.set_faults(faults)
        elif method == "DELETE":
            self.set_faults(Faults())
        elif method != "GET":
            allow = [(b"allow", b"GET, PUT, DELETE")]
            await _HTTPError(405, {"detail": "Method Not Allowed"}, allow).send(send)
            return
        await _send_json(send, 200, orjson.dumps(self._injector.faults.to_json()))

    async def _fault_stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, orjson.dumps(self._injector.stats()))

    async def _faulted_chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._faulted(scope, receive, send, _CHAT)

    async def _faulted_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._faulted(scope, receive, send, _COMPLETIONS)

    async def _faulted_embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._faulted(scope, receive, send, _EMBEDDINGS)

    async def _faulted(self, scope: Scope, receive: Receive, send: Send, kind: int) -> None:
        """An inference request while faults are set; chaos.faults says what happens when."""
        injector = self._injector
        faults = injector.faults
        picked = injector.admit()
        # The body first, whatever comes next: watching for a disconnect reads the same
        # channel, and a connection closed with input unread would be reset, not closed.
        try:
            body = await read_body(scope, receive, MAX_BODY_BYTES)
        except BodyTooLarge as exc:
            await _error(str(exc), "BadRequestError", 413).send(send)
            return
        except ClientDisconnected:
            return
        if faults.latency_ms > 0:
            async with DisconnectWatch(receive) as watch:
                await asyncio.sleep(faults.latency_ms / 1000.0)
            if watch.disconnected:
                return
        if picked:
            if faults.hang:
                injector.faulted += 1
                await self._hang(body, receive)
                return
            if faults.reset:
                injector.faulted += 1
                drop_connection(send)
                # Return only once uvicorn has seen the connection go: it then neither
                # answers 500 for a response never started nor logs one.
                await _until_disconnected(receive)
                return
            if faults.error_status is not None and (
                kind == _EMBEDDINGS or not faults.error_event_first
            ):
                injector.faulted += 1
                await _injected_error(faults).send(send)
                return
        receive = _replay(body, receive)
        if kind == _EMBEDDINGS:
            await self._embed(scope, receive, send)
            return
        try:
            job = self._parse_generation(await self._read_json(scope, receive), kind == _CHAT)
        except _HTTPError as exc:
            await exc.send(send)
            return
        if picked and job.stream and faults.error_event_first:
            injector.faulted += 1
            await self._error_event(send, job, faults)
        elif picked and not job.stream and faults.error_status is not None:
            injector.faulted += 1  # error_event_first is set: plain replies get the status
            await _injected_error(faults).send(send)
        elif job.stream:
            if picked and (
                faults.cut_after_chunks is not None
                or faults.stall_after_chunks is not None
                or faults.garbage_after_chunks is not None
            ):
                send = self._interrupting(send, faults)
            await self._stream(receive, send, job)
        elif self._instant and self._slots.try_acquire():
            self._slots.release()
            self._record(job)
            await _send_json(send, 200, self._render(job))
        else:
            await self._delayed(receive, send, job)

    async def _hang(self, body: bytes, receive: Receive) -> None:
        """Hold a slot, answering nothing, until the client leaves."""
        try:
            model = orjson.loads(body).get("model")
        except (orjson.JSONDecodeError, AttributeError):
            model = None
        stats = self._stats.get(model) if type(model) is str else None
        if stats is None:
            stats = self._stats[self.settings.models[0]]
        async with DisconnectWatch(receive, grace_s=0):
            await self._acquire(stats)
            try:
                await asyncio.get_running_loop().create_future()
            except asyncio.CancelledError:
                stats.finished["abort"] += 1
                raise
            finally:
                self._release(stats)

    async def _error_event(self, send: Send, job: _Job, faults: Faults) -> None:
        """A stream that fails at once: a 200, vLLM's in-stream error event, then [DONE]."""
        status = faults.error_status or 503
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await _send_event(send, _injected_content(status))
        await send({"type": "http.response.body", "body": _DONE})
        job.stats.finished["error"] += len(job.sequences)

    def _interrupting(self, send: Send, faults: Faults) -> Send:
        """`send` for a stream that is cut, stalls, or sends garbage after some SSE events."""
        cut = faults.cut_after_chunks
        stall = faults.stall_after_chunks
        garbage = faults.garbage_after_chunks
        injector = self._injector
        sent = 0

        async def interrupting(message: Message) -> None:
            nonlocal sent
            if message["type"] == "http.response.body":
                if sent == garbage:
                    injector.faulted += 1
                    await send({**message, "body": _GARBAGE_EVENT, "more_body": True})
                if sent in (cut, stall):
                    injector.faulted += 1
                    if sent == cut:
                        drop_connection(send)  # what the client sees: chaos.faults says
                    # Nothing more goes out. The stream's DisconnectWatch cancels the request
                    # when the client leaves (at once, after a cut), aborting it and freeing
                    # its slot like any other client disconnect.
                    await asyncio.get_running_loop().create_future()
                sent += 1
            await send(message)

        return interrupting


# An event cut off inside its JSON, as a buggy upstream or a broken proxy might send it.
_GARBAGE_EVENT = b'data: {"id": "chatcmpl-garbled", "choices": [{"delta": {"cont\n\n'


class _Collector(Collector):
    """Reads the worker's plain counters at scrape time, so requests never touch a metric lock."""

    def __init__(self, stats: dict[str, _ModelStats], created: float) -> None:
        self._stats = stats
        self._created = created

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "engine"]
        running = GaugeMetricFamily(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels=labels,
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            labels=labels,
        )
        prompt = CounterMetricFamily(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels=labels
        )
        generation = CounterMetricFamily(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels=labels
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*labels, "finished_reason"],
        )
        for name, stats in self._stats.items():
            values = [name, "0"]
            running.add_metric(values, stats.running)
            waiting.add_metric(values, stats.waiting)
            prompt.add_metric(values, stats.prompt_tokens, created=self._created)
            generation.add_metric(values, stats.generation_tokens, created=self._created)
            for reason, count in stats.finished.items():
                success.add_metric([*values, reason], count, created=self._created)
        yield from (running, waiting, prompt, generation, success)


# --------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SimSettings()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help=f"a served model name; repeat for several (default: {defaults.models[0]})",
    )
    parser.add_argument("--ttft-ms", type=float, default=defaults.ttft_ms)
    parser.add_argument("--tokens-per-s", type=float, default=defaults.tokens_per_s)
    parser.add_argument("--tokens-per-chunk", type=int, default=defaults.tokens_per_chunk)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    parser.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens)
    parser.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim)
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--no-continue-final-message",
        dest="continue_final_message",
        action="store_false",
        help="refuse `continue_final_message` (400), like a backend that cannot continue",
    )
    add_fault_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> SimSettings:
    return SimSettings(
        models=tuple(args.models or SimSettings().models),
        ttft_ms=args.ttft_ms,
        tokens_per_s=args.tokens_per_s,
        tokens_per_chunk=args.tokens_per_chunk,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens,
        embedding_dim=args.embedding_dim,
        api_key=args.api_key,
        continue_final_message=args.continue_final_message,
        faults=faults_from_args(args),
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    try:
        app = SimWorker(settings_from_args(args))
    except ValueError as exc:
        print(f"vgate sim: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind
        return exc.code if isinstance(exc.code, int) else 1
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chaos.sim", description="A simulated vLLM worker."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
