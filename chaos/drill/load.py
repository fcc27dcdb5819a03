"""A drill's built-in load: closed-loop clients of the official `openai` SDK.

Each client sends one request, waits for its end, and sends the next: a bounded load whose
rate follows the gateway's speed, so a slow gateway is not buried under a queue of its own
making. The kinds of request take turns by the mix's weights (each client starting at a
different place in the cycle). Every request ends as a `RequestResult`: a whole answer, a
clean refusal, or lost; nothing is dropped, not even the requests in flight when the load
stops (each is bounded by the request timeout).

The clients run on an event loop in a thread of their own, because Chaos Toolkit runs the
drill's actions and pauses on the main thread, synchronously.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import openai
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel, ConfigDict, Field

from chaos.drill.results import RequestKind, RequestResult

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say something about resilience."}
]
EMBED_INPUT = "a drill measures what a fault does to the answers"


class LoadMix(BaseModel):
    """Weights of each kind of request; 0 leaves a kind out."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chat: int = Field(2, ge=0, le=100)
    stream: int = Field(2, ge=0, le=100)
    embed: int = Field(1, ge=0, le=100)

    def cycle(self) -> tuple[RequestKind, ...]:
        kinds: list[RequestKind] = []
        for kind, weight in (("chat", self.chat), ("stream", self.stream), ("embed", self.embed)):
            kinds += [kind] * weight  # type: ignore[list-item]
        return tuple(kinds)


