"""The admin API of a server of several worker processes (`server.workers` > 1).

Each worker holds its own chaos experiments, memory cache, config and keys, so an admin call
must reach them all. `AdminRelay` wraps the admin app: a call that changes something (POST,
PUT, DELETE under /admin/) is applied here first, as with one process; only once that
succeeded (so the admin key is the right one and the call valid) is the same call (method,
path, query, body, the admin key's header: each sibling checks it again) sent to every
sibling (`Siblings`: gateway/runtime/peers.py), each answer awaited for a bounded time. The
client gets this worker's answer with `"workers": {"applied", "missing", "failed"}` added;
a sibling that did not answer in time (`missing`: dead, restarting, stuck; it may still
apply the call) or answered an error (`failed`) is logged and listed in `workers.problems`.
A call that failed here is answered as it is, and sent nowhere.

Reads that count what each process saw are answered for the whole server, the siblings asked
the same way (`MERGED_READS`): `GET /admin/chaos` (each experiment's counts summed),
`GET /admin/cache` (hits, misses, bypasses and evictions summed; a memory store's entries and
bytes summed), `GET /admin/keys/{id}` (`process_usage` summed: its scope "server"). Other
reads are the same in every worker and answered by this one alone. `DELETE /admin/cache`
answers the entries deleted in every worker that applied it.

With one worker there is no relay at all: the admin app is served as it is.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from gateway.asgi import ASGIApp, Message, Receive, Scope, Send, header, read_body
from gateway.edge.record import RequestRecord
from gateway.errors import BodyTooLarge, PayloadTooLarge, clip

logger = logging.getLogger("vgate.admin")

RELAYED_METHODS = frozenset({"POST", "PUT", "DELETE"})
MAX_ADMIN_BODY_BYTES = 256 * 1024  # the largest admin body, a chaos experiment, is 64 KiB


@dataclass(frozen=True)
class AdminCall:
    """One admin API call as a sibling applies it."""

    method: str
    path: str
    query: bytes
    authorization: bytes | None
    body: bytes
    request_id: str

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "method": self.method,
                "path": self.path,
                "query": self.query.decode("latin-1"),
                "authorization": (
                    None if self.authorization is None else self.authorization.decode("latin-1")
                ),
                "body": base64.b64encode(self.body).decode("ascii"),
                "request_id": self.request_id,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> AdminCall:
        try:
            raw = orjson.loads(data)
            authorization = raw["authorization"]
            call = cls(
                method=str(raw["method"]),
                path=str(raw["path"]),
                query=str(raw["query"]).encode("latin-1"),
                authorization=None if authorization is None else authorization.encode("latin-1"),
                body=base64.b64decode(raw["body"], validate=True),
                request_id=str(raw["request_id"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an admin call: {exc}") from None
        if not call.path.startswith("/admin/"):
            raise ValueError(f"not an admin path: {clip(call.path)}")
        return call


@dataclass(frozen=True)
class PeerAnswer:
    """A sibling's answer: its status and body, or None and why there was none."""

    worker: int
    status: int | None
    body: bytes
    reason: str


LocalApply = Callable[[AdminCall], Coroutine[Any, Any, tuple[int, bytes]]]


class Siblings(Protocol):
    """The other workers of this server (gateway.runtime.peers.PeerAdmin)."""

    workers: int  # the server's, this one included

    async def ask(self, call: AdminCall) -> list[PeerAnswer]: ...

    def answer_with(self, apply: LocalApply) -> None: ...


Merge = Callable[[dict[str, Any], list[dict[str, Any]]], None]


