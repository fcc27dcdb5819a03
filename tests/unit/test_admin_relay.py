"""The admin API's relay to sibling worker processes (gateway/edge/admin_relay.py) and its
channel, the peer sockets (gateway/runtime/peers.py), on real unix sockets."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.edge.admin_relay import AdminCall, AdminRelay, LocalApply, PeerAnswer
from gateway.edge.record import RequestRecord
from gateway.runtime.peers import ADMIN, PeerAdmin, PeerServer, socket_path

SECRET = b"Bearer admin-secret"


def call(method: str = "PUT", path: str = "/admin/chaos/x", body: bytes = b"{}") -> AdminCall:
    return AdminCall(method, path, b"a=1", SECRET, body, "req-1")


def test_an_admin_call_survives_its_encoding() -> None:
    original = AdminCall("DELETE", "/admin/cache", b"route=r%20x", None, b"\x00\xffbody", "id")
    assert AdminCall.decode(original.encode()) == original
    with pytest.raises(ValueError, match="not an admin path"):
        AdminCall.decode(AdminCall("POST", "/v1/chat", b"", None, b"", "").encode())
    with pytest.raises(ValueError, match="not an admin call"):
        AdminCall.decode(b'{"method": "POST"}')


async def _sibling(tmp_path: Path, index: int, apply: LocalApply) -> PeerServer:
    admin = PeerAdmin(run_dir=str(tmp_path), index=index, workers=3)
    admin.answer_with(apply)
    server = PeerServer(str(tmp_path), index, {ADMIN: admin.answer})
    await server.start()
    return server


def test_every_sibling_applies_the_call_and_a_dead_one_is_missing_at_once(tmp_path: Path) -> None:
    """Worker 0 of 3 relays to worker 1 (serving) and worker 2 (no socket: dead)."""
    applied: list[AdminCall] = []

    async def apply(received: AdminCall) -> tuple[int, bytes]:
        applied.append(received)
        return 200, b'{"ok": true}'

    async def relay() -> tuple[list[PeerAnswer], float]:
        server = await _sibling(tmp_path, 1, apply)
        try:
            assert stat.S_IMODE(os.stat(socket_path(str(tmp_path), 1)).st_mode) == 0o600
            admin = PeerAdmin(run_dir=str(tmp_path), index=0, workers=3, timeout_s=2.0)
            start = time.monotonic()
            answers = await admin.ask(call())
            return answers, time.monotonic() - start
        finally:
            await server.aclose()

    answers, took = asyncio.run(relay())
    assert applied == [call()]  # method, path, query, body, the admin key's header, the id
    assert answers[0] == PeerAnswer(1, 200, b'{"ok": true}', "")
    assert answers[1].worker == 2 and answers[1].status is None
    assert "no answer" in answers[1].reason
    assert took < 1.0  # nothing listens: refused at once, not waited for


def test_a_stuck_sibling_is_missing_after_the_bound(tmp_path: Path) -> None:
    """Worker 1 takes the connection and never answers (a blocked loop, say)."""

    async def relay() -> tuple[list[PeerAnswer], float]:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(30)

        stuck = await asyncio.start_unix_server(silent, path=socket_path(str(tmp_path), 1))
        try:
            admin = PeerAdmin(run_dir=str(tmp_path), index=0, workers=2, timeout_s=0.3)
            start = time.monotonic()
            answers = await admin.ask(call())
            return answers, time.monotonic() - start
        finally:
            stuck.close()

    answers, took = asyncio.run(relay())
    assert answers == [PeerAnswer(1, None, b"", "no answer within 0.3s")]
    assert 0.3 <= took < 2.0


def test_a_sibling_not_serving_yet_answers_503(tmp_path: Path) -> None:
    async def relay() -> list[PeerAnswer]:
        admin1 = PeerAdmin(run_dir=str(tmp_path), index=1, workers=2)  # no answer_with yet
        server = PeerServer(str(tmp_path), 1, {ADMIN: admin1.answer})
        await server.start()
        try:
            return await PeerAdmin(run_dir=str(tmp_path), index=0, workers=2).ask(call())
        finally:
            await server.aclose()

    assert asyncio.run(relay()) == [PeerAnswer(1, 503, b"", "")]


def test_a_sibling_whose_apply_breaks_answers_500(tmp_path: Path) -> None:
    async def broken(received: AdminCall) -> tuple[int, bytes]:
        raise RuntimeError("a bug")

    async def relay() -> list[PeerAnswer]:
        server = await _sibling(tmp_path, 1, broken)
        try:
            return await PeerAdmin(run_dir=str(tmp_path), index=0, workers=2).ask(call())
        finally:
            await server.aclose()

    assert asyncio.run(relay()) == [PeerAnswer(1, 500, b"", "")]


class FakeSiblings:
    """Siblings answering as they are told, recording what they were asked."""

    def __init__(self, answers: list[PeerAnswer]) -> None:
        self.workers = 1 + len(answers)
        self.answers = answers
        self.asked: list[AdminCall] = []
        self.apply: LocalApply | None = None

    async def ask(self, received: AdminCall) -> list[PeerAnswer]:
        self.asked.append(received)
        return self.answers

    def answer_with(self, apply: LocalApply) -> None:
        self.apply = apply


def admin_app(state: dict[str, Any]) -> Starlette:
    """A stand-in for the admin routes: checks the key, counts what it was asked."""

    def guarded(
        handler: Callable[[Request], Awaitable[dict[str, Any]]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            assert isinstance(request.scope["vgate.record"], RequestRecord)
            if request.headers.get("authorization", "").encode() != SECRET:
                return Response(b'{"error": {"message": "wrong key"}}', status_code=401)
            return Response(orjson.dumps(await handler(request)), media_type="application/json")

        return endpoint

    async def start(request: Request) -> dict[str, Any]:
        state.setdefault("started", []).append(await request.body())
        return {"object": "chaos.experiment", "name": request.path_params["name"]}

    async def listing(request: Request) -> dict[str, Any]:
        return {"data": [{"name": "x", "matched": 2, "picked": 2, "injected": 1}]}

    async def clear(request: Request) -> dict[str, Any]:
        return {"object": "cache.deleted", "deleted": 3}

    return Starlette(
        routes=[
            Route("/admin/chaos/{name}", guarded(start), methods=["PUT"]),
            Route("/admin/chaos", guarded(listing), methods=["GET"]),
            Route("/admin/cache", guarded(clear), methods=["DELETE"]),
        ]
    )


async def _with_record(app: AdminRelay, scope: Any, receive: Any, send: Any) -> None:
    scope["vgate.record"] = RequestRecord("req-1", 0.0, scope["method"], scope["path"])
    await app(scope, receive, send)


def request(relay: AdminRelay, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=lambda s, r, w: _with_record(relay, s, r, w))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_a_change_applied_here_is_relayed_and_the_answer_counts_the_workers() -> None:
    state: dict[str, Any] = {}
    sibling = PeerAnswer(1, 200, b'{"name": "x"}', "")
    siblings = FakeSiblings([sibling])
    relay = AdminRelay(admin_app(state), siblings)
    response = request(
        relay,
        "PUT",
        "/admin/chaos/x?a=1",
        content=b'{"fault": 1}',
        headers={"Authorization": SECRET.decode()},
    )
    assert response.status_code == 200
    assert response.json() == {
        "object": "chaos.experiment",
        "name": "x",
        "workers": {"applied": 2, "missing": 0, "failed": 0},
    }
    assert int(response.headers["content-length"]) == len(response.content)
    assert state["started"] == [b'{"fault": 1}']
    [asked] = siblings.asked
    assert (asked.method, asked.path, asked.query) == ("PUT", "/admin/chaos/x", b"a=1")
    assert (asked.body, asked.authorization, asked.request_id) == (b'{"fault": 1}', SECRET, "req-1")


def test_a_call_refused_here_goes_nowhere() -> None:
    siblings = FakeSiblings([PeerAnswer(1, 200, b"{}", "")])
    relay = AdminRelay(admin_app({}), siblings)
    response = request(relay, "PUT", "/admin/chaos/x", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401
    assert "workers" not in response.json()
    assert siblings.asked == []


def test_a_sibling_missing_or_failing_is_said_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    siblings = FakeSiblings(
        [
            PeerAnswer(1, None, b"", "no answer within 2s"),
            PeerAnswer(2, 409, b'{"error": {"message": "chaos is disabled"}}', ""),
            PeerAnswer(3, 200, b'{"deleted": 4}', ""),
        ]
    )
    relay = AdminRelay(admin_app({}), siblings)
    response = request(relay, "DELETE", "/admin/cache", headers={"Authorization": SECRET.decode()})
    assert response.status_code == 200  # applied here
    body = response.json()
    assert body["deleted"] == 3 + 4  # every worker that applied it
    assert body["workers"] == {
        "applied": 2,
        "missing": 1,
        "failed": 1,
        "problems": [
            {"worker": 1, "status": None, "reason": "no answer within 2s"},
            {"worker": 2, "status": 409, "reason": "chaos is disabled"},
        ],
    }
    logged = [r.getMessage() for r in caplog.records if r.name == "vgate.admin"]
    assert any("worker 1 did not apply it: no answer within 2s" in m for m in logged), logged
    assert any("worker 2 did not apply it: 409 chaos is disabled" in m for m in logged), logged


def test_a_read_of_counts_sums_the_workers() -> None:
    other = {"data": [{"name": "x", "matched": 5, "picked": 4, "injected": 3}]}
    siblings = FakeSiblings([PeerAnswer(1, 200, orjson.dumps(other), "")])
    relay = AdminRelay(admin_app({}), siblings)
    response = request(relay, "GET", "/admin/chaos", headers={"Authorization": SECRET.decode()})
    assert response.json() == {
        "data": [{"name": "x", "matched": 7, "picked": 6, "injected": 4}],
        "workers": {"answered": 2, "missing": 0, "failed": 0},
    }


def test_a_siblings_call_is_applied_by_the_admin_app_which_checks_the_key_again() -> None:
    state: dict[str, Any] = {}
    siblings = FakeSiblings([])
    AdminRelay(admin_app(state), siblings)
    assert siblings.apply is not None
    apply = siblings.apply
    status, body = asyncio.run(apply(call(body=b'{"fault": 2}')))
    assert (status, orjson.loads(body)["name"]) == (200, "x")
    assert state["started"] == [b'{"fault": 2}']
    forged = AdminCall("PUT", "/admin/chaos/y", b"", b"Bearer forged", b"{}", "")
    assert asyncio.run(apply(forged))[0] == 401
    assert state["started"] == [b'{"fault": 2}']
    assert siblings.asked == []  # a sibling's call is never relayed again
