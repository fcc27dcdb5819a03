"""The response cache's policy: what a request may take from it and what it may leave there.

The router asks `cache_plan` before it admits a request: None when the request bypasses the
cache (the reason counted), else where its answer lives (`CachePlan`). The key is the
request as it goes upstream, after the gateway's rewrites (gateway.wire.cachekey), in the
caller's scope (its key's name) unless the route shares answers globally.

Only complete answers are kept (`complete_answer`): 200, every choice with a
`finish_reason`, whole `usage`. A stream is kept only when it ran to its end on the backend
that started it (never one resumed elsewhere, cut off or ending in an error): its chunks
are assembled as they pass (`Tee`), so streams and non-streams share entries. A hit for a
stream is sent as SSE (`answer_events`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from gateway.wire.assemble import Assembler
from gateway.wire.cachekey import GLOBAL_SCOPE, cache_key, directives, is_deterministic
from gateway.wire.sse import DONE_EVENT, data_event
from gateway.wire.validation import Endpoint
from policies.cache import Lookup, ResponseCache
from policies.resume import Transcript

if TYPE_CHECKING:
    from gateway.router.outcome import Outcome
    from gateway.router.plan import Plan
    from gateway.router.route import Route
    from gateway.router.streams import Finish


@dataclass(slots=True)
class CachePlan:
    """Where one cacheable request's answer lives, and what the client allows."""

    key: str
    ttl_s: float
    read: bool  # False with Cache-Control: no-cache (a refresh: the answer is kept anew)
    lease: str = ""  # this process's lease on the call, shared through Redis (coalesce)
    owner: str = ""  # the scope: "key:<name>" or "global"
    claimed: bool = False  # its lookup asked for the lease too (`ResponseCache.look_up`)
    holder: str | None = None  # ...and found another process holding it (that lease's value)


@dataclass(slots=True)
class Prefetch:
    """A request's place in a shared cache, worked out before its limits were checked, and
    the read of its entry started then: issued in the same loop turn as the limit check,
    both go to Redis in one write (policies/redis_pipelined.py), one round trip for two.
    Where the request would lead a flight, the read claims the key's lease too."""

    place: CachePlan | str | None  # as `cache_place`
    started: float = 0.0  # when the read was issued (perf_counter), for its span
    read: asyncio.Future[Lookup] | None = None
    cache: ResponseCache | None = None

    def drop(self) -> None:
        """The request goes no further (its limits refused it): a lease its read took, or
        is about to take, is given back (never left to expire while others wait on it)."""
        if self.read is not None and self.cache is not None and isinstance(self.place, CachePlan):
            give_back(self.cache, self.place.key, self.read)


def prefetch(cache: ResponseCache, plan: Plan, in_flight: Callable[[str], bool]) -> None:
    """Start reading the request's entry now (see `Prefetch`), where the cache is shared
    through Redis and the request would read it; embeddings read item by item, later.
    `in_flight`: whether this process has a flight of the key (then it claims nothing)."""
    if cache.shared is None or plan.request.endpoint is Endpoint.EMBEDDINGS:
        return
    place = cache_place(cache, plan)
    fetched = Prefetch(place, cache=cache)
    if isinstance(place, CachePlan) and place.read:
        fetched.started = time.perf_counter()
        fetched.read = start_lookup(cache, place, plan, claim=claims(cache, place, in_flight))
    plan.prefetched = fetched


def claims(cache: ResponseCache, place: CachePlan, in_flight: Callable[[str], bool]) -> bool:
    """Whether a lookup claims the key's lease on a miss: where requests coalesce across
    processes, and none of this process's is in flight for the key (its follower takes
    none)."""
    return cache.shared is not None and cache.config.coalesce and not in_flight(place.key)


def lease_s(plan: Plan) -> float:
    """How long a lease on the request's call lasts: its route's whole time, and a second."""
    return plan.route.timeouts.total_s + 1.0


def start_lookup(
    cache: ResponseCache, place: CachePlan, plan: Plan, *, claim: bool
) -> asyncio.Future[Lookup]:
    """The request's lookup, under way in a task of its own (a lease it takes is never
    lost with a caller that gave up: see `give_back`); with `claim`, it claims too."""
    place.claimed = claim
    lookup = cache.look_up(
        place.key, lease_s(plan) if claim else None, streaming=plan.request.stream
    )
    read = asyncio.ensure_future(lookup)
    read.add_done_callback(_retrieved)
    return read


def give_back(cache: ResponseCache, key: str, read: asyncio.Future[Lookup]) -> None:
    """The request that made the lookup `read` goes no further: a lease it took is given
    back once it answers (at once if it has)."""

    def release(done: asyncio.Future[Lookup]) -> None:
        if not done.cancelled() and done.exception() is None:
            cache.release(key, done.result().lease)

    read.add_done_callback(release)


def _retrieved(read: asyncio.Future[Lookup]) -> None:
    """A read dropped, or never awaited by a request that failed first, logs nothing."""
    if not read.cancelled():
        read.exception()


def cache_plan(cache: ResponseCache, plan: Plan, outcome: Outcome) -> CachePlan | None:
    """The request's place in the cache, or None (and `outcome.cache` "bypass") when it
    bypasses it; a route that turns the cache off, or a key that opted out, is not counted
    at all."""
    place = cache_place(cache, plan) if plan.prefetched is None else plan.prefetched.place
    if isinstance(place, str):
        cache.bypass(place)
        outcome.cache = "bypass"
        return None
    return place