class AdminRelay:
    """The admin app, wrapped: see the module's docstring. Anything not under /admin/ goes
    straight to `app`."""

    def __init__(self, app: ASGIApp, siblings: Siblings) -> None:
        self._app = app
        self._siblings = siblings
        siblings.answer_with(self.apply)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if not path.startswith("/admin/"):
            await self._app(scope, receive, send)
            return
        method = scope["method"]
        merge = _merge_for(method, path)
        if method not in RELAYED_METHODS and merge is None:
            await self._app(scope, receive, send)  # the same in every worker
            return
        try:
            body = await read_body(scope, receive, MAX_ADMIN_BODY_BYTES)
        except BodyTooLarge:
            error = PayloadTooLarge(
                f"An admin call's body is at most {MAX_ADMIN_BODY_BYTES} bytes."
            )
            await _send(send, error.status, [(b"content-type", b"application/json")], error.body())
            return
        status, headers, content = await _run(self._app, scope, body, receive)
        if status >= 400:  # not applied here (or refused): sent nowhere
            await _send(send, status, headers, content)
            return
        record = scope.get("vgate.record")
        call = AdminCall(
            method=method,
            path=path,
            query=scope.get("query_string", b""),
            authorization=header(scope, b"authorization"),
            body=body,
            request_id=record.request_id if isinstance(record, RequestRecord) else "",
        )
        answers = await self._siblings.ask(call)
        content = self._with_workers(call, content, answers, merge)
        await _send(send, status, headers, content)

    def _with_workers(
        self,
        call: AdminCall,
        content: bytes,
        answers: list[PeerAnswer],
        merge: Merge | None,
    ) -> bytes:
        relayed = call.method in RELAYED_METHODS
        ok: list[dict[str, Any]] = []
        problems: list[dict[str, Any]] = []
        missing = failed = 0
        for answer in answers:
            parsed = _json_object(answer.body) if answer.status is not None else None
            if answer.status is None or (answer.status < 400 and parsed is None):
                missing += 1
                reason = answer.reason or "an answer that is not a JSON object"
                problem = {"worker": answer.worker, "status": None, "reason": reason}
            elif answer.status >= 400:
                failed += 1
                problem = {
                    "worker": answer.worker,
                    "status": answer.status,
                    "reason": _reason(answer.body),
                }
            else:
                assert parsed is not None
                ok.append(parsed)
                continue
            problems.append(problem)
            logger.warning(
                "admin %s %s: worker %d %s: %s",
                call.method,
                call.path,
                answer.worker,
                "did not apply it" if relayed else "not counted",
                problem["reason"]
                if problem["status"] is None
                else f"{problem['status']} {problem['reason']}",
            )
        local = _json_object(content)
        if local is None:  # not JSON: nothing to add it to
            return content
        if merge is not None:
            merge(local, ok)
        workers: dict[str, Any] = {
            "applied" if relayed else "answered": 1 + len(ok),
            "missing": missing,
            "failed": failed,
        }
        if problems:
            workers["problems"] = problems
        local["workers"] = workers
        return orjson.dumps(local)

    async def apply(self, call: AdminCall) -> tuple[int, bytes]:
        """A sibling's call, applied here by the admin app alone (never relayed again);
        the admin key is checked again, as for any call."""
        headers = [(b"content-length", str(len(call.body)).encode("ascii"))]
        if call.authorization is not None:
            headers.append((b"authorization", call.authorization))
        if call.request_id:
            headers.append((b"x-request-id", call.request_id.encode("ascii", "replace")))
        record = RequestRecord(call.request_id, 0.0, call.method, call.path)
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": call.method,
            "scheme": "http",
            "path": call.path,
            "raw_path": call.path.encode("latin-1", "replace"),
            "query_string": call.query,
            "root_path": "",
            "headers": headers,
            "client": None,
            "server": None,
            "vgate.record": record,
        }
        status, _headers, content = await _run(self._app, scope, call.body, None)
        return status, content


async def _run(
    app: ASGIApp, scope: Scope, body: bytes, receive: Receive | None
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """`app`'s whole answer to a request whose body was read already."""
    sent = False
    status = 500
    headers: list[tuple[bytes, bytes]] = []
    parts: list[bytes] = []

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is not None:
            return await receive()  # the client's disconnect, should it come
        return {"type": "http.disconnect"}

    async def capture(message: Message) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = list(message.get("headers", ()))
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))

    await app(scope, replay, capture)
    return status, headers, b"".join(parts)


