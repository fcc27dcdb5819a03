"""The streams the router hands the edge: whole SSE events, first event already arrived.

`UpstreamStream` is one backend's stream; `ResumableStream` continues a client's stream on
another backend when its upstream breaks (`Router.resume`). Either raises
`StreamInterrupted` from `rest()` when the stream cannot be finished.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gateway.errors import StreamInterrupted, UpstreamBroken
from gateway.router.backend import Backend
from gateway.router.caching import CachedStream
from gateway.router.coalesce import FlightStream
from gateway.router.outcome import AttemptRecord, Outcome
from gateway.router.readtimer import ReadTimer
from gateway.router.route import Route
from gateway.wire.sse import DONE_EVENT, SSEObserver
from policies.resume import Diverged, Splice, Transcript
from providers import UpstreamResponse

if TYPE_CHECKING:
    from gateway.router.plan import Plan
    from gateway.router.router import Router

# What the router does when the client's stream closes: settle its outcome, free its slot.
Finish = Callable[["ClientStream"], None]
# `pump`'s writer: takes events at once, and says whether the client's writes are paused...
Write = Callable[[bytes], bool]
# ...and then waits until they may go on.
Drain = Callable[[], Awaitable[None]]
# What takes an upstream read's bytes in `pump`; true asks for a pause.
Sink = Callable[[bytes], bool]
DIVERGED = "stream_resume_diverged"


class ResumeFailed(Exception):
    """No backend could continue a broken stream (`Router.resume`)."""

    def __init__(self, mode: str, reason: str) -> None:
        super().__init__(reason)
        self.mode = mode  # what the last try was: "prefill" or "regenerate"
        self.reason = reason


class UpstreamStream:
    """An upstream event stream whose first event has arrived."""

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.observer.usage

    @property
    def dropped_events(self) -> int:
        return self.observer.malformed

    __slots__ = (
        "_chunks",
        "_closed",
        "_drained",
        "_timer",
        "backend",
        "deadline",
        "finish",
        "first",
        "idle_s",
        "observer",
        "response",
        "route",
        "tried",
    )

    def __init__(
        self,
        route: Route,
        backend: Backend,
        observer: SSEObserver,
        *,
        deadline: float,
        idle_s: float,
        tried: AttemptRecord | None = None,
    ) -> None:
        # The stream counts against its backend's in-flight limit until it is closed.
        backend.in_flight += 1
        self._closed = False
        self.route = route  # the route that answered: the one asked for, or a fallback
        self.backend = backend
        self.finish: Finish | None = None  # the router's, for the stream the client reads
        self.observer = observer
        self.deadline = deadline
        self.idle_s = idle_s
        self.response: UpstreamResponse | None = None
        self.first = b""
        self._chunks: AsyncIterator[bytes] | None = None
        self._drained = False  # the body ended in the read that held the first events
        self._timer: ReadTimer | None = None
        self.tried = tried  # its attempt's record: ended when the stream closes

    async def first_events(self) -> bytes:
        if hasattr(self.response, "pump"):
            return await self._pump_first_events()
        while True:
            events = await self._next()
            if events is None:
                raise UpstreamBroken("the stream ended before its first event")
            if events or self.observer.error is not None:
                return events

    async def rest(self) -> AsyncIterator[bytes]:
        """Events after the first, each batch as soon as it is whole; ends after [DONE].

        Raises `StreamInterrupted` when the upstream breaks, stalls past `idle_s`, runs
        past `total_s`, or ends before it finished.
        """
        observer = self.observer
        if self._chunks is None:
            assert self.response is not None
            self._chunks = self.response.chunks()
        chunks = self._chunks
        # One timer for every read: asyncio.timeout_at around each would cost more than
        # the event's own handling (gateway.router.readtimer).
        self._timer = timer = ReadTimer(self.idle_s, self.deadline)
        try:
            while not observer.done:
                timer.start()
                try:
                    # `_next`, inlined: this runs once per event.
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        events = observer.flush() or None
                    else:
                        events = observer.feed(chunk)
                except asyncio.CancelledError:
                    if not timer.expired():
                        raise
                    if observer.finished:
                        break  # the answer is whole; only its [DONE] is late
                    raise self._timed_out(timer) from None
                except UpstreamBroken as exc:
                    if observer.finished:
                        break
                    raise self._broke_off(exc) from None
                finally:
                    timer.stop()
                if events is None:  # the body ended
                    if observer.error is None:
                        if observer.finished:
                            break
                        raise self._incomplete()
                    events = b""  # its last event, unterminated, was an error
                if observer.error is not None:
                    if events:
                        yield events  # what came before the error is part of the answer
                    raise self._error_mid_stream(observer.error)
                if events:
                    yield events
        except StreamInterrupted as interrupted:
            self._cut_off(interrupted)
            raise
        finally:
            timer.close()
        if not observer.done:
            # Finished but forgot [DONE], or lost it: the answer is whole, so complete it.
            observer.done = True
            yield DONE_EVENT

    async def pump(self, write: Write, drain: Drain) -> None:
        """`rest()` for a writer that takes events at once (the edge's, under uvicorn):
        each read is split, observed and written inside the read's own callback, so an
        event costs no task switch, no generator and no ASGI message. Same guarantees and
        errors as `rest()`: it raises `StreamInterrupted` when the stream cannot be finished,
        and `[DONE]` is written if the upstream forgot it."""
        observer = self.observer
        if self._drained:
            # The first read held the whole body: nothing is left to read, nor to time.
            try:
                self._at_end(write)
            except StreamInterrupted as interrupted:
                self._cut_off(interrupted)
                raise
            return
        # The lean client's own pump; any other response (chaos's, a test's fake) is read
        # through its chunks, with the same sink.
        read: Callable[[Sink], Awaitable[bool]] = getattr(self.response, "pump", self._pump_chunks)
        self._timer = timer = ReadTimer(self.idle_s, self.deadline)
        clock = asyncio.get_running_loop().time
        failure: list[Exception] = []

        def sink(chunk: bytes) -> bool:
            """One read's body bytes; true asks the connection to stop reading."""
            if failure or observer.done or observer.error is not None:
                return True  # what follows the end or an error is not the client's
            timer.started = clock()  # the idle limit counts from the last read
            try:
                events = observer.feed(chunk)
                paused = write(events) if events else False
            except Exception as exc:  # raised in the task, never into the parser
                failure.append(exc)
                return True
            return paused or observer.done or observer.error is not None

        try:
            while True:
                timer.start()
                try:
                    ended = await read(sink)
                    if failure and isinstance(failure[0], UpstreamBroken):
                        raise failure.pop()  # a malformed stream: as one that broke
                except asyncio.CancelledError:
                    if not timer.expired():
                        raise
                    if observer.finished:
                        break  # the answer is whole; only its [DONE] is late
                    raise self._timed_out(timer) from None
                except UpstreamBroken as exc:
                    if observer.finished:
                        break
                    raise self._broke_off(exc) from None
                finally:
                    timer.stop()
                if failure:
                    break  # the writer's own failure (a diverged resumption), raised below
                if ended:
                    self._at_end(write)
                    return
                if observer.error is not None:
                    raise self._error_mid_stream(observer.error)
                if observer.done:
                    break
                await drain()
        except StreamInterrupted as interrupted:
            self._cut_off(interrupted)
            raise
        finally:
            timer.close()
        if failure:
            raise failure[0]
        if not observer.done:
            # Finished but forgot [DONE], or lost it: the answer is whole, so complete it.
            observer.done = True
            write(DONE_EVENT)

    def _cut_off(self, interrupted: StreamInterrupted) -> None:
        """Its attempt's record of why the stream could not be finished."""
        if self.tried is not None:
            self.tried.failed(interrupted.code or "stream_interrupted")

    def _at_end(self, write: Write) -> None:
        """`pump`'s last step once the body has ended: the last event if it lacked its
        blank line, and [DONE] if a finished answer forgot it; raises `StreamInterrupted`
        when the answer is not whole."""
        observer = self.observer
        if not observer.done:
            tail = observer.flush()
            if tail:
                write(tail)
        if observer.error is not None:
            raise self._error_mid_stream(observer.error)
        if not observer.done:
            if not observer.finished:
                raise self._incomplete()
            observer.done = True
            write(DONE_EVENT)

    async def _pump_first_events(self) -> bytes:
        """`first_events` through the lean client's `pump`. No async generator is started
        for the stream: one left unfinished (by `pump`, which reads on without it) costs a
        finalizing task when it is collected."""
        observer = self.observer
        read: Callable[[Sink], Awaitable[bool]] = self.response.pump  # type: ignore[union-attr]
        got: list[bytes] = []
        failure: list[Exception] = []

        def sink(chunk: bytes) -> bool:
            if failure:
                return True
            try:
                events = observer.feed(chunk)
            except Exception as exc:  # a malformed stream: raised in the task
                failure.append(exc)
                return True
            if events:
                got.append(events)
            return bool(got) or observer.error is not None

        while True:
            ended = await read(sink)
            if failure:
                raise failure[0]
            if got or observer.error is not None:
                self._drained = ended
                return b"".join(got)
            if ended:
                tail = observer.flush()
                if tail:
                    return tail
                raise UpstreamBroken("the stream ended before its first event")

    # Why a stream was cut off, in the words the client's error event carries.

    def _timed_out(self, timer: ReadTimer) -> StreamInterrupted:
        if timer.idle_expired:
            reason = f"sent nothing for {self.idle_s:g}s (timeouts.idle_s)"
        else:
            reason = "ran past the request's total time (timeouts.total_s)"
        return StreamInterrupted(
            f"Backend '{self.backend.name}' {reason}; the stream was cut off.",
            code="upstream_timeout",
        )

    def _broke_off(self, exc: UpstreamBroken) -> StreamInterrupted:
        return StreamInterrupted(
            f"Backend '{self.backend.name}' broke off the stream: {exc}",
            code="upstream_stream_broken",
        )

    def _incomplete(self) -> StreamInterrupted:
        return StreamInterrupted(
            f"Backend '{self.backend.name}' ended the stream before the answer finished.",
            code="upstream_stream_incomplete",
        )

    def _error_mid_stream(self, error: dict[str, Any]) -> StreamInterrupted:
        return StreamInterrupted(
            f"Backend '{self.backend.name}' reported an error mid-stream: "
            f"{error.get('message', 'no message')}",
            code="upstream_stream_error",
        )

    async def _pump_chunks(self, sink: Sink) -> bool:
        """`pump` of providers.http1's responses, over `chunks()`: True at the body's end,
        False when `sink` asked for a pause."""
        if self._chunks is None:
            assert self.response is not None
            self._chunks = self.response.chunks()
        async for chunk in self._chunks:
            if sink(chunk):
                return False
        return True

    async def _next(self) -> bytes | None:
        """Whole events from the next read (maybe b""), or None at end of stream."""
        if self._chunks is None:
            assert self.response is not None
            self._chunks = self.response.chunks()
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            tail = self.observer.flush()
            return tail or None
        return self.observer.feed(chunk)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.backend.in_flight -= 1
        tried = self.tried
        if tried is not None and tried.end is None:
            tried.end = time.perf_counter()
        if self._timer is not None:
            self._timer.close()  # a consumer that left without closing `rest()` too
        if self.response is not None:
            self.response.close()
        if self.finish is not None:
            self.finish(self)


class ResumableStream:
    """A client's stream, continued on another backend of its route when its upstream breaks.

    Resumption happens only after the stream reached the client (before that, a failure is
    the retry policy's). It is bounded by the route's `resume.attempts`, the request's
    deadline and the route's retry budget, and it never hides the original failure: when
    it cannot go on, the client's error event names what broke and why resuming failed.
    """

    __slots__ = (
        "_dropped",
        "_router",
        "_splice",
        "_stream",
        "backend",
        "finish",
        "first",
        "outcome",
        "plan",
        "resumptions",
        "route",
        "transcript",
    )

    def __init__(
        self,
        router: Router,
        plan: Plan,
        outcome: Outcome,
        stream: UpstreamStream,
        transcript: Transcript,
    ) -> None:
        self._router = router
        self.plan = plan
        self.outcome = outcome
        self.route = stream.route  # resumed on the route that answered
        self._stream = stream
        self._splice: Splice | None = None
        self._dropped = 0
        self.transcript = transcript
        self.backend = stream.backend  # the one whose name the response headers carry
        self.first = stream.first
        self.resumptions = 0
        self.finish: Finish | None = None

    @property
    def usage(self) -> dict[str, Any] | None:
        usage = self._stream.observer.usage
        return usage if self._splice is None else self._splice.adjust_usage(usage)

    @property
    def dropped_events(self) -> int:
        return self._dropped + self._stream.observer.malformed

    @property
    def observer(self) -> SSEObserver:
        """The observer of the upstream stream now being read."""
        return self._stream.observer

    async def rest(self) -> AsyncIterator[bytes]:
        """Events after the first, across resumptions; raises `StreamInterrupted` as
        `UpstreamStream.rest` does when the stream cannot be continued."""
        while True:
            try:
                async for events in self._stream.rest():
                    if self._splice is not None:
                        events = self._spliced(events)
                    if events:
                        yield events
                return
            except StreamInterrupted as interrupted:
                if interrupted.code == DIVERGED:
                    raise
                first = await self._resume(interrupted)
            if first:
                yield first

    async def pump(self, write: Write, drain: Drain) -> None:
        """`rest()` through `UpstreamStream.pump`, across resumptions."""
        while True:
            if self._splice is None:
                out = write
            else:

                def out(events: bytes) -> bool:
                    spliced = self._spliced(events)
                    return write(spliced) if spliced else False

            try:
                await self._stream.pump(out, drain)
                return
            except StreamInterrupted as interrupted:
                if interrupted.code == DIVERGED:
                    raise
                first = await self._resume(interrupted)
            if first and write(first):
                await drain()

    def _spliced(self, events: bytes) -> bytes:
        assert self._splice is not None
        try:
            return self._splice.rewrite(events)
        except Diverged as diverged:
            if self._stream.tried is not None:
                self._stream.tried.failed(DIVERGED)
            self._count("prefill" if self._splice.prefill else "regenerate", "diverged")
            raise StreamInterrupted(
                f"The stream broke and was resumed on backend '{self._stream.backend.name}', "
                f"but {diverged}; it was cut off rather than spliced.",
                code=DIVERGED,
            ) from None

    async def _resume(self, interrupted: StreamInterrupted) -> bytes:
        """Continue on another backend and return its first events for the client, or
        raise `interrupted`, saying why not."""
        route = self.route
        settings = route.config.resume
        transcript = self.transcript
        why_not = None
        if not transcript.resumable:
            why_not = "its answer cannot be replayed (tool calls, several choices or too long)"
        elif self.resumptions >= settings.attempts:
            why_not = f"it was already resumed {self.resumptions} times (resume.attempts)"
        elif not route.retry.budget.can_spend():
            why_not = "the route's retry budget is spent"
        if why_not is not None:
            raise StreamInterrupted(
                f"{_sentence(interrupted.message)} It was not resumed: {why_not}.",
                code=interrupted.code,
            ) from None
        route.retry.budget.spend()
        self.resumptions += 1
        self.outcome.resumptions += 1
        failed = self._stream
        self._dropped += failed.observer.malformed
        failed.close()
        try:
            stream, mode = await self._router.resume(self.plan, self.outcome, failed, transcript)
        except ResumeFailed as exc:
            self._count(exc.mode, "failed")
            raise StreamInterrupted(
                f"{_sentence(interrupted.message)} Resuming it failed: {_sentence(exc.reason)}",
                code=interrupted.code,
            ) from None
        self._stream = stream
        self.route = stream.route  # a fallback's, when the stream went on there
        self._splice = Splice(transcript, prefill=mode == "prefill")
        self._count(mode, "resumed")
        return self._spliced(stream.first)

    def _count(self, mode: str, outcome: str) -> None:
        self._router.hooks.on_resume(self.route.name, mode, outcome)

    def close(self) -> None:
        self._stream.close()
        finish, self.finish = self.finish, None
        if finish is not None:
            finish(self)


ClientStream = UpstreamStream | ResumableStream | CachedStream | FlightStream
# The streams that can `pump` into a writer; the others are read through `rest()`.
PUMPED = (UpstreamStream, ResumableStream)


def _sentence(text: str) -> str:
    """`text` ending as a sentence, so that another can follow it."""
    text = text.rstrip()
    return text if text.endswith((".", "!", "?", "…")) else text + "."
