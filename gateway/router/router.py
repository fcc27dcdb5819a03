"""The router: model name → route → backend → one upstream exchange, under one deadline.

It knows models, backends and failure, and nothing of HTTP framing: it hands the edge
either a complete body or a stream of whole SSE events, and raises `GatewayError`s. What it
did (route, backends tried, decisions, usage, time) goes into the request's `Outcome`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable
from typing import Any, TypeVar

import orjson

from gateway.errors import (
    BreakerOpen,
    ContextTooLong,
    GatewayError,
    ModelNotFound,
    NoLiveBackend,
    UpstreamTimeout,
    clip,
)
from gateway.router import exchange
from gateway.router.backend import Backend
from gateway.router.caching import (
    CachedStream,
    CachePlan,
    Source,
    Tee,
    answer_events,
    cache_plan,
    claims,
    complete_answer,
    give_back,
    lease_s,
    prefetch,
    start_lookup,
)
from gateway.router.coalesce import Flight, FlightStream, pump
from gateway.router.embeddings import embed
from gateway.router.exchange import AnswerBounds, Window
from gateway.router.hooks import RouterHooks
from gateway.router.outcome import AttemptRecord, Completion, Outcome, RedisCall
from gateway.router.plan import Call, Plan, plan
from gateway.router.relay import MAX_RELAYS, Relay, RemoteStream, follow
from gateway.router.route import Route
from gateway.router.streams import ClientStream, ResumableStream, ResumeFailed, UpstreamStream
from gateway.wire.assemble import Assembler, Incomplete
from gateway.wire.validation import Endpoint, ProxyRequest
from policies.admission import Admission
from policies.cache import STREAMING, CacheUnavailable, Lookup, ResponseCache
from policies.resume import Transcript, prefill_payload
from policies.retry import AttemptFailed

T = TypeVar("T")
# What a stream's end keeps: where, its assembler, and who else takes the whole answer.
Keep = tuple[CachePlan, Assembler, Callable[[bytes], None] | None]
# One attempt on one backend of a route, within the request's time, noting its facts.
Attempt = Callable[[Route, Backend, Window, AttemptRecord], Awaitable[T]]


class Router:
    def __init__(
        self,
        routes: Iterable[Route],
        *,
        admission: Admission | None = None,
        answers: AnswerBounds | None = None,
        hooks: RouterHooks | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.routes = tuple(routes)
        self.cache = cache  # the process's response cache (None: off); outlives a reload
        self.flights: dict[str, Flight] = {}  # identical requests in flight, by cache key
        self.relays: set[asyncio.Task[None]] = set()  # streams relayed to other processes
        self.hooks = hooks or RouterHooks()
        self.answers = answers or AnswerBounds()
        self.admission = admission or Admission(limit=1024, max_waiting=256, timeout_s=1.0)
        self._by_name: dict[str, Route] = {}
        for route in self.routes:
            for name in (route.name, *route.config.aliases):
                self._by_name[name] = route
        by_route_name = {route.name: route for route in self.routes}
        for route in self.routes:
            route.fallbacks = tuple(by_route_name[name] for name in route.config.fallbacks)
        self._available = ", ".join(sorted(self._by_name))

    @property
    def backends(self) -> list[Backend]:
        return [backend for route in self.routes for backend in route.backends]

    def route_for(self, model: str, allowed: frozenset[str] | None = None) -> Route:
        """The route serving `model` (a name or an alias), for a caller that may use the
        routes named in `allowed` (None: all). To a caller limited to some models, one it
        may not use and one that does not exist are the same 404, naming only its own."""
        route = self._by_name.get(model)
        if allowed is None:
            if route is None:
                raise ModelNotFound(
                    f"The model '{clip(model)}' does not exist. "
                    f"Available models: {self._available}.",
                    param="model",
                )
            return route
        if route is None or route.name not in allowed:
            raise ModelNotFound(
                f"The model '{clip(model)}' does not exist or this API key may not use it. "
                f"Models this key may use: {', '.join(sorted(allowed)) or 'none'}.",
                param="model",
            )
        return route

    def plan(self, request: ProxyRequest, call: Call) -> Plan:
        """Where `request` may go for its caller; raises before it costs anything when it
        may go nowhere (a model it may not use, a pin it may not ask for)."""
        return plan(request, call, self.route_for(request.model, call.models))

    def prefetch(self, plan: Plan) -> None:
        """Start reading the request's cache entry, where the cache is shared through
        Redis: the edge calls this right before it checks the caller's limits, so the read
        and the check share one round trip (`gateway.router.caching.Prefetch`). A plan
        that goes no further is dropped (`plan.prefetched.drop()`)."""
        if self.cache is not None:
            prefetch(self.cache, plan, self._in_flight)

    def _in_flight(self, key: str) -> bool:
        return self._flight(key) is not None

    async def complete(self, plan: Plan, outcome: Outcome) -> Completion:
        """A whole answer: from the cache where it has one, else shared with an identical
        request in flight (gateway.router.coalesce), else tried under the route's retry
        policy, then on its fallbacks (and kept, where it is whole)."""
        cache = self.cache
        caching = None if cache is None else cache_plan(cache, plan, outcome)
        if caching is None:
            return await self._complete(plan, outcome)
        assert cache is not None
        if plan.request.endpoint is Endpoint.EMBEDDINGS:  # item by item
            return await embed(cache, caching, plan, outcome, self._complete)
        if caching.read:
            found = await self._look_up(cache, caching, plan, outcome)
            if found is not None:
                return Completion(found[0], "application/json", plan.route.name, "cache")
        if cache.config.coalesce:
            flight = self._flight(caching.key)
            # The holder of the key's lease leads, even where a flight of this process is
            # waiting on another holder (two lookups that raced): that one gets the answer
            # through Redis, and later requests join this one.
            if flight is None or caching.lease:
                return await self._lead(cache, caching, plan, outcome)
            if flight.joinable:
                await flight.outcome()
                if flight.body is not None:
                    answer = self._coalesced(cache, flight.body, plan, outcome)
                    if answer is not None:
                        backend = flight.backend or "cache"
                        return Completion(flight.body, "application/json", plan.route.name, backend)
            # The leader failed: one attempt of its own, never joining another flight.
        self._missed(cache, plan, outcome)
        return (await self._complete_kept(cache, caching, plan, outcome))[0]

    async def _complete_kept(
        self, cache: ResponseCache, caching: CachePlan, plan: Plan, outcome: Outcome
    ) -> tuple[Completion, bool]:
        """An answer from upstream, kept where it is whole and the route's own; whether it
        is (so that followers may share it)."""
        try:
            completion = await self._complete(plan, outcome)
        except BaseException:
            cache.release(caching.key, caching.lease)
            raise
        whole = completion.route == plan.route.name and complete_answer(completion.body) is not None
        if whole and outcome.cache == "miss":
            cache.keep(caching.key, completion.body, caching.ttl_s, caching.lease)
        else:
            cache.release(caching.key, caching.lease)
        return completion, whole

    async def _lead(
        self, cache: ResponseCache, caching: CachePlan, plan: Plan, outcome: Outcome
    ) -> Completion:
        """The first of identical requests: its call runs in a task of its own, which its
        client leaving cancels only when no follower waits for it."""
        flight = Flight(streaming=False, lag_bytes=cache.config.max_entry_bytes)

        async def call() -> Completion:
            if await self._remote_answer(cache, caching, plan, outcome, flight) is True:
                assert flight.body is not None
                return Completion(flight.body, "application/json", plan.route.name, "cache")
            self._missed(cache, plan, outcome)
            completion, whole = await self._complete_kept(cache, caching, plan, outcome)
            if whole:
                flight.body, flight.backend = completion.body, completion.backend
            return completion

        task = self._fly(caching.key, flight, call())
        self._give_back_if_cancelled(cache, caching, task)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not flight.wanted():
                task.cancel()
            raise

    async def _remote_answer(
        self,
        cache: ResponseCache,
        caching: CachePlan,
        plan: Plan,
        outcome: Outcome,
        flight: Flight,
    ) -> bool | RemoteStream:
        """What another process making the same call gave: True, its whole answer (then
        in the flight's body); a `RemoteStream`, its stream as it comes (a streaming
        flight, led by a process that relays its stream). False: this process makes the
        call, holding the key's lease (`caching.lease`) where it could take it, or on its
        own where another process failed, or where no store is shared."""
        shared = cache.shared
        if shared is None or caching.lease or outcome.cache == "bypass":
            return False  # no store shared, the lookup took the lease, or Redis is down
        total_s = plan.route.timeouts.total_s
        streaming = plan.request.stream
        holder = caching.holder
        if holder is None:  # not claimed with the lookup: claimed now
            if caching.read:
                try:
                    found = await cache.look_up(caching.key, lease_s(plan), streaming=streaming)
                except CacheUnavailable:
                    return False
                if found.entry is not None:
                    return self._shared(cache, found.entry.body, plan, outcome, flight)
                caching.lease, holder = found.lease, found.holder
            else:  # a refresh: never reads the entry
                lease = await cache.lease(caching.key, lease_s(plan), streaming=streaming)
                caching.lease, holder = lease or "", None if lease is not None else ""
            if holder is None:
                return False
        if flight.streaming and holder.startswith(STREAMING):
            followed = await follow(
                shared,
                caching.key,
                plan.route,
                stream_options=flight.stream_options,
                within_s=total_s,
            )
            if isinstance(followed, RemoteStream):
                cache.count("coalesced", plan.route.name)
                outcome.cache = "coalesced"
                outcome.route = plan.route.name
                outcome.request = plan.request

                def finish(stream: Any) -> None:
                    outcome.record_usage(stream.usage)
                    flight.body = followed.body  # for this process's followers of the whole

                followed.finish = finish
                return followed
            entry = followed
        else:
            entry = await cache.await_entry(caching.key, total_s)
        if entry is None:
            return False
        return self._shared(cache, entry.body, plan, outcome, flight)

    def _shared(
        self, cache: ResponseCache, body: bytes, plan: Plan, outcome: Outcome, flight: Flight
    ) -> bool:
        """Another process's whole answer, the flight's where it is whole."""
        if self._coalesced(cache, body, plan, outcome) is None:
            return False
        flight.body, flight.backend = body, "cache"
        return True

    @staticmethod
    def _give_back_if_cancelled(
        cache: ResponseCache, caching: CachePlan, task: asyncio.Task[Any]
    ) -> None:
        """A flight's call cancelled before it ran holds its lookup's lease: given back."""

        def landed(done: asyncio.Task[Any]) -> None:
            if done.cancelled():
                cache.release(caching.key, caching.lease)

        task.add_done_callback(landed)

    def _flight(self, key: str) -> Flight | None:
        """The flight of `key` still in the air (one that has just ended is not joined)."""
        flight = self.flights.get(key)
        return None if flight is None or flight.done else flight

    def _fly(self, key: str, flight: Flight, call: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run a flight's call; it leaves the registry when it ends."""
        flights = self.flights
        flights[key] = flight

        def landed(task: asyncio.Task[T]) -> None:
            if flights.get(key) is flight:
                del flights[key]
            if not task.cancelled():
                task.exception()  # retrieved: the leader, or nobody, sees it
            flight.end()

        task = asyncio.get_running_loop().create_task(call)
        flight.task = task
        task.add_done_callback(landed)
        return task

    def _coalesced(
        self, cache: ResponseCache, body: bytes, plan: Plan, outcome: Outcome
    ) -> dict[str, Any] | None:
        """A follower's share of its leader's whole answer (None: not whole after all)."""
        answer = complete_answer(body)
        if answer is None:
            return None
        cache.count("coalesced", plan.route.name)
        outcome.cache = "coalesced"
        outcome.route = plan.route.name
        outcome.request = plan.request
        outcome.record_usage(answer["usage"])
        return answer

    async def _look_up(
        self, cache: ResponseCache, caching: CachePlan, plan: Plan, outcome: Outcome
    ) -> tuple[bytes, dict[str, Any]] | None:
        """The cached answer (its body, parsed) for the request; None on a miss, or when
        the store cannot tell in time (a bypass: the request goes on uncached). With
        requests coalescing across processes, a miss's lookup claims the key's lease in
        the same call (`caching.lease`, or `caching.holder` where another has it)."""
        fetched = plan.prefetched
        started = time.perf_counter()
        read: asyncio.Future[Lookup] | None = None
        try:
            if fetched is not None and fetched.read is not None:
                started = fetched.started
                read = fetched.read
            elif cache.shared is not None:
                claim = claims(cache, caching, self._in_flight)
                read = start_lookup(cache, caching, plan, claim=claim)
            if read is None:
                found = await cache.look_up(caching.key, None, streaming=False)
            else:
                # Shielded: a lease the lookup takes after this request left is given back.
                found = await asyncio.shield(read)
        except CacheUnavailable:
            cache.bypass("unavailable")
            outcome.cache = "bypass"
            if plan.call.traced:
                _note_redis_call(cache, caching, outcome, started, failed=True)
            return None
        except asyncio.CancelledError:
            if read is not None:
                give_back(cache, caching.key, read)
            raise
        if plan.call.traced:  # a span only where the trace may be exported
            _note_redis_call(cache, caching, outcome, started)
        caching.lease, caching.holder = found.lease, found.holder
        entry = found.entry
        answer = None if entry is None else complete_answer(entry.body)
        if entry is None or answer is None:
            return None
        cache.count("hit", plan.route.name)
        outcome.cache = "hit"
        outcome.cache_age = max(0, int(time.time() - entry.created))
        outcome.route = plan.route.name
        outcome.request = plan.request
        outcome.record_usage(answer["usage"])
        return entry.body, answer

    @staticmethod
    def _missed(cache: ResponseCache, plan: Plan, outcome: Outcome) -> None:
        """Counted as a miss, unless the store was bypassed (counted as that)."""
        if outcome.cache != "bypass":
            cache.count("miss", plan.route.name)
            outcome.cache = "miss"

    async def _complete(self, plan: Plan, outcome: Outcome) -> Completion:
        await self._admit(plan, outcome)
        outcome.request = plan.request
        answers = self.answers

        async def once(
            route: Route, backend: Backend, window: Window, tried: AttemptRecord
        ) -> Completion:
            return await exchange.complete(plan, outcome, route, backend, window, answers, tried)

        try:
            return await self._run(plan, outcome, once)
        finally:
            self.admission.release()

    async def open_stream(self, plan: Plan, outcome: Outcome) -> ClientStream:
        """Start a stream and wait for its first event; failures so far are HTTP errors.

        Once it has reached the client, a stream that breaks is resumed on another backend
        of the route that answered, where the route allows it (see `ResumableStream`).
        Closing the stream settles its outcome and frees its admission slot. A cached
        answer is sent as the events of its stream; an identical request in flight is
        shared (gateway.router.coalesce).
        """
        chat = plan.request.endpoint is Endpoint.CHAT
        cache = self.cache
        caching = None if cache is None else cache_plan(cache, plan, outcome)
        if caching is None:
            return await self._open_stream(plan, outcome, None)
        assert cache is not None
        if caching.read:
            found = await self._look_up(cache, caching, plan, outcome)
            if found is not None:
                answer = found[1]
                with_usage = plan.request.client_wants_usage
                events = answer_events(answer, chat=chat, with_usage=with_usage)
                return CachedStream(plan.route, events, answer["usage"])
        if cache.config.coalesce:
            flight = self._flight(caching.key)
            if flight is None or caching.lease:  # the lease's holder leads (see `complete`)
                return await self._lead_stream(cache, caching, plan, outcome)
            if flight.joinable:
                joined = await self._join_stream(cache, flight, plan, outcome)
                if joined is not None:
                    return joined
            # The leader failed: one attempt of its own, never joining another flight.
        self._missed(cache, plan, outcome)
        return await self._open_stream(plan, outcome, caching)

    async def _lead_stream(
        self, cache: ResponseCache, caching: CachePlan, plan: Plan, outcome: Outcome
    ) -> ClientStream:
        """The first of identical streaming requests: its stream is read by a task of its
        own into the flight's log, which this client reads as its followers do."""
        flight = Flight(streaming=True, lag_bytes=cache.config.max_entry_bytes)
        flight.stream_options = plan.request.payload.get("stream_options")

        def shared(body: bytes) -> None:
            flight.body = body

        async def open_upstream() -> UpstreamStream | ResumableStream | RemoteStream | None:
            remote = await self._remote_answer(cache, caching, plan, outcome, flight)
            if remote is True:
                return None  # another process's answer, in the flight's body
            if isinstance(remote, RemoteStream):
                return remote  # another process's stream, as it comes
            self._missed(cache, plan, outcome)
            try:
                upstream = await self._open_stream(plan, outcome, caching, shared)
            except BaseException:
                cache.release(caching.key, caching.lease)
                raise
            self._relay(cache, caching, plan, flight, upstream)
            return upstream

        task = self._fly(caching.key, flight, pump(flight, open_upstream))
        self._give_back_if_cancelled(cache, caching, task)
        try:
            opened = await flight.wait_opened()
        except asyncio.CancelledError:
            if not flight.wanted():
                task.cancel()
            raise
        upstream = flight.upstream
        if opened and upstream is not None:
            return FlightStream(flight, upstream.route, upstream.backend)
        if flight.body is not None and outcome.cache == "coalesced":  # another process's
            return self._whole_as_stream(plan, flight, complete_answer(flight.body))
        await task  # raises what failed it
        raise RuntimeError("a flight's stream neither opened nor failed")  # never

    def _relay(
        self,
        cache: ResponseCache,
        caching: CachePlan,
        plan: Plan,
        flight: Flight,
        upstream: UpstreamStream | ResumableStream,
    ) -> None:
        """Relay the flight's stream to followers in other processes, where this process
        holds the key's lease through Redis (gateway/router/relay.py)."""
        shared = cache.shared
        if shared is None or not caching.lease or len(self.relays) >= MAX_RELAYS:
            return
        header = {"o": flight.stream_options, "b": upstream.backend.name}
        relay = Relay(
            shared,
            caching.key,
            header,
            max_bytes=cache.config.max_entry_bytes,
            ttl_s=lease_s(plan),
        )
        self.relays.add(relay.task)
        relay.task.add_done_callback(self.relays.discard)
        flight.relay = relay

    async def _join_stream(
        self, cache: ResponseCache, flight: Flight, plan: Plan, outcome: Outcome
    ) -> ClientStream | None:
        """A streaming follower's share of a flight, or None when its leader failed."""
        # Its events as they come only where they are what this client asked for (the
        # usage chunk, vLLM's continuous usage): else its whole answer, as a hit's events.
        if flight.streaming and flight.stream_options == plan.request.payload.get("stream_options"):
            opened = await flight.wait_opened()
            upstream = flight.upstream
            if not opened or upstream is None:
                opened = False  # failed, or answered by another process: its whole answer
            elif not flight.joinable:
                return None
        else:
            opened, upstream = False, None
        if opened and upstream is not None:
            cache.count("coalesced", plan.route.name)
            outcome.cache = "coalesced"
            outcome.route = plan.route.name
            outcome.request = plan.request
            reader = FlightStream(flight, upstream.route, upstream.backend)
            reader.finish = lambda stream: outcome.record_usage(stream.usage)
            return reader
        await flight.outcome()
        answer = None if flight.body is None else self._coalesced(cache, flight.body, plan, outcome)
        if answer is None:
            return None
        return self._whole_as_stream(plan, flight, answer)

    @staticmethod
    def _whole_as_stream(plan: Plan, flight: Flight, answer: dict[str, Any] | None) -> CachedStream:
        """A flight's whole answer, as the events of its stream."""
        assert answer is not None
        chat = plan.request.endpoint is Endpoint.CHAT
        with_usage = plan.request.client_wants_usage
        events = answer_events(answer, chat=chat, with_usage=with_usage)
        stream = CachedStream(plan.route, events, answer["usage"])
        stream.backend = Source(flight.backend or "cache")
        return stream

    async def _open_stream(
        self,
        plan: Plan,
        outcome: Outcome,
        caching: CachePlan | None,
        shared: Callable[[bytes], None] | None = None,
    ) -> UpstreamStream | ResumableStream:
        """An upstream stream for the request; with `caching`, its answer is assembled as it
        passes and kept if whole (and handed to `shared`, for a flight's followers)."""
        chat = plan.request.endpoint is Endpoint.CHAT
        await self._admit(plan, outcome)
        outcome.request = plan.request
        resumable = plan.request.payload.get("n") in (None, 1)

        async def once(
            route: Route, backend: Backend, window: Window, tried: AttemptRecord
        ) -> UpstreamStream:
            settings = route.config.resume
            transcript = None
            if resumable and settings.enabled:
                transcript = Transcript(chat=chat, max_chars=settings.max_text_chars)
            recorder: Transcript | Tee | None = transcript
            if caching is not None:  # its answer assembled as it passes, to be kept
                recorder = Tee(Assembler(chat=chat), transcript)
            return await exchange.open_stream(
                plan, outcome, route, backend, window, tried, recorder
            )

        try:
            upstream = await self._run(plan, outcome, once)
        except BaseException:
            self.admission.release()
            raise
        recorder = upstream.observer.recorder
        assembler = None
        if isinstance(recorder, Tee):
            assembler = recorder.assembler
            recorder = recorder.transcript
        stream: UpstreamStream | ResumableStream = upstream
        if isinstance(recorder, Transcript):
            stream = ResumableStream(self, plan, outcome, upstream, recorder)
        keep = None
        if caching is not None and assembler is not None and upstream.route is plan.route:
            keep = (caching, assembler, shared)  # a fallback's answer is not the route's
        stream.finish = self._finisher(outcome, keep)
        return stream

    async def resume(
        self, plan: Plan, outcome: Outcome, broken: UpstreamStream, transcript: Transcript
    ) -> tuple[UpstreamStream, str]:
        """Continue a stream that broke after reaching the client, before the request's
        deadline: on another backend of the route that was answering, then on that route's
        remaining fallbacks in order, and only when neither had anything to try, on the
        backend that broke. Each target continues with the answer so far as a prefill where
        it can take one ("prefill"), else it answers afresh and must reproduce the text
        already sent ("regenerate"). Raises `ResumeFailed` when none can."""
        chat = transcript.chat and bool(transcript.text)
        mode = "regenerate"

        async def once(
            route: Route, backend: Backend, window: Window, tried: AttemptRecord
        ) -> UpstreamStream:
            nonlocal mode
            prefill = chat and backend.config.can_prefill
            mode = "prefill" if prefill else "regenerate"
            tried.resumption = mode
            payload = prefill_payload(plan.request.payload, transcript) if prefill else None
            return await exchange.open_stream(
                plan, outcome, route, backend, window, tried, None, payload
            )

        window = Window(broken.deadline, broken.deadline)
        failed = broken.backend
        attempts_before = outcome.attempts
        reason = ""
        for route in self._resume_chain(plan, broken.route):
            exclude = (failed,) if route is broken.route else ()
            if route is not broken.route:
                self._fall_back(plan, outcome, broken.route, route)
            try:
                stream = await self._on_route(route, plan, outcome, once, window, exclude=exclude)
            except (GatewayError, AttemptFailed, _RouteExhausted) as exc:
                # A real attempt's failure says more than a route with nothing to try.
                if not reason or outcome.attempts > attempts_before:
                    reason = _message_of(exc)
                continue
            return stream, mode
        if outcome.attempts == attempts_before:
            # Nowhere else to go: the backend that broke may still finish the answer.
            try:
                stream = await self._on_route(
                    broken.route, plan, outcome, once, window, avoid=(failed,)
                )
            except (GatewayError, AttemptFailed, _RouteExhausted) as exc:
                raise ResumeFailed(mode, _message_of(exc)) from None
            return stream, mode
        raise ResumeFailed(mode, reason)

    def _resume_chain(self, plan: Plan, answering: Route) -> list[Route]:
        """The route that was answering, then the request's fallbacks after it; a backend
        chosen by X-VGate-Pin is never hidden behind a fallback."""
        if plan.pin_forced:
            return [answering]
        chain = [plan.route, *plan.route.fallbacks]
        start = next((i for i, route in enumerate(chain) if route is answering), 0)
        return chain[start:] if chain[start] is answering else [answering, *chain]

    def _fall_back(self, plan: Plan, outcome: Outcome, previous: Route, route: Route) -> None:
        """The request goes on from `previous` to its fallback `route`."""
        outcome.route = route.name
        outcome.fallback_from = outcome.fallback_from or plan.route.name
        self.hooks.on_fallback(previous.name, route.name)

    async def _admit(self, plan: Plan, outcome: Outcome) -> None:
        """A slot of the process's in-flight limit, queueing by priority when none is free."""
        admission = self.admission
        if not admission.try_acquire():
            queued = time.perf_counter()
            await admission.acquire(plan.call.priority)
            outcome.waited_s += time.perf_counter() - queued

    def _finisher(
        self, outcome: Outcome, keep: Keep | None = None
    ) -> Callable[[ClientStream], None]:
        admission = self.admission
        cache = self.cache

        def finish(stream: ClientStream) -> None:
            outcome.record_usage(stream.usage)
            outcome.dropped_events = stream.dropped_events
            admission.release()
            if keep is not None and cache is not None:
                caching = keep[0]
                body = None
                if outcome.cache == "miss":
                    body = _keep_stream(cache, caching, keep[1], stream, outcome)
                if body is None:
                    cache.release(caching.key, caching.lease)
                elif keep[2] is not None:
                    keep[2](body)

        return finish

    async def _run(self, plan: Plan, outcome: Outcome, once: Attempt[T]) -> T:
        """Attempts on the plan's route under its retry policy, then on its fallbacks.

        One deadline, the first route's `total_s`, covers every attempt and every wait;
        while a fallback is left, the attempts must answer (a stream: its first token)
        before the share kept for the fallbacks (`timeouts.fallback_reserve_s`), so a silent
        route cannot spend their time. A fallback is tried when a route has no usable
        backend, runs out of attempts or of its share of time; a prompt too long for a route
        goes only to fallbacks with a larger context window. A client error (400, 404...)
        from an upstream ends the request as it is.
        """
        route = plan.route
        loop = asyncio.get_running_loop()
        deadline = loop.time() + route.timeouts.total_s
        current = route
        outcome.route = route.name
        # X-VGate-Pin reproduces one backend's behaviour: never hidden by a fallback.
        candidates = [] if plan.pin_forced else list(route.fallbacks)
        reserve = route.config.fallback_reserve(candidates[0].config if candidates else None)
        while True:
            # While a fallback is left, the attempts leave it its share of the time.
            answer_by = deadline - reserve if candidates else deadline
            try:
                return await self._on_route(
                    current, plan, outcome, once, Window(answer_by, deadline)
                )
            except NoLiveBackend as error:
                last: GatewayError = error
            except _RouteExhausted as exhausted:
                last = exhausted.failure.error
            except AttemptFailed as failure:
                last = failure.error
                if isinstance(failure.error, ContextTooLong):
                    window = current.config.context_window or 0
                    candidates = [c for c in candidates if (c.config.context_window or 0) > window]
                elif not (failure.retryable or failure.backend_fault):
                    raise failure.error from None  # the client's error: the same everywhere
            if not candidates or loop.time() >= deadline:
                raise last
            previous, current = current, candidates.pop(0)
            self._fall_back(plan, outcome, previous, current)

    async def _on_route(
        self,
        route: Route,
        plan: Plan,
        outcome: Outcome,
        once: Attempt[T],
        window: Window,
        avoid: Collection[Backend] = (),
        exclude: Collection[Backend] = (),
    ) -> T:
        """Attempts on one route's backends, a different one each time while any is left
        (never one in `exclude`), and never again on one that timed out: a backend that
        stayed silent for a whole phase is the likeliest to do it again."""
        loop = asyncio.get_running_loop()
        tried: list[Backend] = list(avoid)
        silent: list[Backend] = list(exclude)
        failures: list[AttemptFailed] = []
        # A pin names a backend of the route asked for; a fallback has its own backends.
        pin = plan.pin if route is plan.route else None
        hooks = self.hooks

        async def attempt(number: int) -> T:
            try:
                backend = route.choose(
                    loop.time(), tried, plan.affinity_key, pin, outcome.decisions, silent
                )
            except NoLiveBackend:
                if failures:  # the last real failure says more than "nothing left"
                    raise _RouteExhausted(failures[-1]) from None
                raise
            tried.append(backend)
            outcome.backend = backend.name
            outcome.attempts += 1
            facts = AttemptRecord(route.name, backend.name, time.perf_counter())
            outcome.tried.append(facts)
            try:
                return await once(route, backend, window, facts)
            except BreakerOpen as refused:
                # Opened between selection and the attempt: skip it, no fault of its own.
                facts.failed("breaker_open")
                raise AttemptFailed(
                    refused, backend=backend.name, retryable=True, backend_fault=False
                ) from None
            except AttemptFailed as failure:
                facts.failed(failure.error.code or failure.error.type)
                failures.append(failure)
                if isinstance(failure.error, UpstreamTimeout):
                    silent.append(backend)
                if failure.retry_after_s is not None:
                    _honour_retry_after(route, backend, failure, loop.time())
                raise
            except BaseException as other:  # the gateway's own limits, a client that left
                facts.failed(_result_of(other))
                raise

        def on_retry(failure: AttemptFailed, delay: float) -> None:
            outcome.waited_s += delay
            hooks.on_retry(route.name, delay)

        return await route.retry.run(attempt, deadline=window.answer_by, on_retry=on_retry)