def cache_place(cache: ResponseCache, plan: Plan) -> CachePlan | str | None:
    """The request's place in the cache; the reason it bypasses the cache; or None where it
    is not the cache's business (a route that turns it off, a key that opted out)."""
    settings = cache.config
    route_cache = plan.route.config.cache
    if route_cache.enabled is False or not plan.call.cache:
        return None
    request = plan.request
    reason = None
    no_cache, no_store = directives(plan.call.headers)
    cache_all = settings.cache_all if route_cache.cache_all is None else route_cache.cache_all
    embeddings = request.endpoint is Endpoint.EMBEDDINGS
    if embeddings and embedding_items(request.payload) is None:
        reason = "not_cacheable"
    elif no_store:
        reason = "no_store"
    elif not embeddings and not cache_all and not is_deterministic(request.payload):
        reason = "not_deterministic"
    if reason is not None:
        return reason
    scope = settings.scope if route_cache.scope is None else route_cache.scope
    owner = GLOBAL_SCOPE if scope == "global" else f"key:{plan.call.caller or ''}"
    ttl_s = settings.ttl_s if route_cache.ttl_s is None else route_cache.ttl_s
    key = cache_key(request.endpoint.value, plan.route.name, owner, request.payload)
    return CachePlan(key, ttl_s, read=not no_cache, owner=owner)


def embedding_items(payload: dict[str, Any]) -> list[Any] | None:
    """An embeddings request's inputs, one per vector asked for: a string, or a list of
    token ids; None where the input is none of the shapes OpenAI defines (not cached)."""
    value = payload.get("input")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(item, str) for item in value):
        return list(value)
    if all(type(item) is int for item in value):
        return [value]
    if all(isinstance(item, list) and all(type(t) is int for t in item) for item in value):
        return list(value)
    return None


def complete_answer(body: bytes) -> dict[str, Any] | None:
    """The answer in `body` if it is whole (every choice finished, usage counted), else None."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(answer) is not dict:
        return None
    choices = answer.get("choices")
    if type(choices) is not list or not choices:
        return None
    for choice in choices:
        if type(choice) is not dict or choice.get("finish_reason") is None:
            return None
    usage = answer.get("usage")
    if type(usage) is not dict:
        return None
    if type(usage.get("prompt_tokens")) is not int:
        return None
    if type(usage.get("completion_tokens")) is not int:
        return None
    return answer


class Tee:
    """The stream's recorder when it is cacheable: the assembler of its answer beside the
    transcript resumption keeps (either may be absent)."""

    __slots__ = ("assembler", "transcript")

    def __init__(self, assembler: Assembler | None, transcript: Transcript | None) -> None:
        self.assembler = assembler
        self.transcript = transcript

    def record(self, payload: dict[str, Any]) -> None:
        if self.assembler is not None:
            self.assembler.record(payload)
        if self.transcript is not None:
            self.transcript.record(payload)


def answer_events(answer: dict[str, Any], *, chat: bool, with_usage: bool) -> bytes:
    """A whole answer as the stream that would have carried it: per choice its role (chat),
    its content and its finish; then the usage if the client asked for it, and [DONE]."""
    head = {
        "id": answer.get("id"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": answer.get("created"),
        "model": answer.get("model"),
    }
    events: list[bytes] = []

    def chunk(choice: dict[str, Any]) -> None:
        events.append(data_event(orjson.dumps({**head, "choices": [choice]})))

    for choice in answer.get("choices") or ():
        index = choice.get("index", 0)
        finish = {"finish_reason": choice.get("finish_reason")}
        if "stop_reason" in choice:
            finish["stop_reason"] = choice["stop_reason"]
        if chat:
            message = dict(choice.get("message") or {})
            role = message.pop("role", "assistant")
            chunk({"index": index, "delta": {"role": role}, "finish_reason": None})
            calls = message.get("tool_calls")
            if isinstance(calls, list):
                message["tool_calls"] = [
                    {"index": i, **call} if isinstance(call, dict) else call
                    for i, call in enumerate(calls)
                ]
            delta = {k: v for k, v in message.items() if v is not None}
            content = {"index": index, "delta": delta, "finish_reason": None}
            if choice.get("logprobs") is not None:
                content["logprobs"] = choice["logprobs"]
            chunk(content)
            chunk({"index": index, "delta": {}, **finish})
        else:
            text = {"index": index, "text": choice.get("text") or "", "finish_reason": None}
            text["logprobs"] = choice.get("logprobs")
            chunk(text)
            chunk({"index": index, "text": "", **finish})
    if with_usage:
        events.append(data_event(orjson.dumps({**head, "choices": [], "usage": answer["usage"]})))
    events.append(DONE_EVENT)
    return b"".join(events)


@dataclass(frozen=True, slots=True)
class Source:
    """What a response's X-VGate-Backend names when no backend answered it."""

    name: str


CACHE_SOURCE = Source("cache")


class CachedStream:
    """A stream answered from the cache: every event at once, in `first`."""

    __slots__ = ("backend", "dropped_events", "finish", "first", "route", "usage")

    def __init__(self, route: Route, first: bytes, usage: dict[str, Any]) -> None:
        self.route = route
        self.backend = CACHE_SOURCE
        self.first = first
        self.usage: dict[str, Any] | None = usage
        self.dropped_events = 0
        self.finish: Finish | None = None

    async def rest(self) -> AsyncIterator[bytes]:
        return
        yield  # an async generator with nothing after its first events

    def close(self) -> None:
        finish, self.finish = self.finish, None
        if finish is not None:
            finish(self)
