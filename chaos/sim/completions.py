"""`POST /v1/chat/completions` and `/v1/completions`: when each part of an answer goes out.

A request is parsed into a `Job` (`chaos.sim.parsing`), scheduled by the `Engine`, and shaped
by `chaos.sim.render`; this module holds the timing between them. A non-streaming reply goes
out at once when nothing needs waiting for, else after its slot and tokens; a stream gets its
headers at once and then its chunks on the token clock. A client that leaves aborts either.
"""

from __future__ import annotations

import asyncio

from chaos.sim.engine import Engine, Job
from chaos.sim.parsing import RequestParser
from chaos.sim.protocol import (
    SSE_HEADERS,
    HTTPError,
    read_json,
    send_event,
    send_json,
)
from chaos.sim.render import Renderer, chat_role_chunk, token_chunk, usage_chunk
from gateway.asgi import DisconnectWatch, Receive, Scope, Send
from gateway.wire.sse import DONE_EVENT

__all__ = ["Completions"]


class Completions:
    """The chat and completion endpoints of one worker."""

    __slots__ = ("_engine", "_parser", "_render", "_tokens_per_chunk")

    def __init__(
        self, parser: RequestParser, engine: Engine, render: Renderer, tokens_per_chunk: int
    ) -> None:
        self._parser = parser
        self._engine = engine
        self._render = render
        self._tokens_per_chunk = tokens_per_chunk

    async def handle(self, scope: Scope, receive: Receive, send: Send, chat: bool) -> None:
        job = await self.parse(scope, receive, send, chat)
        if job is not None:
            await self.respond(receive, send, job)

    async def parse(self, scope: Scope, receive: Receive, send: Send, chat: bool) -> Job | None:
        """The request's job; None when it was refused (the error is sent)."""
        try:
            return self._parser.generation(await read_json(scope, receive), chat)
        except HTTPError as exc:
            await exc.send(send)
            return None

    async def respond(self, receive: Receive, send: Send, job: Job) -> None:
        if job.stream:
            await self.stream(receive, send, job)
        elif self._engine.immediate():
            self._engine.record(job)
            await send_json(send, 200, self._render.completion(job))
        else:
            await self._delayed(receive, send, job)

    async def _delayed(self, receive: Receive, send: Send, job: Job) -> None:
        """A non-streaming reply that has to wait for a slot, the first token, or both."""
        async with DisconnectWatch(receive) as watch:
            await self._engine.run(job)
        if not watch.disconnected:
            await send_json(send, 200, self._render.completion(job))

    async def stream(self, receive: Receive, send: Send, job: Job) -> None:
        # vLLM sends the 200 and its headers at once, before the request is even scheduled:
        # a stream that is still queued looks exactly like one waiting for its first token.
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        async with DisconnectWatch(receive):
            await self._stream_events(send, job)

    async def _stream_events(self, send: Send, job: Job) -> None:
        engine = self._engine
        stats = job.stats
        head = self._render.stream_head(job)
        await engine.acquire(stats)
        finished = False
        try:
            loop = asyncio.get_running_loop()
            ttft = engine.ttft
            first_token_at = loop.time() + ttft
            if ttft:
                await asyncio.sleep(ttft)
            stats.prompt_tokens += job.prompt_tokens
            if job.chat:
                await send_event(send, chat_role_chunk(head, job))
            per_chunk = self._tokens_per_chunk
            longest = job.longest
            for begin in range(0, longest, per_chunk):
                end = min(begin + per_chunk, longest)
                if engine.tps and end > 1:
                    # Deadlines from the first token keep the rate exact however long sends take.
                    delay = first_token_at + (end - 1) / engine.tps - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if end == longest:
                    # The engine is done with the request before its last chunk goes out.
                    engine.release(stats)
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
                    await send_event(send, token_chunk(head, job, seq, text, stop))
            if job.include_usage:
                await send_event(send, usage_chunk(head, job))
            await send({"type": "http.response.body", "body": DONE_EVENT})
        except asyncio.CancelledError:
            if not finished:
                stats.finished["abort"] += 1
            raise
        finally:
            if not finished:
                engine.release(stats)
