"""Streams that end badly after content reached the client, and the one deadline.

Two endings the failure-mode tests of test_errors.py do not act out, both after the
client holds part of the answer: an upstream that closes its chunked body cleanly but
before any `finish_reason` and without `[DONE]` (Portkey #1797), and one that reports an
error event mid-stream. Where resumption cannot help the client gets the content, then
an error event naming the code and no `[DONE]`; where another backend can go on, one
whole answer. Then: `timeouts.total_s` bounds a request across retries and fallbacks.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.fake_upstream import FakeUpstream
from tests.servers import (
    DEMO_KEY,
    Gateway,
    Process,
    backend,
    gateway_config,
    start_gateway,
    start_sim,
)

MESSAGES = [{"role": "user", "content": "tell me about rivers"}]
MAX_TOKENS = 60
DELIVERED = 12  # tokens the failing backend delivers before its stream ends badly
TIMEOUTS = {"connect_s": 1, "first_token_s": 5, "idle_s": 5, "total_s": 20}
UNCHECKED = {"enabled": False}  # each request meets the failure itself
NO_BREAKER = {"consecutive_failures": 1000, "min_requests": 1000}
FIRST = {"weight": 1000}  # the failing backend is picked first
NO_PREFILL = {"continue_final_message": False}
UNSCRAPED = {"scrape_metrics": False}  # a fake's every answer is its failure

ENDINGS = ["stream_end_early", "stream_error_mid"]
CODE = {
    "stream_end_early": "upstream_stream_incomplete",
    "stream_error_mid": "upstream_stream_error",
}
SAYS = {
    "stream_end_early": "ended the stream before the answer finished",
    "stream_error_mid": "reported an error mid-stream: CUDA error",
}
SHORT = {"stream_end_early": "end", "stream_error_mid": "error"}


def fake_backend(name: str, fake: FakeUpstream, **extra: Any) -> dict[str, Any]:
    return backend(name, fake.url, **UNSCRAPED, **extra)


def answers(fake: FakeUpstream) -> int:
    """The requests a fake was sent for an answer (not health checks or scrapes)."""
    return sum(1 for request in fake.requests if request["path"].startswith("/v1/"))


@pytest.fixture(scope="module")
def sim(logs: Path) -> Iterator[Process]:
    process = start_sim(logs)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def reference(sim: Process) -> list[str]:
    """The sim's answer to MESSAGES, one text piece per token: what a resumed stream must be."""
    body = {
        "model": "tiny-llama",
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "stream": True,
    }
    with httpx.stream("POST", sim.url + "/v1/chat/completions", json=body, timeout=10) as reply:
        reply.raise_for_status()
        raw = b"".join(reply.iter_bytes())
    pieces = [
        choice["delta"].get("content") or ""
        for payload in payloads(raw)
        for choice in payload.get("choices") or []
    ]
    pieces = [piece for piece in pieces if piece]
    assert len(pieces) == MAX_TOKENS
    return pieces


@pytest.fixture(scope="module")
def fakes(reference: list[str]) -> Iterator[dict[str, FakeUpstream]]:
    head = tuple(reference[:DELIVERED])
    started = {
        # "Hello", " world", then the ending.
        "end": FakeUpstream("stream_end_early"),
        "error": FakeUpstream("stream_error_mid"),
        "end-alone": FakeUpstream("stream_end_early"),
        # The start of the sim's own answer, then the ending: the sim can go on from it.
        "end-resumed": FakeUpstream("stream_end_early", texts=head),
        "error-resumed": FakeUpstream("stream_error_mid", texts=head),
        # The last delivered token arrives in the same write as the error event.
        "error-late": FakeUpstream("stream_error_mid", texts=head[:-1], late_texts=head[-1:]),
    }
    yield started
    for fake in started.values():
        fake.stop()


@pytest.fixture(scope="module")
def gateway(logs: Path, sim: Process, fakes: dict[str, FakeUpstream]) -> Iterator[Gateway]:
    def route(name: str, *backends: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "timeouts": TIMEOUTS,
            "health": UNCHECKED,
            "breaker": NO_BREAKER,
            "backends": list(backends),
            **extra,
        }

    models = [
        # Nothing can help: resumption off.
        route("end", fake_backend("b-end", fakes["end"]), resume={"enabled": False}),
        route("error", fake_backend("b-error", fakes["error"]), resume={"enabled": False}),
        # Resumption on, but the only backend is the one that fails (regenerating, so that
        # what the fake sends again is matched against what the client has, not appended).
        route("end-alone", fake_backend("b-alone", fakes["end-alone"], **NO_PREFILL)),
    ]
    for fake in ("end-resumed", "error-resumed", "error-late"):
        for mode, options in (("prefill", {}), ("regenerate", NO_PREFILL)):
            name = f"{fake}-{mode}"
            models.append(
                route(
                    name,
                    fake_backend(f"{name}-fake", fakes[fake], model="tiny-llama", **FIRST),
                    backend(f"{name}-sim", sim.url, model="tiny-llama", **options),
                )
            )
    process = start_gateway(logs, gateway_config(models))
    yield process
    process.stop()


