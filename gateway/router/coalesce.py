"""Single flight: identical cacheable requests in flight at once share one upstream call.

The first request of a key (the leader) makes the call in a task of its own, so that its
client leaving does not cancel it while others (followers) still wait on it; with nobody
left waiting, the call is cancelled. A follower gets what the leader got:

- a whole answer (the leader's non-streaming answer, or its stream once finished and
  assembled), as JSON or, for a streaming follower, as the events a cache hit sends;
- or, where the leader streams, the events so far and then the rest as they come
  (`FlightStream`), each reader at its own pace: the upstream is read as fast as it sends
  (the `pump`), every event kept in the flight's log; a reader that falls more than
  `lag_bytes` behind is cut off with an error event, and once the log outgrows
  `lag_bytes` no new follower joins and what every reader has taken is dropped.

A leader that fails before it has an answer leaves its followers to make their own call,
once, without joining another flight: never a storm of retries on one failure.

Across processes (a shared store), a flight's leader is the process holding the key's
lease; a streaming leader relays its events through Redis (`Flight.relay`, see
gateway/router/relay.py), and another process's flight reads them as its upstream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gateway.errors import StreamInterrupted

logger = logging.getLogger("vgate.cache")

if TYPE_CHECKING:
    from typing import TypeAlias

    from gateway.router.backend import Backend
    from gateway.router.caching import Source
    from gateway.router.relay import Relay, RemoteStream
    from gateway.router.route import Route
    from gateway.router.streams import Finish, ResumableStream, UpstreamStream

    Upstream: TypeAlias = UpstreamStream | ResumableStream | RemoteStream


class Flight:
    """One upstream call that identical requests share."""

    __slots__ = (
        "_wake",
        "backend",
        "base",
        "body",
        "done",
        "error",
        "events",
        "joinable",
        "lag_bytes",
        "opened",
        "readers",
        "relay",
        "size",
        "stream_options",
        "streaming",
        "task",
        "upstream",
        "waiting",
    )

    def __init__(self, *, streaming: bool, lag_bytes: int) -> None:
        self.streaming = streaming  # the leader streams: its events are logged
        self.stream_options: object = None  # a streaming leader's (what its events carry)
        self.lag_bytes = lag_bytes
        self.task: asyncio.Task[Any] | None = None
        self.upstream: Upstream | None = None  # a streaming leader's stream, once opened
        self.opened = False  # a streaming leader's first event has arrived
        self.done = False  # the call has ended: answered, failed or cancelled
        self.body: bytes | None = None  # the whole answer, where there is one to share
        self.backend: str | None = None  # the backend that answered
        self.error: StreamInterrupted | None = None  # how a logged stream ended, if broken
        self.events: list[bytes] = []  # the log: events from `base` on
        self.base = 0  # the index of events[0] in the whole stream
        self.size = 0  # bytes logged in all
        self.readers: set[FlightStream] = set()
        self.waiting = 0  # followers waiting for the outcome (besides the readers)
        self.joinable = True
        # Where this process holds the key's lease through Redis and streams: the events
        # relayed to followers in other processes (gateway/router/relay.py).
        self.relay: Relay | None = None
        self._wake = asyncio.Event()

    def notify(self) -> None:
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    async def changed(self) -> None:
        await self._wake.wait()

    async def outcome(self) -> None:
        """Wait until the call has ended (a follower of a whole answer)."""
        self.waiting += 1
        try:
            while not self.done:
                await self.changed()
        finally:
            self.waiting -= 1

    async def wait_opened(self) -> bool:
        """Wait until a streaming leader's stream opened (True) or it failed (False)."""
        self.waiting += 1
        try:
            while not self.opened and not self.done:
                await self.changed()
        finally:
            self.waiting -= 1
        return self.opened

    def wanted(self) -> bool:
        """Whether anyone still wants the call: a reader or a follower in this process, or
        one in another reading its relayed stream."""
        relayed = self.relay is not None and self.relay.watched
        return bool(self.readers) or self.waiting > 0 or relayed

    def end(self) -> None:
        self.done = True
        relay, self.relay = self.relay, None
        if relay is not None:
            upstream = self.upstream
            relay.finish(self.error, None if upstream is None else upstream.usage)
        self.notify()

    def log(self, events: bytes) -> None:
        if self.relay is not None:
            self.relay.send(events)
        self.events.append(events)
        self.size += len(events)
        if self.size > self.lag_bytes:
            self.joinable = False
            self._trim()
        self.notify()

    def _trim(self) -> None:
        """Drop what every reader has taken (nobody new will ask for it). A reader busy
        elsewhere (sending to its client) more than `lag_bytes` behind is cut off, and holds
        nothing back; one waiting for events is never behind: it takes them all at once."""
        held = []
        for reader in self.readers:
            if not reader.waiting and self.size - reader.taken > self.lag_bytes:
                reader.cut = True
            if not reader.cut:
                held.append(reader.cursor)
        taken = min(held, default=self.base + len(self.events))
        if taken > self.base:
            del self.events[: taken - self.base]
            self.base = taken

    def leave(self, reader: FlightStream) -> None:
        self.readers.discard(reader)
        if not self.wanted() and self.task is not None and not self.task.done():
            self.joinable = False
            self.task.cancel()  # nobody reads it any more: the upstream call ends


