"""A shared stream relayed through Redis: followers in other processes read it as it comes.

Where the cache is shared (Redis) and identical requests coalesce, the process holding a
key's lease and streaming its answer appends the stream's events to the key's flight
stream (a Redis Stream on the entry's slot, `policies.cache_redis.flight_name`) as they
pass (`Relay`), and ends it with a marker: `end` (with the usage) or `abort` (with the
error the leader's own readers got). A streaming follower in another process reads it from
the start, then blocks for the rest (`follow`, `RemoteStream`): the stream becomes its
process's flight, which that process's own followers share in process (coalesce.py).

- Only when watched: a streaming follower's lookup that finds a streaming holder marks the
  key's flight as watched (in the same script); the leader checks for the mark at its
  first events, then after 50 ms, backing off to every 500 ms, and relays nothing until it
  is there (then everything so far at once). Most streams have no follower elsewhere: an
  append per upstream read would cost every one of them (bench/relay.py).
- One append in flight per relay: what arrives meanwhile goes in the next, so a watched
  stream costs at most one XADD per upstream read, fewer when Redis is slower than the
  upstream, and the appends of a loop turn share one write on the pipelined client.
- Bounded: the relay stops at `cache.max_entry_bytes` (an `abort` marker: a reader part
  way through ends with an error event, one yet to start makes its own call), its key
  lives the lease's time while the stream runs and `END_TTL_S` after its marker, and a
  process reads at most `SharedStore.stream_readers` streams at once (past that, a
  follower waits for the whole answer, as a non-streaming one does). Not trimmed by
  MAXLEN: a follower that comes late reads it from the start.
- Never a hang, never a storm: a follower gives up on a stream that is silent for the
  route's `idle_s` (and a second) or runs past its `total_s`; one whose leader fails or
  dies before the first event (the lease ends without an entry) makes its own call, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from gateway.errors import StreamInterrupted
from gateway.router.caching import Source
from policies.cache import CacheUnavailable, Entry, SharedStore

if TYPE_CHECKING:
    from gateway.router.route import Route
    from gateway.router.streams import Finish

logger = logging.getLogger("vgate.cache")

HEADER = "h"  # the first entry's: {"o": the leader's stream_options, "b": its backend}
EVENTS = "e"  # whole SSE events, as the leader's readers got them
END = "end"  # the stream ran to its end: its usage (JSON)
ABORT = "abort"  # it did not: {"message", "code"} of the error its readers got
END_TTL_S = 5.0  # how long a stream outlives its marker: for followers still reading it
MAX_RELAYS = 1024  # streams one process relays at once; past it, followers wait for the whole
# How often a leader checks whether a follower in another process watches its stream: at
# its first events, then after 50 ms, doubling to every 500 ms.
WATCH_FIRST_S = 0.05
WATCH_MAX_S = 0.5


class Relay:
    """A leading flight's stream, appended to its key's flight stream as it passes."""

    __slots__ = (
        "_ended",
        "_head",
        "_key",
        "_last",
        "_max_bytes",
        "_pending",
        "_size",
        "_store",
        "_ttl_s",
        "_wake",
        "appends",
        "checks",
        "failed",
        "task",
        "watched",
    )

    def __init__(
        self,
        store: SharedStore,
        key: str,
        header: dict[str, Any],
        *,
        max_bytes: int,
        ttl_s: float,
    ) -> None:
        self._store = store
        self._key = key
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._head: bytes | None = orjson.dumps(header)
        self._pending: list[bytes] = []
        self._size = 0
        self._last: tuple[str, bytes] | None = None  # the marker, once the stream ended
        self._wake = asyncio.Event()
        self._ended = asyncio.Event()
        self.appends = 0
        self.checks = 0  # whether watched, asked of Redis
        self.watched = False  # a follower in another process reads it: it runs to its end
        self.failed = False
        self.task = asyncio.get_running_loop().create_task(self._run())

    def send(self, events: bytes) -> None:
        """Relay `events` (never waits: they go with the next append)."""
        if self._last is not None:
            return
        self._size += len(events)
        if self._size > self._max_bytes:
            self._pending.clear()
            self._last = _abort(
                f"The shared stream outgrew {self._max_bytes} bytes (cache.max_entry_bytes) "
                "and was no longer relayed to other gateway processes.",
                "coalesced_stream_too_large",
            )
        else:
            self._pending.append(events)
        self._wake.set()

    def finish(self, error: StreamInterrupted | None, usage: dict[str, Any] | None) -> None:
        """The stream ended: whole (`error` None), or broken with `error`."""
        if self._last is None:
            if error is None:
                self._last = (END, orjson.dumps(usage))
            else:
                self._last = _abort(error.message, error.code or "upstream_stream_broken")
        self._ended.set()
        self._wake.set()

    async def _run(self) -> None:
        store, key = self._store, self._key
        # Relayed only once watched: most streams have no follower in another process,
        # and then cost a check now and then (backing off), not an append per read.
        await self._wake.wait()  # the stream's first events
        interval = WATCH_FIRST_S
        while True:
            self.checks += 1
            try:
                if await store.watched(key):
                    self.watched = True
                    break
            except CacheUnavailable:
                self.failed = True
                return
            if self._last is not None:
                return  # ended unwatched: a follower that came since finds the entry
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), interval)
            interval = min(interval * 2, WATCH_MAX_S)
        while True:
            await self._wake.wait()
            self._wake.clear()
            fields: list[tuple[str, bytes]] = []
            first = self._head is not None
            if self._head is not None:
                fields.append((HEADER, self._head))
                self._head = None
            if self._pending:
                fields.append((EVENTS, b"".join(self._pending)))
                self._pending = []
            last = self._last
            if last is not None:
                fields.append(last)
            ended = last is not None
            try:
                ttl_s = END_TTL_S if ended else self._ttl_s
                await store.append(key, fields, ttl_s, first=first, last=ended)
            except CacheUnavailable:
                # Its followers give up after the route's idle_s; this stream goes on.
                self.failed = True
                return
            self.appends += 1
            if last is not None:
                return


def _abort(message: str, code: str) -> tuple[str, bytes]:
    return ABORT, orjson.dumps({"message": message, "code": code})


class _Wait:
    """`follow`'s answer where the stream cannot be read (not this client's kind of events,
    its start gone): wait for the whole answer instead."""


WAIT = _Wait()


class RemoteStream:
    """Another process's stream as read from its flight stream: the leader of this
    process's flight reads it (coalesce.pump), as it would an upstream's."""

    __slots__ = (
        "_aborted",
        "_closed",
        "_cursor",
        "_deadline",
        "_ended",
        "_idle_s",
        "_key",
        "_store",
        "backend",
        "body",
        "dropped_events",
        "finish",
        "first",
        "route",
        "usage",
    )

    def __init__(
        self, store: SharedStore, key: str, route: Route, *, deadline: float, idle_s: float
    ) -> None:
        self._store = store
        self._key = key
        self.route = route
        self._deadline = deadline  # loop time
        self._idle_s = idle_s
        self._cursor = "0"
        self._ended = False
        self._aborted: StreamInterrupted | None = None
        self._closed = False
        self.backend = Source("cache")  # the leader's, from the stream's header
        self.first = b""
        self.body: bytes | None = None  # the whole answer, once it ended (the leader's entry)
        self.usage: dict[str, Any] | None = None
        self.dropped_events = 0
        self.finish: Finish | None = None

    async def open(self, stream_options: object) -> bool | Entry | _Wait | None:
        """Wait for the stream's first events: True once they are in `first`; the entry
        where the leader kept its answer without relaying it (or before this read it);
        `WAIT` where its events are not for this client; None where the leader failed
        before its first event, or its lease ended without an answer (it died), or the
        wait ran out: then the follower makes its own call."""
        store, loop = self._store, asyncio.get_running_loop()
        while True:
            remaining = self._deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                entries = await store.read_flight(self._key, "0", min(store.block_s, remaining))
                if not entries:  # nothing yet: is the leader still at it?
                    entry, leased = await store.leader_state(self._key)
                    if entry is not None:
                        return entry
                    if not leased:
                        return None
                    continue
            except CacheUnavailable:
                return None
            head = entries[0][1].get(HEADER)
            if head is None:
                return WAIT  # expired and started anew: its start is gone
            header = orjson.loads(head)
            if header.get("o") != stream_options:
                return WAIT
            self.backend = Source(str(header.get("b") or "cache"))
            self.first = self._take(entries)
            if self._aborted is not None and not self.first:
                return None  # failed before its first event: never sent to anyone
            return True

    def _take(self, entries: list[tuple[str, dict[str, bytes]]]) -> bytes:
        chunks = []
        for entry_id, fields in entries:
            self._cursor = entry_id
            events = fields.get(EVENTS)
            if events:
                chunks.append(events)
            if END in fields:
                self._ended = True
                usage = orjson.loads(fields[END])
                self.usage = usage if isinstance(usage, dict) else None
                break
            if ABORT in fields:
                error = orjson.loads(fields[ABORT])
                self._aborted = StreamInterrupted(
                    str(error.get("message")), code=str(error.get("code"))
                )
                break
        return b"".join(chunks)

    async def rest(self) -> AsyncIterator[bytes]:
        store, loop = self._store, asyncio.get_running_loop()
        heard = loop.time()
        while not self._ended:
            if self._aborted is not None:
                raise self._aborted
            now = loop.time()
            silent = now - heard > self._idle_s + 1.0
            if silent or now >= self._deadline:
                why = "sent nothing" if silent else "ran past the request's total time"
                raise StreamInterrupted(
                    f"The gateway process leading this shared stream {why}; "
                    "the stream was cut off.",
                    code="coalesced_leader_lost",
                )
            wait = min(store.block_s, self._deadline - now)
            try:
                entries = await store.read_flight(self._key, self._cursor, wait)
            except CacheUnavailable:
                raise StreamInterrupted(
                    "Redis stopped answering while this shared stream was read from it; "
                    "the stream was cut off.",
                    code="coalesced_relay_lost",
                ) from None
            if not entries:
                continue
            heard = loop.time()
            events = self._take(entries)
            if events:
                yield events
        if self._aborted is not None:
            raise self._aborted
        # The whole answer too, for this process's followers that want it whole (kept by
        # the leader as its stream ended: in one call with its lease's release).
        wait = max(0.0, min(self._deadline - loop.time(), store.block_s))
        entry = await store.await_entry(self._key, wait)
        self.body = None if entry is None else entry.body

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._store.stream_readers.release()
        finish, self.finish = self.finish, None
        if finish is not None:
            finish(self)  # type: ignore[arg-type]


async def follow(
    store: SharedStore,
    key: str,
    route: Route,
    *,
    stream_options: object,
    within_s: float,
) -> RemoteStream | Entry | None:
    """A streaming follower's share of another process's stream of `key`: the stream as
    it comes (`RemoteStream`), or the whole answer (its entry), or None where this
    process is to make its own call (see `RemoteStream.open`)."""
    if store.stream_readers.locked():
        return await store.await_entry(key, within_s)
    await store.stream_readers.acquire()
    deadline = asyncio.get_running_loop().time() + within_s
    reader = RemoteStream(store, key, route, deadline=deadline, idle_s=route.timeouts.idle_s)
    try:
        opened = await reader.open(stream_options)
    except BaseException:
        reader.close()
        raise
    if opened is True:
        return reader
    reader.close()
    if isinstance(opened, _Wait):
        return await store.await_entry(key, max(0.0, deadline - asyncio.get_running_loop().time()))
    if opened is False:
        return None
    return opened