class LoadSpec(BaseModel):
    """How a drill loads the gateway (the `load:` of a drill file's vgate extension)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    clients: int = Field(8, ge=1, le=256)
    mix: LoadMix = LoadMix()
    model: str = Field("default", min_length=1)  # for chat and streams
    embed_model: str = Field("tiny-embed", min_length=1)
    max_tokens: int = Field(16, ge=1, le=4096)
    request_timeout_s: float = Field(30.0, gt=0, le=600)  # past it a request is lost

    def check(self) -> None:
        if not self.mix.cycle():
            raise ValueError("every weight is 0, the load would send nothing")


@dataclass(frozen=True, slots=True)
class LoadTarget:
    url: str  # the gateway's base URL, e.g. http://127.0.0.1:8000
    key: str  # the API key the load's clients send


class Load:
    """The clients, from `start()` to `stop()`; `results` grows as requests end.

    `clock` gives seconds from the drill's start (so results line up with its marks);
    `route_of` maps a model name as asked for to its route (None: no such route).
    """

    def __init__(
        self,
        target: LoadTarget,
        spec: LoadSpec,
        clock: Callable[[], float],
        route_of: Callable[[str], str | None],
    ) -> None:
        spec.check()
        self._target = target
        self._spec = spec
        self._clock = clock
        self._routes = {m: route_of(m) for m in (spec.model, spec.embed_model)}
        self.results: list[RequestResult] = []  # appended by the load's thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vgate-drill-load", daemon=True)
        self._thread.start()
        self._started.wait(10.0)
        if self._failure is not None:
            raise self._failure

    def stop(self) -> None:
        """Stops sending; waits for the requests in flight to end (each within its timeout)."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is None or stopping is None or thread is None:
            return
        if not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
        thread.join(self._spec.request_timeout_s + 10.0)

    def snapshot(self) -> list[RequestResult]:
        return list(self.results)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # surfaced by start(), or the report's counts
            self._failure = error
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        spec = self._spec
        client = openai.AsyncOpenAI(
            base_url=self._target.url.rstrip("/") + "/v1",
            api_key=self._target.key,
            max_retries=0,  # the gateway retries; the drill sees what a client sees
            timeout=spec.request_timeout_s,
        )
        self._started.set()
        cycle = spec.mix.cycle()
        async with client:
            await asyncio.gather(
                *(self._client(client, cycle, offset) for offset in range(spec.clients))
            )

    async def _client(
        self, client: openai.AsyncOpenAI, cycle: tuple[RequestKind, ...], offset: int
    ) -> None:
        assert self._stopping is not None
        turn = offset
        while not self._stopping.is_set():
            kind = cycle[turn % len(cycle)]
            turn += 1
            self.results.append(await self._one(client, kind))

    async def _one(self, client: openai.AsyncOpenAI, kind: RequestKind) -> RequestResult:
        spec = self._spec
        model = spec.embed_model if kind == "embed" else spec.model
        started = self._clock()
        began = time.monotonic()
        ttft: float | None = None
        tpot: float | None = None
        status: int | None = None
        backend: str | None = None

        def ended(outcome: str, error: str | None = None) -> RequestResult:
            return RequestResult(
                kind=kind,
                model=model,
                route=self._routes[model],
                started=started,
                duration_s=time.monotonic() - began,
                ttft_s=ttft,
                status=status,
                outcome=outcome,  # type: ignore[arg-type]
                error=error,
                backend=backend,
                tpot_s=tpot,
            )

        try:
            # A whole request, bounded: the SDK's timeout bounds each read, not the sum.
            async with asyncio.timeout(spec.request_timeout_s):
                if kind == "embed":
                    raw_embedding = await client.embeddings.with_raw_response.create(
                        model=model, input=EMBED_INPUT
                    )
                    status, backend = raw_embedding.status_code, _backend(raw_embedding.headers)
                    embedding = raw_embedding.parse()
                    if not embedding.data or not embedding.data[0].embedding:
                        return ended("lost", "an embedding answer without an embedding")
                    return ended("ok")
                if kind == "chat":
                    raw_chat = await client.chat.completions.with_raw_response.create(
                        model=model,
                        messages=MESSAGES,
                        max_tokens=spec.max_tokens,
                    )
                    status, backend = raw_chat.status_code, _backend(raw_chat.headers)
                    completion = raw_chat.parse()
                    if not completion.choices or completion.choices[0].finish_reason is None:
                        return ended("lost", "an answer without a finish_reason")
                    return ended("ok")
                raw_stream = await client.chat.completions.with_raw_response.create(
                    model=model,
                    messages=MESSAGES,
                    max_tokens=spec.max_tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                status, backend = raw_stream.status_code, _backend(raw_stream.headers)
                finish: str | None = None
                usage = False
                tokens = 0
                async for chunk in raw_stream.parse():
                    # The first event with a choice, as the gateway's vgate_ttft_seconds
                    # times it (what the SLO's rules read): a tiny model's first tokens may
                    # decode to no text at all.
                    if ttft is None and chunk.choices:
                        ttft = time.monotonic() - began
                    for choice in chunk.choices:
                        finish = choice.finish_reason or finish
                    if chunk.usage is not None:
                        usage, tokens = True, chunk.usage.completion_tokens
                if ttft is not None and tokens > 1:
                    tpot = (time.monotonic() - began - ttft) / (tokens - 1)
                if finish is None:
                    return ended("lost", "a stream that ended without a finish_reason")
                if not usage:
                    return ended("lost", "a stream that ended without its usage")
                return ended("ok")
        except openai.APIStatusError as error:
            status = error.status_code
            backend = _backend(error.response.headers)
            if _is_openai_error(error.body):
                return ended("error", _code(error.body) or f"http_{status}")
            return ended("lost", f"HTTP {status} without an OpenAI error body")
        except openai.APITimeoutError:
            return ended("lost", "timeout: no answer in time")
        except TimeoutError:
            return ended("lost", f"timeout: not whole after {spec.request_timeout_s:g}s")
        except openai.APIConnectionError as error:
            return ended("lost", f"connection: {_cause(error)}")
        except openai.APIError as error:  # an error event in a stream after its start
            if _is_openai_error(error.body):
                status = None  # the answer broke after it began: a failure, not a refusal
                return ended("error", _code(error.body) or "stream_error")
            return ended("lost", f"stream: {error.message}")


def _backend(headers: Mapping[str, str]) -> str | None:
    return headers.get("x-vgate-backend")


def _is_openai_error(body: object) -> bool:
    return isinstance(body, Mapping) and isinstance(body.get("message"), str)


def _code(body: object) -> str | None:
    if not isinstance(body, Mapping):
        return None
    code = body.get("code") or body.get("type")
    return str(code) if code else None


def _cause(error: BaseException) -> str:
    cause = error.__cause__ or error.__context__
    return type(cause).__name__ if cause is not None else str(error)