def _keep_stream(
    cache: ResponseCache,
    caching: CachePlan,
    assembler: Assembler,
    stream: ClientStream,
    outcome: Outcome,
) -> bytes | None:
    """Keep a stream's answer if it ran whole to its end on the backend that started it:
    never one resumed elsewhere, cut off, ended by an error or missing events. The answer
    kept, as a non-streaming body, or None."""
    if outcome.resumptions or not isinstance(stream, UpstreamStream | ResumableStream):
        return None
    observer = stream.observer
    if not observer.done or observer.error is not None or observer.malformed:
        return None
    try:
        answer = assembler.answer(observer.usage)
    except Incomplete:
        return None
    body = orjson.dumps(answer)
    if complete_answer(body) is None:
        return None
    if not cache.keep(caching.key, body, caching.ttl_s, caching.lease):
        return None  # too large: given back
    return body


def _honour_retry_after(route: Route, backend: Backend, failure: AttemptFailed, now: float) -> None:
    """A Retry-After speaks for the backend that sent it, not for the request.

    When another backend can answer now, this one sits out the (capped) time and the
    retry goes elsewhere at once; otherwise the retry itself waits that long.
    """
    if not any(other.usable(now) for other in route.backends if other is not backend):
        return
    assert failure.retry_after_s is not None
    rest = min(failure.retry_after_s, route.config.retries.retry_after_max_s)
    backend.ejected_until = max(backend.ejected_until, now + rest)
    failure.retry_after_s = None


