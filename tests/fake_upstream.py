"""FakeUpstream: an HTTP server that misbehaves on purpose, for failures the sim cannot act.

It is a fake (a raw asyncio socket server, not vLLM) because nothing real breaks on
command in these exact ways: garbage bodies, resets, hangs, streams cut mid-way.
It runs its own event loop in a thread so sync and async tests can both use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def content_event(text: str, finish: str | None = None) -> bytes:
    return _event(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "fake",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
        }
    )


def role_event() -> bytes:
    """The first chunk of a chat stream, as vLLM sends it: the role, no text."""
    return _event(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "fake",
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            ],
        }
    )


def usage_event(prompt: int, completion: int) -> bytes:
    return _event(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "fake",
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    )


@dataclass
class FakeUpstream:
    mode: str
    status: int = 500
    body: bytes = b'{"error": {"message": "boom", "type": "server_error", "code": 500}}'
    retry_after: str | None = "7"
    requests: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    # Stream modes that end on their own terms (`stream_end_early`, `stream_error_mid`):
    # the content pieces sent first, after a role chunk, in one write, one per event...
    texts: tuple[str, ...] = ("Hello", " world")
    # ...and pieces sent later, in the same write as the stream's ending.
    late_texts: tuple[str, ...] = ()
    # `stream_error_mid` sends its ending only after `release()` (or `proceed_wait_s`): a
    # test releases it once its client holds the first content, so that the error cannot
    # arrive with the first events (that would be a first-event error, an HTTP error).
    proceed_wait_s: float = 10.0
    # Every answer but /health's waits this long first: a backend that fails slowly.
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._proceed = asyncio.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def release(self) -> None:
        """Let held streams (`stream_error_mid`) go on to their ending, now and later."""
        self._loop.call_soon_threadsafe(self._proceed.set)

    def hold(self) -> None:
        """Hold the next streams again until `release()`."""
        self._loop.call_soon_threadsafe(self._proceed.clear)

    def _first_content(self) -> bytes:
        return role_event() + b"".join(content_event(text) for text in self.texts)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(
                    {"method": method, "path": path, "headers": headers, "body": body}
                )
                if path == "/health":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                if not await self._respond(writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _respond(self, writer: asyncio.StreamWriter) -> bool:
        """Act out `mode`; False when the connection must be dropped."""
        mode = self.mode
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if mode == "reset":
            return False
        if mode == "hang":
            await asyncio.Event().wait()
        if mode == "garbage":
            body = b"<html>definitely not json</html>"
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            return True
        if mode == "status":
            retry_after = f"retry-after: {self.retry_after}\r\n" if self.retry_after else ""
            writer.write(
                f"HTTP/1.1 {self.status} X\r\ncontent-type: application/json\r\n".encode()
                + retry_after.encode()
                + f"content-length: {len(self.body)}\r\n\r\n".encode()
                + self.body
            )
            await writer.drain()
            return True
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        if mode == "stream_cut":
            # Two tokens, then the connection dies in the middle of the chunked body.
            writer.write(_chunk(content_event("Hello") + content_event(" world")))
            await writer.drain()
            writer.write(b'40\r\ndata: {"partial')
            await writer.drain()
            return False
        if mode == "stream_oversized":
            # A first event, then one that never ends: more than the gateway will hold.
            writer.write(_chunk(content_event("Hello")))
            writer.write(_chunk(b"data: " + b"x" * (1024 * 1024 + 10)))
            await writer.drain()
            await asyncio.Event().wait()
        if mode == "stream_stall":
            writer.write(_chunk(content_event("Hello")))
            await writer.drain()
            await asyncio.Event().wait()
        if mode == "stream_no_done":
            writer.write(_chunk(content_event("Hello")))
            writer.write(_chunk(content_event(" world", finish="stop") + usage_event(3, 2)))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if mode == "stream_error_first":
            error = {
                "error": {
                    "message": "This model's maximum context length is 16 tokens",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                }
            }
            writer.write(_chunk(_event(error) + b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
            return True
        if mode == "stream_split_events":
            # One event per byte: the gateway must reassemble whole events.
            for event in (
                content_event("Hel"),
                content_event("lo", finish="stop"),
                usage_event(3, 2),
                b"data: [DONE]\n\n",
            ):
                for index in range(len(event)):
                    writer.write(_chunk(event[index : index + 1]))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if mode == "stream_end_early":
            # Content, then a clean end of the chunked body (the terminating 0-chunk, the
            # connection kept alive): no finish_reason, no [DONE] (Portkey #1797).
            writer.write(_chunk(self._first_content()))
            await writer.drain()
            late = b"".join(content_event(text) for text in self.late_texts)
            writer.write((_chunk(late) if late else b"") + b"0\r\n\r\n")
            await writer.drain()
            return True
        if mode == "stream_error_mid":
            # Content, then (once the test says the client has it) an error event, and
            # [DONE] after it, as vLLM ends a stream that failed while generating.
            writer.write(_chunk(self._first_content()))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proceed.wait(), self.proceed_wait_s)
            error = {
                "error": {
                    "message": "CUDA error: an illegal memory access was encountered",
                    "type": "InternalServerError",
                    "param": None,
                    "code": 500,
                }
            }
            late = b"".join(content_event(text) for text in self.late_texts)
            writer.write(_chunk(late + _event(error) + b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
            return True
        raise ValueError(f"unknown FakeUpstream mode {mode!r}")


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    """One request off the connection: its path, headers (names lower-cased) and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    _, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return path, headers, body