async def pump(
    flight: Flight,
    open_upstream: Callable[[], Awaitable[Upstream | None]],
) -> None:
    """A streaming leader's call: open the stream, then log its events to its end. Closing
    the stream settles the leader's outcome and keeps the answer in the cache if whole."""
    try:
        upstream = await open_upstream()
    except BaseException:
        flight.end()
        raise
    if upstream is None:  # answered whole elsewhere (another process): in the flight's body
        flight.end()
        return
    flight.upstream = upstream
    flight.backend = upstream.backend.name
    flight.opened = True
    try:
        flight.log(upstream.first)
        async for events in upstream.rest():
            flight.log(events)
    except StreamInterrupted as interrupted:
        flight.error = interrupted
    except Exception:  # a fault of the gateway's own: never a clean-looking end
        logger.exception("a shared upstream stream failed")
        flight.error = StreamInterrupted(
            "The shared upstream stream failed in the gateway.", code="upstream_stream_broken"
        )
    except asyncio.CancelledError:
        flight.joinable = False
        flight.error = StreamInterrupted(
            "The shared upstream stream was cancelled.", code="upstream_cancelled"
        )
        raise
    finally:
        upstream.close()
        flight.end()


class FlightStream:
    """One client's view of a flight's stream: the events so far at once, then the rest."""

    __slots__ = (
        "_flight",
        "backend",
        "cursor",
        "cut",
        "finish",
        "first",
        "route",
        "taken",
        "waiting",
    )

    def __init__(self, flight: Flight, route: Route, backend: Backend | Source) -> None:
        self._flight = flight
        self.route = route
        self.backend = backend
        flight.readers.add(self)
        self.first = b"".join(flight.events)
        self.cursor = flight.base + len(flight.events)
        self.taken = flight.size  # bytes of the stream this reader has had
        self.waiting = False  # parked until the next events: it has had every one so far
        self.cut = False  # fell too far behind (Flight._trim)
        self.finish: Finish | None = None

    @property
    def usage(self) -> dict[str, Any] | None:
        upstream = self._flight.upstream
        return None if upstream is None else upstream.usage

    @property
    def dropped_events(self) -> int:
        upstream = self._flight.upstream
        return 0 if upstream is None else upstream.dropped_events

    async def rest(self) -> AsyncIterator[bytes]:
        flight = self._flight
        woken = False  # what arrived while it waited is taken at once, however much
        while True:
            pending = self.cursor < flight.base + len(flight.events)
            behind = pending and not woken and flight.size - self.taken > flight.lag_bytes
            if self.cut or behind:
                raise StreamInterrupted(
                    f"This client fell more than {flight.lag_bytes} bytes behind the "
                    "shared upstream stream it was reading (cache.max_entry_bytes); "
                    "the stream was cut off.",
                    code="coalesced_reader_too_slow",
                )
            if pending:
                events = flight.events[self.cursor - flight.base :]
                self.cursor += len(events)
                self.taken = flight.size
                woken = False
                yield b"".join(events)
                continue
            if flight.done:
                if flight.error is not None:
                    raise StreamInterrupted(flight.error.message, code=flight.error.code)
                return
            self.waiting = True
            try:
                await flight.changed()
            finally:
                self.waiting = False
            woken = True

    def close(self) -> None:
        self._flight.leave(self)
        finish, self.finish = self.finish, None
        if finish is not None:
            finish(self)