class _RouteExhausted(Exception):
    """A retry found no usable backend left on its route."""

    def __init__(self, failure: AttemptFailed) -> None:
        super().__init__(failure.error.message)
        self.failure = failure


def _result_of(exc: BaseException) -> str:
    """An attempt ended by something other than its upstream, as its record says it."""
    if isinstance(exc, GatewayError):
        return exc.code or exc.type
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return type(exc).__name__


def _message_of(exc: BaseException) -> str:
    """What went wrong, naming the backend where the message does not (an upstream's own
    refusal is in its words)."""
    failure = exc.failure if isinstance(exc, _RouteExhausted) else exc
    if isinstance(failure, AttemptFailed):
        message = failure.error.message
        if f"'{failure.backend}'" not in message:
            message = f"Backend '{failure.backend}' answered: {message}"
        return message
    if isinstance(failure, GatewayError):
        return failure.message
    return str(failure)


def _note_redis_call(
    cache: ResponseCache,
    caching: CachePlan,
    outcome: Outcome,
    started: float,
    *,
    failed: bool = False,
) -> None:
    """A lookup that went to Redis, for its span in the trace (a memory lookup has none):
    a GET, or the script that claims the lease too."""
    if cache.config.backend != "redis":
        return
    command = "EVALSHA" if caching.claimed else "GET"
    outcome.add_redis_call(RedisCall("cache", command, started, time.perf_counter(), failed))