def chat_answer(request_body: bytes, text: str) -> bytes:
    """A whole HTTP answer to a chat request saying `text`: an event stream when the request
    asked for one (as the gateway does to assemble a non-streaming answer), else JSON."""
    if orjson.loads(request_body).get("stream"):
        events = (
            role_event()
            + content_event(text, finish="stop")
            + usage_event(3, 1)
            + b"data: [DONE]\n\n"
        )
        return (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + _chunk(events) + b"0\r\n\r\n"
        )
    body = orjson.dumps(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": "fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )


Script = Callable[["ScriptedUpstream", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ScriptedUpstream:
    """A raw socket upstream that runs `script` on each connection it accepts, on an event
    loop in a thread of its own: for misbehaviour across a connection's requests (interim
    answers, bytes sent to an idle connection, endless heads) that FakeUpstream's
    request-by-request modes cannot act. `state` is the scripts' to share (their loop's)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.state: dict[str, Any] = {}
        self._released: dict[str, asyncio.Event] = {}
        self._told: dict[str, threading.Event] = {}
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        self._ready.set()
        self._loop.run_forever()

    # A script and its test in step: the test releases a script waiting at a point, a
    # script tells the test it has passed one. Each wait is bounded and consumes the signal.

    def release(self, name: str) -> None:
        """From the test: let a script waiting in `released(name)` go on."""
        self._loop.call_soon_threadsafe(self._released_event(name).set)

    async def released(self, name: str, timeout_s: float = 30.0) -> None:
        event = self._released_event(name)
        await asyncio.wait_for(event.wait(), timeout_s)
        event.clear()

    def tell(self, name: str) -> None:
        """From a script: wake the test waiting in `heard(name)`."""
        self._told_event(name).set()

    def heard(self, name: str, timeout_s: float = 30.0) -> bool:
        event = self._told_event(name)
        told = event.wait(timeout_s)
        event.clear()
        return told

    def _released_event(self, name: str) -> asyncio.Event:
        return self._released.setdefault(name, asyncio.Event())

    def _told_event(self, name: str) -> threading.Event:
        return self._told.setdefault(name, threading.Event())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(self, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the gateway hung up, as it must on much of what these scripts send
        finally:
            writer.close()

    def stop(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
