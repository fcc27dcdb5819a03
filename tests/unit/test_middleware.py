"""The middleware's last-resort guard, around an application that fails in ways it should not."""

from __future__ import annotations

import io
import logging

import httpx
import orjson
import pytest

from gateway.asgi import ASGIApp, Receive, Scope, Send
from gateway.edge.accesslog import AccessLog
from gateway.edge.metrics import GatewayMetrics
from gateway.edge.middleware import RequestContextMiddleware


async def failing_before_the_response(scope: Scope, receive: Receive, send: Send) -> None:
    raise KeyError("secret-internal-detail")


def guarded(app: ASGIApp) -> tuple[RequestContextMiddleware, io.BytesIO]:
    log = io.BytesIO()
    metrics = GatewayMetrics(models=["m"], backends=["b"])
    return RequestContextMiddleware(app, metrics=metrics, access_log=AccessLog(log)), log


async def test_a_bug_is_a_generic_openai_500_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, log = guarded(failing_before_the_response)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        response = await client.post("/v1/models", headers={"X-Request-ID": "req-42"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == "req-42"
    assert response.json() == {
        "error": {
            "message": "The gateway failed to handle this request (request id req-42).",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    for leak in ("Traceback", "KeyError", "secret-internal-detail", ".py"):
        assert leak not in response.text
    assert app.access_log is not None
    app.access_log.flush()  # lines are batched (gateway.edge.accesslog)
    line = orjson.loads(log.getvalue())
    assert (line["request_id"], line["status"], line["error"]) == ("req-42", 500, "internal_error")
    # The traceback is for the operators' log, under the same request id.
    (entry,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert entry.getMessage() == "unhandled error in request req-42"
    assert entry.exc_info is not None and entry.exc_info[0] is KeyError


async def test_a_bug_after_the_response_started_ends_it_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def failing_mid_response(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise KeyError("late")

    app, log = guarded(failing_mid_response)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        # Too late for an error status: the error goes on to the server (uvicorn), which
        # drops the connection, so the client sees a broken response, never a whole one.
        with pytest.raises(KeyError, match="late"):
            await client.post("/v1/chat/completions")
    assert app.access_log is not None
    app.access_log.flush()  # lines are batched (gateway.edge.accesslog)
    line = orjson.loads(log.getvalue())
    assert (line["status"], line["error"]) == (200, "internal_error")
    assert any(r.getMessage().startswith("unhandled error in request") for r in caplog.records)