@pytest.fixture
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=20
    ) as sdk:
        yield sdk


def payloads(raw: bytes) -> list[dict[str, Any]]:
    """The JSON data events of a raw SSE body, in order ([DONE] left out)."""
    return [
        orjson.loads(event.removeprefix(b"data: "))
        for event in raw.split(b"\n\n")
        if event.strip() and event != b"data: [DONE]"
    ]


def raw_stream(
    gateway: Gateway, model: str, request_id: str, fake: FakeUpstream | None = None
) -> bytes:
    """A streamed chat request's raw SSE body; `fake` is released once content has come."""
    body = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {DEMO_KEY}", "X-Request-ID": request_id}
    received = b""
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=20
    ) as response:
        assert response.status_code == 200, response.read()
        for data in response.iter_raw():
            received += data
            if fake is not None and b'"content"' in received:
                fake.release()
    return received


def entry_for(gateway: Gateway, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        entries = [e for e in gateway.access_log() if e["request_id"] == request_id]
        if entries or time.monotonic() > deadline:
            assert len(entries) == 1, entries
            return entries[0]
        time.sleep(0.02)


def new_request_id() -> str:
    return f"endings-{uuid.uuid4().hex}"


@pytest.mark.parametrize("ending", ENDINGS)
def test_an_unresumable_bad_ending_is_an_error_event_never_done(
    gateway: Gateway, fakes: dict[str, FakeUpstream], ending: str
) -> None:
    fake = fakes[SHORT[ending]]
    fake.hold()
    request_id = new_request_id()
    raw = raw_stream(gateway, SHORT[ending], request_id, fake)
    assert b"[DONE]" not in raw
    events = [event for event in raw.split(b"\n\n") if event]
    assert all(event.startswith(b"data: {") for event in events)
    *content, last = payloads(raw)
    texts = [choice["delta"]["content"] for p in content for choice in p["choices"]]
    assert texts == ["", "Hello", " world"]  # the role chunk, then everything sent
    assert all("error" not in p for p in content)  # the upstream's own error is not passed on
    error = last["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == CODE[ending]
    assert SAYS[ending] in error["message"] and f"b-{SHORT[ending]}" in error["message"]
    entry = entry_for(gateway, request_id)
    assert entry["status"] == 200 and entry["stream"] is True
    assert entry["error"] == CODE[ending]
    assert entry["backend"] == f"b-{SHORT[ending]}" and entry["resumptions"] == 0


@pytest.mark.parametrize("ending", ENDINGS)
def test_an_unresumable_bad_ending_raises_in_the_sdk(
    gateway: Gateway, client: openai.OpenAI, fakes: dict[str, FakeUpstream], ending: str
) -> None:
    fake = fakes[SHORT[ending]]
    fake.hold()
    request_id = new_request_id()
    received: list[str | None] = []
    with pytest.raises(openai.APIError, match=SAYS[ending]) as caught:
        for chunk in client.chat.completions.create(
            model=SHORT[ending],
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            extra_headers={"X-Request-ID": request_id},
        ):
            received.append(chunk.choices[0].delta.content)
            fake.release()
    assert received == ["", "Hello", " world"]
    assert caught.value.code == CODE[ending]
    assert entry_for(gateway, request_id)["error"] == CODE[ending]


def test_an_unfinished_stream_with_only_its_own_backend_is_not_resumed(
    gateway: Gateway, client: openai.OpenAI, fakes: dict[str, FakeUpstream]
) -> None:
    request_id = new_request_id()
    received: list[str | None] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(
            model="end-alone",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            extra_headers={"X-Request-ID": request_id},
        ):
            received.append(chunk.choices[0].delta.content)
    # Regenerated twice on the same backend, which reproduced the text and ended again:
    # nothing was sent twice, and the client learns what broke.
    assert received == ["", "Hello", " world"]
    assert caught.value.code == "upstream_stream_incomplete"
    assert "It was not resumed: it was already resumed 2 times" in caught.value.message
    entry = entry_for(gateway, request_id)
    assert entry["error"] == "upstream_stream_incomplete" and entry["resumptions"] == 2
    assert answers(fakes["end-alone"]) == 3


def assert_one_whole_answer(raw: bytes, expected: str) -> None:
    assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b"[DONE]") == 1
    events = payloads(raw)
    assert all("error" not in p for p in events)
    choices = [choice for p in events for choice in p.get("choices") or []]
    assert "".join(choice["delta"].get("content") or "" for choice in choices) == expected
    assert sum(1 for choice in choices if choice["delta"].get("role")) == 1
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["length"]
    assert choices[-1]["finish_reason"] == "length"
    assert len({p["id"] for p in events}) == 1  # one answer, one id
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == MAX_TOKENS


@pytest.mark.parametrize("mode", ["prefill", "regenerate"])
@pytest.mark.parametrize("ending", ENDINGS)
def test_a_bad_ending_is_resumed_as_one_whole_answer(
    gateway: Gateway,
    fakes: dict[str, FakeUpstream],
    reference: list[str],
    ending: str,
    mode: str,
) -> None:
    fake = fakes[f"{SHORT[ending]}-resumed"]
    fake.hold()
    request_id = new_request_id()
    model = f"{SHORT[ending]}-resumed-{mode}"
    raw = raw_stream(gateway, model, request_id, fake)
    assert_one_whole_answer(raw, "".join(reference))
    entry = entry_for(gateway, request_id)
    assert entry["status"] == 200 and entry["error"] is None
    assert entry["resumptions"] == 1 and entry["backend"] == f"{model}-sim"
    assert entry["completion_tokens"] == MAX_TOKENS


@pytest.mark.parametrize("mode", ["prefill", "regenerate"])
def test_text_that_arrives_with_the_error_event_is_not_lost(
    gateway: Gateway, fakes: dict[str, FakeUpstream], reference: list[str], mode: str
) -> None:
    fake = fakes["error-late"]
    fake.hold()
    raw = raw_stream(gateway, f"error-late-{mode}", new_request_id(), fake)
    assert_one_whole_answer(raw, "".join(reference))


# One deadline: the first route's total_s, over every attempt, wait and fallback.
DEADLINE_S = 2.5


@pytest.fixture(scope="module")
def slow_fakes() -> Iterator[dict[str, FakeUpstream]]:
    started = {
        # The route asked for: each backend fails, but only after a while.
        "p1": FakeUpstream("status", status=500, retry_after=None, delay_s=0.5),
        "p2": FakeUpstream("status", status=500, retry_after=None, delay_s=0.5),
        # Its fallback: would answer (a 500 again) only long after the deadline.
        "f1": FakeUpstream("status", status=500, retry_after=None, delay_s=30),
        "f2": FakeUpstream("status", status=500, retry_after=None, delay_s=30),
    }
    yield started
    for fake in started.values():
        fake.stop()


@pytest.fixture(scope="module")
def slow_gateway(logs: Path, slow_fakes: dict[str, FakeUpstream]) -> Iterator[Gateway]:
    models = [
        {
            "name": "slow",
            "fallbacks": ["slow-fallback"],
            "timeouts": {"connect_s": 1, "first_token_s": 2, "idle_s": 2, "total_s": DEADLINE_S},
            "retries": {"max_retries": 1},
            "health": UNCHECKED,
            "breaker": NO_BREAKER,
            "backends": [fake_backend(n, slow_fakes[n]) for n in ("p1", "p2")],
        },
        {
            # Its own deadline and phase timeouts are far longer: they must not apply.
            "name": "slow-fallback",
            "timeouts": {"connect_s": 1, "first_token_s": 20, "idle_s": 20, "total_s": 60},
            "retries": {"max_retries": 2},
            "health": UNCHECKED,
            "breaker": NO_BREAKER,
            "backends": [fake_backend(n, slow_fakes[n]) for n in ("f1", "f2")],
        },
    ]
    process = start_gateway(logs, gateway_config(models))
    yield process
    process.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_the_deadline_bounds_retries_and_fallbacks_together(
    slow_gateway: Gateway, slow_fakes: dict[str, FakeUpstream], stream: bool
) -> None:
    before = {name: answers(fake) for name, fake in slow_fakes.items()}
    request_id = new_request_id()
    body = {"model": "slow", "messages": MESSAGES, "stream": stream}
    headers = {"Authorization": f"Bearer {DEMO_KEY}", "X-Request-ID": request_id}
    started = time.monotonic()
    response = httpx.post(
        slow_gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=30
    )
    elapsed = time.monotonic() - started
    # Two slow failures on the route (0.5 s each), then the fallback, cut off at the
    # deadline; without it the fallback alone could take 20 s a try (the upper bound is
    # far from that, and leaves a loaded machine time to spare).
    assert DEADLINE_S - 0.1 <= elapsed < DEADLINE_S + 8.0
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "upstream_timeout"
    assert "total_s" in error["message"]
    sent = {name: answers(fake) - before[name] for name, fake in slow_fakes.items()}
    assert sent["p1"] == sent["p2"] == 1  # both backends of the route were tried...
    assert sent["f1"] + sent["f2"] == 1  # ...then the fallback, once: its try hit the deadline
    entry = entry_for(slow_gateway, request_id)
    assert entry["status"] == 504 and entry["error"] == "upstream_timeout"
    assert entry["model"] == "slow-fallback" and entry["fallback_from"] == "slow"
    assert entry["attempts"] == 3


def test_the_timeout_message_names_the_deadline_in_force(slow_gateway: Gateway) -> None:
    response = httpx.post(
        slow_gateway.url + "/v1/chat/completions",
        json={"model": "slow", "messages": MESSAGES},
        headers={"Authorization": f"Bearer {DEMO_KEY}"},
        timeout=30,
    )
    assert response.status_code == 504
    assert "60s" not in response.json()["error"]["message"]
