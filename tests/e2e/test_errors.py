"""Every bad input and every upstream failure, as the client sees it."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from tests.fake_upstream import FakeUpstream
from tests.servers import DEMO_KEY, Gateway, backend, free_port, gateway_config, start_gateway

MESSAGES = [{"role": "user", "content": "hi"}]
FAST = {"connect_s": 1, "first_token_s": 1.5, "idle_s": 0.5, "total_s": 3}
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
    body = exc.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_missing_and_wrong_key_are_401(broken_gateway: Gateway) -> None:
    client = openai.OpenAI(
        base_url=broken_gateway.url + "/v1", api_key="vg-not-a-key", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert error_of(caught.value)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="garbage", messages=MESSAGES)
    response = httpx.post(broken_gateway.url + "/v1/chat/completions", json={})
    assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"
    response = httpx.get(broken_gateway.url + "/v1/models", headers={"Authorization": "Basic x"})
    assert response.status_code == 401


def test_unknown_model_is_404_naming_the_available_ones(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        chat(client, "no-such-model")
    error = error_of(caught.value)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "no-such-model" in error["message"] and "garbage" in error["message"]


def test_invalid_body_is_400_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="garbage", messages=[{"role": "robot", "content": "x"}]
        )
    assert error_of(caught.value)["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "garbage", max_tokens=-1)
    assert error_of(caught.value)["param"] == "max_tokens"


def test_invalid_json_is_400(broken_gateway: Gateway) -> None:
    response = httpx.post(
        broken_gateway.url + "/v1/chat/completions",
        content=b"{nope",
        headers={"Authorization": f"Bearer {DEMO_KEY}"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_body_over_the_limit_is_413(client: openai.OpenAI, broken_gateway: Gateway) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="garbage", messages=[{"role": "user", "content": "x" * 4096}]
        )
    assert caught.value.status_code == 413
    assert error_of(caught.value)["code"] == "request_too_large"

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


def test_wrong_method_and_unknown_path(broken_gateway: Gateway) -> None:
    response = httpx.get(broken_gateway.url + "/v1/chat/completions")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in response.headers["allow"]
    response = httpx.post(broken_gateway.url + "/v1/nothing", json={})
    assert (
        response.status_code == 404 and response.json()["error"]["type"] == "invalid_request_error"
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
    response = httpx.post(
        broken_gateway.url + "/v1/chat/completions",
        json={"model": "status400", "messages": MESSAGES},
        headers={"Authorization": f"Bearer {DEMO_KEY}", "X-Request-ID": "trace-abc-123"},
    )
    assert response.headers["x-request-id"] == "trace-abc-123"
    assert upstreams["status400"].requests[-1]["headers"]["x-request-id"] == "trace-abc-123"
    insane = httpx.post(
        broken_gateway.url + "/v1/chat/completions",
        json={},
        headers={"X-Request-ID": "has spaces and\ttabs"},
    )
    assert insane.headers["x-request-id"] != "has spaces and\ttabs"
    entry = broken_gateway.wait_for_log(1)
    assert any(e["request_id"] == "trace-abc-123" and e["status"] == 400 for e in entry)


def test_access_log_never_holds_prompt_or_key(
    client: openai.OpenAI, broken_gateway: Gateway
) -> None:
    secret_prompt = "the-secret-prompt-text"
    before = len(broken_gateway.access_log())
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(
            model="garbage", messages=[{"role": "user", "content": secret_prompt}]
        )
    # The line is written just after the response: wait for it, don't race it.
    entry = broken_gateway.wait_for_log(before + 1)[-1]
    log = broken_gateway.access_log_path.read_text()  # type: ignore[union-attr]
    assert secret_prompt not in log and DEMO_KEY not in log
    assert entry["key"] == "demo" and entry["model"] == "garbage" and entry["status"] == 502
    assert entry["backend"] == "b-garbage"


def test_client_leaving_mid_upload_is_logged_as_499(broken_gateway: Gateway) -> None:
    port = int(broken_gateway.url.rsplit(":", 1)[1])
    before = len(broken_gateway.access_log())
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {DEMO_KEY}\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"model": "garbage", '
        )
    entry = broken_gateway.wait_for_log(before + 1)[-1]
    assert entry["status"] == 499 and entry["error"] == "client_disconnected"
