"""A scripted adapter: upstreams played from a script, for tests and chaos drills.

The analogue of httpx's `MockTransport`, at the router's seam. Each request an adapter
receives takes the next reply of its script (or the result of a callable reply, given the
request), and is recorded so a test can see what was sent:

    fake = FakeAdapter("w1", Refuse(503, retry_after="2"), Events(chat_events("Hi")))
    ...
    assert [r.body["model"] for r in fake.requests] == ["tiny", "tiny"]

A reply is a JSON answer (`Json`), a refusal (`Refuse`), an event stream (`Events`, whose
items may `Pause` on an event the test sets, `Hang` or `Break`), a connection that cannot
be made (`CannotConnect`) or an upstream that never answers (`Hang`). Nothing here sleeps:
what waits, waits on the test's own events or until the router under test gives up.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeAlias

import orjson

from gateway.config import BackendConfig, Timeouts, UpstreamConfig
from gateway.errors import UpstreamBroken, UpstreamConnectError
from gateway.wire.sse import DONE_EVENT
from providers.base import RequestContext
from providers.http1 import ByteBudget

DONE = DONE_EVENT  # the stream's last event, as scripts write it


@dataclass(frozen=True, slots=True)
class FakeRequest:
    """One request as the upstream received it."""

    path: str
    body: Any  # the JSON body, parsed
    request_id: str
    traceparent: bytes | None


@dataclass(frozen=True, slots=True)
class Json:
    """A 200 with a whole body: a dict is sent as JSON, bytes as they are."""

    body: dict[str, Any] | bytes
    content_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class Refuse:
    """A status other than 200, with an error body and maybe a Retry-After."""

    status: int
    body: dict[str, Any] | bytes | None = None  # None: OpenAI's shape, saying the status
    retry_after: str | None = None


@dataclass(frozen=True, slots=True)
class Pause:
    """In a stream: nothing more until the test sets `until`."""

    until: asyncio.Event


@dataclass(frozen=True, slots=True)
class Hang:
    """Nothing more, ever: as a reply, no answer at all; in a stream, no further event.
    Ends only when the router under test gives up (its timeouts cancel the wait)."""


@dataclass(frozen=True, slots=True)
class Break:
    """In a stream: the connection fails here (`UpstreamBroken`)."""

    reason: str = "connection reset by peer"


# One read of a stream: a dict is one SSE data event, bytes are sent as they are (part of
# an event, several events, `DONE`).
StreamItem: TypeAlias = dict[str, Any] | bytes | Pause | Hang | Break


@dataclass(frozen=True, slots=True)
class Events:
    """A 200 event stream, one read per item; `at_once`: the whole body in one read, as
    the lean client's `pump` (providers.http1) gives an answer that arrived whole."""

    items: Sequence[StreamItem]
    content_type: str = "text/event-stream"
    at_once: bool = False


@dataclass(frozen=True, slots=True)
class CannotConnect:
    """No connection: refused, or not accepted in time (`UpstreamConnectError`)."""

    timed_out: bool = False


Scripted: TypeAlias = Json | Refuse | Events | CannotConnect | Hang
Reply: TypeAlias = Scripted | Callable[[FakeRequest], Scripted]


class ScriptExhausted(AssertionError):
    """A fake adapter got a request its script has no reply for: the test did not expect it."""


class FakeResponse:
    """What `FakeAdapter.post` returns: an `UpstreamResponse` playing one scripted reply."""

    def __init__(self, reply: Json | Refuse | Events) -> None:
        self.reply = reply
        self.closed = False
        self.retry_after: str | None = None
        if isinstance(reply, Refuse):
            self.status = reply.status
            self.content_type = "application/json"
            self.retry_after = reply.retry_after
        else:
            self.status = 200
            self.content_type = reply.content_type

    async def read(self, limit: int) -> bytes:
        body = b"".join([chunk async for chunk in self.chunks()])
        if len(body) > limit:
            raise UpstreamBroken(f"the body exceeds {limit} bytes")
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        reply = self.reply
        if isinstance(reply, Refuse):
            yield _body(reply.body, reply.status)
            return
        if isinstance(reply, Json):
            yield _body(reply.body, 200)
            return
        for item in reply.items:
            if isinstance(item, Pause):
                await item.until.wait()
            elif isinstance(item, Hang):
                await _forever()
            elif isinstance(item, Break):
                raise UpstreamBroken(item.reason)
            elif isinstance(item, bytes):
                yield item
            else:
                yield b"data: " + orjson.dumps(item) + b"\n\n"

    def close(self) -> None:
        self.closed = True


