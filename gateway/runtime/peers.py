"""The worker processes' private channel to each other (`server.workers` > 1).

Each worker serves a unix socket, `<run dir>/<index>.sock`: the run dir is the parent's
(`tempfile.mkdtemp`: mode 0700, removed when the parent exits) and the socket itself is made
0600, so only the server's own user reaches it; nothing on it is reachable over the network.

One request per connection: the asker writes `<kind>\\n<payload>` and closes its writing
side; the worker answers with bytes and closes. The kinds are `metrics` (the worker's own
exposition: gateway/runtime/peer_metrics.py) and `admin` (apply an admin API call already
applied by a sibling: `PeerAdmin` below). Every wait is bounded by the asker's `timeout_s`:
a sibling that is dead, restarting or stuck is reported as not answering, never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping

from gateway.edge.admin_relay import AdminCall, LocalApply, PeerAnswer

logger = logging.getLogger("vgate.workers")

METRICS = "metrics"
ADMIN = "admin"
MAX_REQUEST_BYTES = 1024 * 1024  # an admin call's body is at most some KiB
READ_TIMEOUT_S = 2.0  # a sibling's request arrives at once, in one write
ADMIN_TIMEOUT_S = 2.0  # a sibling's apply of one admin call, at most
Handler = Callable[[bytes], Awaitable[bytes]]


def socket_path(run_dir: str, index: int) -> str:
    return os.path.join(run_dir, f"{index}.sock")


async def read_to_eof(reader: asyncio.StreamReader, limit: int) -> bytes:
    """Everything up to EOF; ValueError past `limit` bytes (`read(n)` alone stops at the
    first chunk, which would cut a large answer short)."""
    parts: list[bytes] = []
    size = 0
    while chunk := await reader.read(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise ValueError(f"more than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


class PeerServer:
    """One worker's socket: each request is answered by the handler of its kind."""

    def __init__(self, run_dir: str, index: int, handlers: Mapping[str, Handler]) -> None:
        self._path = socket_path(run_dir, index)
        self._handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)  # the socket of this worker's previous life
        self._server = await asyncio.start_unix_server(self._answer, path=self._path)
        os.chmod(self._path, 0o600)  # the run dir is 0700 already: belt and braces

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                request = await read_to_eof(reader, MAX_REQUEST_BYTES)
            kind, _, payload = request.partition(b"\n")
            handler = self._handlers.get(kind.decode("ascii", "replace"))
            if handler is None:
                logger.warning("peer socket: unknown request kind %r", kind[:20])
                return
            writer.write(await handler(payload))
            await writer.drain()
        except (OSError, TimeoutError, ValueError):
            pass  # the asker gave up, or sent nonsense: it counts this worker missing
        finally:
            writer.close()


async def ask(
    run_dir: str, index: int, kind: str, payload: bytes, *, timeout_s: float, limit: int
) -> bytes | None:
    """Sibling `index`'s answer to one request, or None: no answer within `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_unix_connection(socket_path(run_dir, index))
            try:
                writer.write(kind.encode("ascii") + b"\n" + payload)
                writer.write_eof()
                answer = await read_to_eof(reader, limit)
            finally:
                writer.close()
    except (OSError, TimeoutError, ValueError):
        return None
    return answer or None  # a sibling that closed without a word did not answer


class PeerAdmin:
    """The admin API's siblings (gateway.edge.admin_relay.Siblings) over the peer sockets:
    `ask` sends a call to every sibling at once; `answer` is this worker's `admin` handler,
    applying a sibling's call with what `answer_with` was given (the admin app, unrelayed)."""

    def __init__(
        self, *, run_dir: str, index: int, workers: int, timeout_s: float = ADMIN_TIMEOUT_S
    ) -> None:
        self.workers = workers
        self._run_dir = run_dir
        self._index = index
        self._timeout_s = timeout_s
        self._apply: LocalApply | None = None

    def answer_with(self, apply: LocalApply) -> None:
        self._apply = apply

    async def ask(self, call: AdminCall) -> list[PeerAnswer]:
        siblings = [i for i in range(self.workers) if i != self._index]
        payload = call.encode()
        answers = await asyncio.gather(
            *(
                ask(
                    self._run_dir,
                    i,
                    ADMIN,
                    payload,
                    timeout_s=self._timeout_s,
                    limit=MAX_REQUEST_BYTES,
                )
                for i in siblings
            )
        )
        return [
            _answer_of(i, answer, self._timeout_s)
            for i, answer in zip(siblings, answers, strict=True)
        ]

    async def answer(self, payload: bytes) -> bytes:
        try:
            call = AdminCall.decode(payload)
        except ValueError as exc:
            logger.warning("peer socket: unreadable admin call: %s", exc)
            return b""
        if self._apply is None:  # not serving yet
            return b"503\n"
        try:
            status, body = await self._apply(call)
        except Exception:  # a bug: the sibling is told, rather than left waiting for nothing
            logger.exception("worker %d: admin %s %s failed", self._index, call.method, call.path)
            return b"500\n"
        logger.info(
            "worker %d: admin %s %s applied for a sibling: %d",
            self._index,
            call.method,
            call.path,
            status,
        )
        return b"%d\n%s" % (status, body)


def _answer_of(index: int, answer: bytes | None, timeout_s: float) -> PeerAnswer:
    if answer is None:
        return PeerAnswer(index, None, b"", f"no answer within {timeout_s:g}s")
    head, _, body = answer.partition(b"\n")
    if not head.isdigit():
        return PeerAnswer(index, None, b"", "an unreadable answer")
    return PeerAnswer(index, int(head), body, "")