async def _send(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], content: bytes
) -> None:
    kept = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    kept.append((b"content-length", str(len(content)).encode("ascii")))
    await send({"type": "http.response.start", "status": status, "headers": kept})
    await send({"type": "http.response.body", "body": content})


def _json_object(content: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _reason(body: bytes) -> str:
    error = (_json_object(body) or {}).get("error")
    message = error.get("message") if isinstance(error, dict) else None
    return clip(str(message)) if message else "an error"


# What each read sums over the workers; the answering worker's body holds the rest.


def _number(value: Any) -> float:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _sum_fields(
    into: dict[str, Any], others: list[dict[str, Any]], fields: tuple[str, ...]
) -> None:
    for field in fields:
        if isinstance(into.get(field), int | float):
            into[field] = into[field] + sum(_number(o.get(field)) for o in others)


def merge_chaos(local: dict[str, Any], others: list[dict[str, Any]]) -> None:
    """GET /admin/chaos: each experiment's counts summed by its name (every worker got the
    same starts and stops: the rest is as this worker sees it)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for other in others:
        for experiment in other.get("data") or ():
            if isinstance(experiment, dict):
                by_name.setdefault(str(experiment.get("name")), []).append(experiment)
    for experiment in local.get("data") or ():
        if isinstance(experiment, dict):
            same = by_name.get(str(experiment.get("name")), [])
            _sum_fields(experiment, same, ("matched", "picked", "injected"))


def merge_cache(local: dict[str, Any], others: list[dict[str, Any]]) -> None:
    """GET /admin/cache: each process's lookups summed; a memory store's size too (each
    process holds its own; Redis's is one store, counted once)."""
    _sum_fields(local, others, ("hits", "misses", "coalesced", "evictions"))
    if local.get("backend") == "memory":
        _sum_fields(local, others, ("entries", "bytes"))
    bypasses = local.get("bypasses")
    if isinstance(bypasses, dict):
        for other in others:
            for reason, count in (other.get("bypasses") or {}).items():
                bypasses[reason] = bypasses.get(reason, 0) + _number(count)
    looked = sum(_number(local.get(f)) for f in ("hits", "misses", "coalesced"))
    if "hit_ratio" in local:
        hits = _number(local.get("hits")) + _number(local.get("coalesced"))
        local["hit_ratio"] = None if not looked else round(hits / looked, 4)


def merge_usage(local: dict[str, Any], others: list[dict[str, Any]]) -> None:
    """GET /admin/keys/{id}: `process_usage` summed over the workers (scope "server")."""
    usage = local.get("process_usage")
    if not isinstance(usage, dict):
        return
    theirs = [o["process_usage"] for o in others if isinstance(o.get("process_usage"), dict)]
    day = usage.get("day")
    theirs = [u for u in theirs if u.get("day") == day]  # one that turned the day: nothing yet
    own_tokens = _number(usage.get("tokens_today"))
    fields = ("requests_today", "prompt_tokens_today", "completion_tokens_today", "tokens_today")
    _sum_fields(usage, theirs, fields)
    remaining = usage.get("remaining")
    if isinstance(remaining, dict) and isinstance(remaining.get("tokens_per_day"), int | float):
        # This process's remaining plus its own tokens is the key's tokens_per_day (or this
        # process alone went over it, and so did the server).
        per_day = remaining["tokens_per_day"] + own_tokens
        remaining["tokens_per_day"] = max(0, per_day - _number(usage.get("tokens_today")))
    usage["scope"] = "server"


_KEY_PATH = re.compile(r"/admin/keys/[^/]+")
_CACHE_DELETE_FIELDS = ("deleted",)


def _merge_for(method: str, path: str) -> Merge | None:
    if method == "GET":
        if path == "/admin/chaos":
            return merge_chaos
        if path == "/admin/cache":
            return merge_cache
        if _KEY_PATH.fullmatch(path):
            return merge_usage
        return None
    if method == "DELETE" and path == "/admin/cache":
        return lambda local, others: _sum_fields(local, others, _CACHE_DELETE_FIELDS)
    return None