class WholeBodyResponse(FakeResponse):
    """An `Events` reply `at_once`: `pump` hands the sink every item's bytes in one read
    and reports the body ended; after that the response, closed, gives nothing more."""

    def __init__(self, reply: Events) -> None:
        super().__init__(reply)
        self.reads = 0  # calls of `pump` that handed the sink something

    async def pump(self, sink: Callable[[bytes], bool]) -> bool:
        if not self.reads:
            self.reads += 1
            sink(b"".join([chunk async for chunk in super().chunks()]))
        return True

    async def chunks(self) -> AsyncIterator[bytes]:
        if not self.reads:
            async for chunk in super().chunks():
                yield chunk


class FakeAdapter:
    """An `Adapter` answering from a script; `then` answers once the script has run out
    (without it, a request beyond the script raises `ScriptExhausted`)."""

    def __init__(self, name: str, *script: Reply, then: Reply | None = None) -> None:
        self.name = name
        self.then = then
        self.healthy = True  # what `health()` reports
        self.metrics_text: bytes | None = None  # what `metrics()` returns
        self.started = False
        self.closed = False
        self.requests: list[FakeRequest] = []
        self.responses: list[FakeResponse] = []
        self._script: deque[Reply] = deque(script)

    def add(self, *replies: Reply) -> None:
        """Append replies to the script."""
        self._script.extend(replies)

    @property
    def pending(self) -> int:
        """Replies of the script not yet taken."""
        return len(self._script)

    async def start(self) -> None:
        self.started = True

    async def aclose(self) -> None:
        self.closed = True

    async def post(self, path: str, body: bytes, context: RequestContext) -> FakeResponse:
        request = FakeRequest(path, orjson.loads(body), context.request_id, context.traceparent)
        self.requests.append(request)
        reply = self._next(request)
        if isinstance(reply, CannotConnect):
            raise UpstreamConnectError(
                "timed out" if reply.timed_out else "connection refused",
                timed_out=reply.timed_out,
            )
        if isinstance(reply, Hang):
            await _forever()
        response = (
            WholeBodyResponse(reply)
            if isinstance(reply, Events) and reply.at_once
            else FakeResponse(reply)
        )
        self.responses.append(response)
        return response

    async def health(self, timeout_s: float) -> bool:
        return self.healthy

    async def metrics(self) -> bytes | None:
        return self.metrics_text

    def _next(self, request: FakeRequest) -> Scripted:
        if self._script:
            reply = self._script.popleft()
        elif self.then is not None:
            reply = self.then
        else:
            raise ScriptExhausted(
                f"FakeAdapter '{self.name}' got request {len(self.requests)} "
                f"({request.path}) but its script has no reply left"
            )
        return reply(request) if callable(reply) else reply


@dataclass
class FakeAdapters:
    """An adapter factory (`providers.AdapterFactory`) giving each backend the fake of its
    name, made on first use: build a router or a gateway with it, then script `fakes[name]`."""

    fakes: dict[str, FakeAdapter] = field(default_factory=dict)

    def __getitem__(self, name: str) -> FakeAdapter:
        fake = self.fakes.get(name)
        if fake is None:
            fake = self.fakes[name] = FakeAdapter(name)
        return fake

    def __call__(
        self,
        backend: BackendConfig,
        timeouts: Timeouts,
        upstream: UpstreamConfig,
        budget: ByteBudget,
        /,
    ) -> FakeAdapter:
        return self[backend.name]


def chat_chunk(
    text: str | None = None,
    *,
    finish: str | None = None,
    role: bool = False,
    id: str = "chatcmpl-fake",
) -> dict[str, Any]:
    """One chunk of a chat completion stream, as vLLM sends it."""
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
    if text is not None:
        delta["content"] = text
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def usage_chunk(
    prompt_tokens: int, completion_tokens: int, *, id: str = "chatcmpl-fake"
) -> dict[str, Any]:
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "fake",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chat_events(
    *pieces: str, prompt_tokens: int = 5, id: str = "chatcmpl-fake"
) -> list[StreamItem]:
    """A whole chat stream: the role chunk, one chunk per piece (the last one finishing
    with "stop"), the usage chunk and [DONE]."""
    items: list[StreamItem] = [chat_chunk(role=True, id=id)]
    for index, piece in enumerate(pieces):
        finish = "stop" if index == len(pieces) - 1 else None
        items.append(chat_chunk(piece, finish=finish, id=id))
    items += [usage_chunk(prompt_tokens, len(pieces), id=id), DONE]
    return items


def chat_completion(text: str, *, prompt_tokens: int = 5, completion_tokens: int = 1) -> Json:
    """A whole (non-streaming) chat completion."""
    return Json(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1,
            "model": "fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


def _body(body: dict[str, Any] | bytes | None, status: int) -> bytes:
    if body is None:
        body = {"error": {"message": f"fake upstream answered {status}", "code": status}}
    return body if isinstance(body, bytes) else orjson.dumps(body)


async def _forever() -> NoReturn:
    await asyncio.get_running_loop().create_future()  # set by nobody: only cancelled
    raise AssertionError("unreachable")
