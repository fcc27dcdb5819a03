"""Every bad input and every upstream failure, as the client sees it."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from tests.e2e.conftest import new_request_id, wait_for_line
from tests.fake_upstream import FakeUpstream
from tests.servers import DEMO_KEY, Gateway, backend, free_port, gateway_config, start_gateway

MESSAGES = [{"role": "user", "content": "hi"}]
FAST = {"connect_s": 1, "first_token_s": 1.5, "idle_s": 0.5, "total_s": 3}
# One phase short, every other one and the whole request far longer than the client waits
# (CLIENT_TIMEOUT_S): only that phase's timeout can answer in time.
PHASE_S = 0.5
LONG = {"connect_s": 30, "first_token_s": 30, "idle_s": 30, "total_s": 60}
CLIENT_TIMEOUT_S = 8
# Each request meets its failure itself: no active health checks taking backends away.
UNCHECKED = {"enabled": False}
MODES = [
    "garbage",
    "reset",
    "hang",
    "stream_cut",
    "stream_stall",
    "stream_no_done",
    "stream_error_first",
    "stream_split_events",
    "stream_oversized",
]


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, FakeUpstream]]:
    fakes = {mode: FakeUpstream(mode) for mode in MODES}
    fakes["status500"] = FakeUpstream("status", status=500)
    fakes["status429"] = FakeUpstream(
        "status",
        status=429,
        body=b'{"error": {"message": "slow down", "type": "rate_limit", "code": 429}}',
    )
    fakes["status400"] = FakeUpstream(
        "status",
        status=400,
        body=b'{"error": {"message": "too long", "type": "BadRequestError", "code": 400}}',
    )
    fakes["status401"] = FakeUpstream("status", status=401)
    fakes["text404"] = FakeUpstream("status", status=404, body=b"nothing here")
    # A 200 whose `usage` is not an object: passed through, its tokens unknown.
    fakes["bad_usage"] = FakeUpstream(
        "status", status=200, body=b'{"object": "chat.completion", "choices": [], "usage": [1]}'
    )
    yield fakes
    for fake in fakes.values():
        fake.stop()


@pytest.fixture(scope="module")
def blackhole() -> Iterator[str]:
    """A listener that never accepts, its backlog full: connecting to it hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = [socket.socket() for _ in range(4)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(address)
    yield f"http://127.0.0.1:{address[1]}"
    for sock in (*fillers, listener):
        sock.close()


@pytest.fixture(scope="module")
def broken_gateway(
    logs: Path, upstreams: dict[str, FakeUpstream], blackhole: str
) -> Iterator[Gateway]:
    """One model route per failure mode, one whose backend is not listening, one that hangs."""
    models = [
        {
            "name": name,
            "timeouts": FAST,
            "health": UNCHECKED,
            # The failure itself is under test here; resuming it is test_resumption's.
            "resume": {"enabled": False},
            # Its whole JSON answer is the case under test: asked for as it was sent.
            **({"non_stream": "passthrough"} if name == "bad_usage" else {}),
            "backends": [backend(f"b-{name}", fake.url)],
        }
        for name, fake in upstreams.items()
    ]
    # A failed connect ejects a backend for a while: each stream mode gets its own route
    # so that one case's ejection cannot turn the other's error into a 503.
    nowhere = f"http://127.0.0.1:{free_port()}"
    for suffix in ("", "-s"):
        models.append(
            {
                "name": f"down{suffix}",
                "timeouts": FAST,
                "health": UNCHECKED,
                "backends": [backend(f"b-down{suffix}", nowhere)],
            }
        )
        models.append(
            {
                "name": f"blackhole{suffix}",
                "timeouts": FAST,
                "health": UNCHECKED,
                "backends": [backend(f"b-hole{suffix}", blackhole)],
            }
        )
    # Phase timeouts told apart: each route times out in one phase only (see LONG).
    once = {"max_retries": 0}
    models += [
        {
            "name": "phase-first-token",
            "timeouts": {**LONG, "first_token_s": PHASE_S},
            "health": UNCHECKED,
            "retries": once,
            "backends": [backend("b-phase-first-token", upstreams["hang"].url)],
        },
        {
            "name": "phase-idle",
            "timeouts": {**LONG, "idle_s": PHASE_S},
            "health": UNCHECKED,
            "resume": {"enabled": False},
            "backends": [backend("b-phase-idle", upstreams["stream_stall"].url)],
        },
        *(
            {
                "name": f"phase-connect{suffix}",
                "timeouts": {**LONG, "connect_s": PHASE_S},
                "health": UNCHECKED,
                "retries": once,
                "backends": [backend(f"b-phase-connect{suffix}", blackhole)],
            }
            for suffix in ("", "-s")
        ),
        {
            "name": "down-twice",
            "timeouts": FAST,
            "health": UNCHECKED,
            "backends": [backend("b-down-twice", nowhere)],
        },
    ]
    process = start_gateway(logs, gateway_config(models, max_body_bytes=2048))
    yield process
    process.stop()


@pytest.fixture
def client(broken_gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=broken_gateway.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=10
    )


def chat(client: openai.OpenAI, model: str, **extra: object) -> object:
    return client.chat.completions.create(model=model, messages=MESSAGES, **extra)


def error_of(exc: openai.APIStatusError) -> dict[str, object]:
    """The OpenAI error body, checked for its shape, and the same as what the SDK parsed."""
    body = exc.response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert exc.body == error and exc.type == error["type"]
    assert "Traceback" not in exc.response.text
    return error


def raises(
    call: Callable[[], object],
    kind: type[openai.APIStatusError],
    status: int,
    code: str | None,
    error_type: str,
    param: str | None = None,
) -> openai.APIStatusError:
    """`call` raises exactly `kind` (not merely a subclass of it) for `status`, with an
    OpenAI error body whose code, type and param are the ones given."""
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    exc = caught.value
    assert type(exc) is kind, f"{type(exc).__name__} raised for {status}, not {kind.__name__}"
    assert exc.status_code == status
    error = error_of(exc)
    assert (error["code"], error["type"], error["param"]) == (code, error_type, param)
    return exc


def sdk(gateway: Gateway, key: str = DEMO_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=10)


def test_missing_and_wrong_key_are_401(broken_gateway: Gateway) -> None:
    client = sdk(broken_gateway)
    without_key = {"Authorization": openai.omit}  # the SDK sends no Authorization at all
    exc = raises(
        lambda: client.models.list(extra_headers=without_key),
        openai.AuthenticationError,
        401,
        "missing_api_key",
        "invalid_request_error",
    )
    assert "Authorization: Bearer" in exc.message
    raises(
        lambda: chat(client, "garbage", extra_headers=without_key),
        openai.AuthenticationError,
        401,
        "missing_api_key",
        "invalid_request_error",
    )
    wrong = sdk(broken_gateway, key="vg-not-a-key")
    for call in (wrong.models.list, lambda: chat(wrong, "garbage")):
        raises(call, openai.AuthenticationError, 401, "invalid_api_key", "invalid_request_error")
    raises(
        lambda: client.models.list(extra_headers={"Authorization": "Basic x"}),
        openai.AuthenticationError,
        401,
        "invalid_api_key",
        "invalid_request_error",
    )


def test_unknown_model_is_404_naming_the_available_ones(client: openai.OpenAI) -> None:
    exc = raises(
        lambda: chat(client, "no-such-model"),
        openai.NotFoundError,
        404,
        "model_not_found",
        "invalid_request_error",
        param="model",
    )
    assert "no-such-model" in exc.message and "garbage" in exc.message


def test_unknown_path_is_404(client: openai.OpenAI) -> None:
    exc = raises(
        lambda: client.post("/nothing", cast_to=object, body={}),
        openai.NotFoundError,
        404,
        "not_found",
        "invalid_request_error",
    )
    assert "/v1/nothing" in exc.message


def test_wrong_method_is_405_with_allow(client: openai.OpenAI) -> None:
    # The SDK has no class of its own for 405: its base APIStatusError, exactly.
    exc = raises(
        lambda: client.get("/chat/completions", cast_to=object),
        openai.APIStatusError,
        405,
        "method_not_allowed",
        "invalid_request_error",
    )
    assert "POST" in exc.response.headers["allow"]
    assert "GET" in exc.message


def test_invalid_body_is_400_naming_the_field(client: openai.OpenAI) -> None:
    exc = raises(
        lambda: client.chat.completions.create(
            model="garbage", messages=[{"role": "robot", "content": "x"}]
        ),
        openai.BadRequestError,
        400,
        "invalid_value",
        "invalid_request_error",
        param="messages[0].role",
    )
    assert "messages[0].role" in exc.message
    exc = raises(
        lambda: chat(client, "garbage", max_tokens=-1),
        openai.BadRequestError,
        400,
        "invalid_value",
        "invalid_request_error",
        param="max_tokens",
    )
    assert "max_tokens" in exc.message


def test_invalid_json_is_400(client: openai.OpenAI) -> None:
    exc = raises(
        lambda: client.post(
            "/chat/completions",
            cast_to=object,
            content=b"{nope",
            options={"headers": {"Content-Type": "application/json"}},
        ),
        openai.BadRequestError,
        400,
        "invalid_json",
        "invalid_request_error",
    )
    assert "JSON" in exc.message


def test_body_over_the_limit_is_413(client: openai.OpenAI, broken_gateway: Gateway) -> None:
    # No class of its own for 413 either.
    raises(
        lambda: client.chat.completions.create(
            model="garbage", messages=[{"role": "user", "content": "x" * 4096}]
        ),
        openai.APIStatusError,
        413,
        "request_too_large",
        "invalid_request_error",
    )

    # Chunked upload without a Content-Length: the limit holds while reading.
    def body() -> Iterator[bytes]:
        yield b'{"model": "garbage", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 512
        yield b'"}]}'

    response = httpx.post(
        broken_gateway.url + "/v1/chat/completions",
        content=body(),
        headers={"Authorization": f"Bearer {DEMO_KEY}"},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_gateway_failures_are_internal_server_errors_by_status(client: openai.OpenAI) -> None:
    """502, 503 and 504 each arrive as the SDK's InternalServerError with their own status."""
    raises(
        lambda: chat(client, "garbage"),
        openai.InternalServerError,
        502,
        "bad_gateway",
        "upstream_error",
    )
    # A refused connection takes the only backend out for a while: the next request finds none.
    raises(
        lambda: chat(client, "down-twice"),
        openai.InternalServerError,
        502,
        "upstream_unreachable",
        "upstream_error",
    )
    exc = raises(
        lambda: chat(client, "down-twice"),
        openai.InternalServerError,
        503,
        "no_live_backend",
        "service_unavailable",
    )
    assert int(exc.response.headers["retry-after"]) >= 1
    raises(
        lambda: list(chat(client, "phase-first-token", stream=True)),  # type: ignore[call-overload]
        openai.InternalServerError,
        504,
        "upstream_timeout",
        "timeout",
    )


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("garbage", 502, "bad_gateway"),
        ("reset", 502, "bad_gateway"),
        ("status500", 502, "upstream_error"),
        ("status401", 502, "upstream_auth_failed"),
        ("down", 502, "upstream_unreachable"),
        ("hang", 504, "upstream_timeout"),
        ("blackhole", 504, "upstream_timeout"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_failures_before_the_first_byte(
    client: openai.OpenAI, model: str, status: int, code: str, stream: bool
) -> None:
    if stream and model in ("down", "blackhole"):
        model += "-s"
    with pytest.raises(openai.APIStatusError) as caught:
        result = chat(client, model, stream=stream)
        list(result)  # type: ignore[call-overload]
    assert caught.value.status_code == status
    assert error_of(caught.value)["code"] == code
    # The timeout that ended the request names itself. A hung request (a stream, or a
    # non-streaming one assembled from a stream) ends its first attempt at first_token_s
    # (1.5 s), and a backend that timed out is not asked again: the route's only backend is
    # done. Each phase on its own: the test_*_timeout_fires_on_its_own tests below.
    phase = {"hang": "timeouts.first_token_s", "blackhole": "timeouts.connect_s"}.get(
        model.removesuffix("-s")
    )
    if phase is not None:
        assert phase in caught.value.message


def timed(call: Callable[[], object]) -> tuple[BaseException, float]:
    """What `call` raised, and after how long."""
    start = time.monotonic()
    with pytest.raises(openai.APIError) as caught:
        call()
    return caught.value, time.monotonic() - start


# The client gives up after CLIENT_TIMEOUT_S, long before the routes' total_s (60 s): were the
# phase timeout not applied, these would end in the SDK's APITimeoutError, not a 504.
@pytest.mark.parametrize("stream", [False, True])
def test_connect_timeout_fires_on_its_own(broken_gateway: Gateway, stream: bool) -> None:
    client = sdk(broken_gateway).with_options(timeout=CLIENT_TIMEOUT_S)
    model = "phase-connect-s" if stream else "phase-connect"
    exc, took = timed(lambda: list(chat(client, model, stream=stream)))  # type: ignore[call-overload]
    assert type(exc) is openai.InternalServerError and exc.status_code == 504, exc
    assert error_of(exc)["code"] == "upstream_timeout"
    assert "did not accept a connection in time (timeouts.connect_s)" in exc.message
    assert PHASE_S <= took < CLIENT_TIMEOUT_S / 2


def test_first_token_timeout_fires_on_its_own(broken_gateway: Gateway) -> None:
    client = sdk(broken_gateway).with_options(timeout=CLIENT_TIMEOUT_S)
    exc, took = timed(
        lambda: list(chat(client, "phase-first-token", stream=True))  # type: ignore[call-overload]
    )
    assert type(exc) is openai.InternalServerError and exc.status_code == 504, exc
    assert error_of(exc)["code"] == "upstream_timeout"
    assert f"sent no first token within {PHASE_S:g}s (timeouts.first_token_s)" in exc.message
    assert PHASE_S <= took < CLIENT_TIMEOUT_S / 2


def test_idle_timeout_fires_on_its_own(broken_gateway: Gateway) -> None:
    client = sdk(broken_gateway).with_options(timeout=CLIENT_TIMEOUT_S)
    request_id = new_request_id()
    received: list[str | None] = []

    def consume() -> None:
        for chunk in chat(
            client,
            "phase-idle",
            stream=True,
            extra_headers={"X-Request-ID": request_id},
        ):
            received.append(chunk.choices[0].delta.content)  # type: ignore[union-attr]

    exc, took = timed(consume)
    # After the first byte: an error event the SDK raises as APIError, not an HTTP status.
    assert type(exc) is openai.APIError, exc
    assert received == ["Hello"]
    assert exc.code == "upstream_timeout"  # type: ignore[attr-defined]
    assert "sent nothing for 0.5s (timeouts.idle_s)" in exc.message  # type: ignore[attr-defined]
    assert PHASE_S <= took < CLIENT_TIMEOUT_S / 2
    entry = wait_for_line(broken_gateway, request_id)
    assert (entry["status"], entry["error"], entry["stream"]) == (200, "upstream_timeout", True)


def test_no_live_backend_after_refused_connections_is_503(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        chat(client, "down")
    with pytest.raises(openai.InternalServerError) as caught:
        chat(client, "down")
    assert caught.value.status_code == 503
    assert error_of(caught.value)["code"] == "no_live_backend"
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_upstream_client_errors_pass_through(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "status400")
    assert error_of(caught.value)["message"] == "too long"
    with pytest.raises(openai.RateLimitError) as caught:
        chat(client, "status429")
    assert caught.value.response.headers["retry-after"] == "7"
    with pytest.raises(openai.NotFoundError) as caught:
        chat(client, "text404")
    assert "answered 404" in str(error_of(caught.value)["message"])


def test_error_as_first_stream_event_is_an_http_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        list(chat(client, "stream_error_first", stream=True))  # type: ignore[call-overload]
    assert "maximum context length" in str(error_of(caught.value)["message"])


@pytest.mark.parametrize(
    ("model", "code"),
    [
        ("stream_cut", "upstream_stream_broken"),
        ("stream_stall", "upstream_timeout"),
        ("stream_oversized", "upstream_stream_broken"),
    ],
)
def test_mid_stream_failure_is_an_error_event_never_a_clean_end(
    broken_gateway: Gateway, model: str, code: str
) -> None:
    body = {"model": model, "messages": MESSAGES, "stream": True}
    with httpx.stream(
        "POST",
        broken_gateway.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {DEMO_KEY}"},
        timeout=10,
    ) as response:
        assert response.status_code == 200
        raw = b"".join(response.iter_raw())
    events = [e for e in raw.split(b"\n\n") if e]
    assert b"Hello" in events[0]
    assert b"[DONE]" not in raw
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == code
    assert all(e.startswith(b"data: {") for e in events)  # no half event was forwarded


def test_mid_stream_failure_raises_in_the_sdk(client: openai.OpenAI) -> None:
    received = []
    with pytest.raises(openai.APIError, match="broke off the stream"):
        for chunk in chat(client, "stream_cut", stream=True):  # type: ignore[union-attr]
            received.append(chunk.choices[0].delta.content)
    assert received == ["Hello", " world"]


def test_finished_stream_without_done_is_completed(client: openai.OpenAI) -> None:
    chunks = list(
        chat(
            client,
            "stream_no_done",
            stream=True,  # type: ignore[call-overload]
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == "Hello world"
    assert chunks[-1].usage.completion_tokens == 2


def test_events_split_into_bytes_are_reassembled(client: openai.OpenAI) -> None:
    chunks = list(chat(client, "stream_split_events", stream=True))  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content for c in chunks) == "Hello"


def test_request_id_is_echoed_and_sent_upstream(
    broken_gateway: Gateway, upstreams: dict[str, FakeUpstream]
) -> None:
    request_id = new_request_id()
    response = httpx.post(
        broken_gateway.url + "/v1/chat/completions",
        json={"model": "status400", "messages": MESSAGES},
        headers={"Authorization": f"Bearer {DEMO_KEY}", "X-Request-ID": request_id},
    )
    assert response.headers["x-request-id"] == request_id
    assert upstreams["status400"].requests[-1]["headers"]["x-request-id"] == request_id
    entry = wait_for_line(broken_gateway, request_id)
    assert (entry["status"], entry["model"], entry["backend"]) == (400, "status400", "b-status400")
    insane = httpx.post(
        broken_gateway.url + "/v1/chat/completions",
        json={},
        headers={"X-Request-ID": "has spaces and\ttabs"},
    )
    replaced = insane.headers["x-request-id"]
    assert replaced != "has spaces and\ttabs" and len(replaced) == 32
    entry = wait_for_line(broken_gateway, replaced)
    assert (entry["status"], entry["error"], entry["key"]) == (401, "missing_api_key", None)


def test_access_log_never_holds_prompt_or_key(
    client: openai.OpenAI, broken_gateway: Gateway
) -> None:
    secret_prompt = "the-secret-prompt-text"
    request_id = new_request_id()
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="garbage",
            messages=[{"role": "user", "content": secret_prompt}],
            extra_headers={"X-Request-ID": request_id},
        )
    # The line is written just after the response: wait for it, don't race it.
    entry = wait_for_line(broken_gateway, request_id)
    assert secret_prompt not in entry["_raw"] and DEMO_KEY not in entry["_raw"]
    assert (entry["key"], entry["model"], entry["backend"]) == ("demo", "garbage", "b-garbage")
    assert (entry["status"], entry["error"]) == (502, "bad_gateway") and entry["attempts"] >= 1
    assert entry["latency_ms"] >= entry["upstream_ms"] > 0
    log = broken_gateway.access_log_path.read_text()  # type: ignore[union-attr]
    assert secret_prompt not in log and DEMO_KEY not in log


def test_client_leaving_mid_upload_is_logged_as_499(broken_gateway: Gateway) -> None:
    port = int(broken_gateway.url.rsplit(":", 1)[1])
    request_id = new_request_id()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {DEMO_KEY}\r\nX-Request-ID: {request_id}\r\n".encode()
            + b"Content-Length: 1000\r\n\r\n"
            + b'{"model": "garbage", '
        )
    entry = wait_for_line(broken_gateway, request_id)
    assert entry["status"] == 499 and entry["error"] == "client_disconnected"
    assert entry["key"] == "demo" and entry["upstream_ms"] is None


def test_a_malformed_usage_is_passed_through_uncounted(
    client: openai.OpenAI, broken_gateway: Gateway
) -> None:
    """An upstream 200 whose `usage` is a list, not an object: the client gets the answer
    as it came, and the gateway counts no tokens rather than trip over it (this was a 500)."""
    request_id = new_request_id()
    response = client.chat.completions.with_raw_response.create(
        model="bad_usage",
        messages=MESSAGES,
        extra_headers={"X-Request-ID": request_id},
    )
    assert response.status_code == 200
    assert orjson.loads(response.content)["usage"] == [1]
    entry = wait_for_line(broken_gateway, request_id)
    assert (entry["status"], entry["error"]) == (200, None)
    assert entry["prompt_tokens"] is None and entry["completion_tokens"] is None
