"""The faults as the worker acts them, on its three inference endpoints.

`chaos.faults` says what a fault is and which requests it hits; this module does it. While
faults are set, the worker routes inference requests here instead of straight to their
endpoints (so a worker without faults pays nothing for them): the body is read first, then
the latency, then a picked request hangs, is reset, gets an error status, or, for a valid
stream, an error event, a cut, a stall or garbage; anything else goes on to the endpoint.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

import orjson

from chaos.faults import FaultInjector, Faults, drop_connection
from chaos.sim.completions import Completions
from chaos.sim.embeddings import Embeddings
from chaos.sim.engine import Engine, Job, ModelStats
from chaos.sim.protocol import (
    MAX_BODY_BYTES,
    SSE_HEADERS,
    HTTPError,
    error,
    error_content,
    replay,
    send_event,
    until_disconnected,
)
from gateway.asgi import DisconnectWatch, Message, Receive, Scope, Send, read_body
from gateway.errors import BodyTooLarge, ClientDisconnected
from gateway.wire.headers import retry_after
from gateway.wire.sse import DONE_EVENT

__all__ = ["FaultedEndpoints"]

_CHAT, _COMPLETIONS, _EMBEDDINGS = range(3)

# An event cut off inside its JSON, as a buggy upstream or a broken proxy might send it.
_GARBAGE_EVENT = b'data: {"id": "chatcmpl-garbled", "choices": [{"delta": {"cont\n\n'


class FaultedEndpoints:
    """The inference endpoints with the injector's faults acted on them."""

    __slots__ = ("_completions", "_default_stats", "_embeddings", "_engine", "_injector")

    def __init__(
        self,
        injector: FaultInjector,
        engine: Engine,
        completions: Completions,
        embeddings: Embeddings,
        default_model: str,
    ) -> None:
        self._injector = injector
        self._engine = engine
        self._completions = completions
        self._embeddings = embeddings
        # A hung request whose body names no served model holds a slot of the first one.
        self._default_stats = engine.stats[default_model]

    async def chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._faulted(scope, receive, send, _CHAT)

    async def completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._faulted(scope, receive, send, _COMPLETIONS)

    async def embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
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
            await error(str(exc), "BadRequestError", 413).send(send)
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
                await until_disconnected(receive)
                return
            if faults.error_status is not None and (
                kind == _EMBEDDINGS or not faults.error_event_first
            ):
                injector.faulted += 1
                await _injected_error(faults).send(send)
                return
        receive = replay(body, receive)
        if kind == _EMBEDDINGS:
            await self._embeddings.handle(scope, receive, send)
            return
        job = await self._completions.parse(scope, receive, send, kind == _CHAT)
        if job is None:
            return
        if picked and job.stream and faults.error_event_first:
            injector.faulted += 1
            await _error_event(send, job, faults)
        elif picked and not job.stream and faults.error_status is not None:
            injector.faulted += 1  # error_event_first is set: plain replies get the status
            await _injected_error(faults).send(send)
        else:
            if (
                job.stream
                and picked
                and (
                    faults.cut_after_chunks is not None
                    or faults.stall_after_chunks is not None
                    or faults.garbage_after_chunks is not None
                )
            ):
                send = self._interrupting(send, faults)
            await self._completions.respond(receive, send, job)

    async def _hang(self, body: bytes, receive: Receive) -> None:
        """Hold a slot, answering nothing, until the client leaves."""
        try:
            model = orjson.loads(body).get("model")
        except (orjson.JSONDecodeError, AttributeError):
            model = None
        stats: ModelStats | None = None
        if type(model) is str:
            stats = self._engine.stats.get(model)
        if stats is None:
            stats = self._default_stats
        async with DisconnectWatch(receive, grace_s=0):
            await self._engine.hold(stats)

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


async def _error_event(send: Send, job: Job, faults: Faults) -> None:
    """A stream that fails at once: a 200, vLLM's in-stream error event, then [DONE]."""
    status = faults.error_status or 503
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    await send_event(send, _injected_content(status))
    await send({"type": "http.response.body", "body": DONE_EVENT})
    job.stats.finished["error"] += len(job.sequences)


def _status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _injected_content(status: int) -> Any:
    # The type is the HTTP phrase, as vLLM's handler for HTTPException reports it.
    return error_content(
        f"Injected fault: the simulated worker answers {status}.",
        _status_phrase(status),
        status,
        None,
    )


def _injected_error(faults: Faults) -> HTTPError:
    status = faults.error_status or 503
    headers = []
    if faults.retry_after_s is not None:
        headers.append((b"retry-after", retry_after(faults.retry_after_s).encode()))
    return HTTPError(status, _injected_content(status), headers)
