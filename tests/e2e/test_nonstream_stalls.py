"""Non-streaming requests get the stream's phase timeouts (route `non_stream: assemble`).

vLLM sends nothing for a non-streaming request until it has finished, so a stalled backend
used to hold such a request for `timeouts.total_s`. The gateway now asks the upstream for a
stream and assembles the JSON answer: a backend that stalls before its first token is cut at
`first_token_s`, one that stalls mid-answer at `idle_s`, and either is retried elsewhere
before the client has anything. Real `vgate sim` workers (with their fault flags) and raw
misbehaving upstreams (tests.fake_upstream), a real `vgate serve`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.e2e.conftest import new_request_id, wait_for_line
from tests.fake_upstream import FakeUpstream, content_event, role_event
from tests.servers import DEMO_KEY, Gateway, Process, backend, gateway_config, start_gateway
from tests.servers import start_sim as start_sim_process

MESSAGES = [{"role": "user", "content": "tell me about the sea"}]
PHASE_S = 2.0  # first_token_s and idle_s of the stalling routes
TOTAL_S = 60.0  # far longer than any of these tests may take: only a phase timeout answers
CLIENT_TIMEOUT_S = 30.0  # well under TOTAL_S: a request held for total_s fails the test
STALLING = {"connect_s": 1, "first_token_s": PHASE_S, "idle_s": PHASE_S, "total_s": TOTAL_S}
GENEROUS = {"connect_s": 5, "first_token_s": 20, "idle_s": 20, "total_s": TOTAL_S}
PASSTHROUGH_TOTAL_S = 4.0
UNCHECKED = {"enabled": False}  # each request meets its failure itself
ONCE = {"max_retries": 0}
TWICE = {"max_retries": 1}


class OddUpstream(FakeUpstream):
    """Two answers the shared fake does not give: a 200 labelled `text/html`, and a stream
    that finishes its choice but never sends the usage it was asked for."""

    async def _respond(self, writer: asyncio.StreamWriter) -> bool:
        if self.mode in ("html", "vendor_json"):
            # A whole answer, labelled as a web page: the label is what the client would
            # trust, so it is checked, not just the body. Or labelled as JSON of the
            # upstream's own kind, with parameters of its own.
            body = orjson.dumps(
                {
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                }
            )
            label = (
                b"text/html"
                if self.mode == "html"
                else b"application/vnd.upstream+json; tracking=" + b"t" * 4000
            )
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: "
                + label
                + b"\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
        elif self.mode == "stream_no_usage":
            events = role_event() + content_event("Hello", finish="stop") + b"data: [DONE]\n\n"
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                + f"content-length: {len(events)}\r\n\r\n".encode()
                + events
            )
        else:
            return await super()._respond(writer)
        await writer.drain()
        return True


FAKE_MODES = ("stream_no_done", "stream_end_early", "stream_cut", "stream_split_events")


@pytest.fixture(scope="module")
def workers(logs: Path) -> Iterator[dict[str, Process]]:
    started = {
        "good": start_sim_process(logs),
        # Never answers, not even the stream's headers: stalled before its first token.
        "hang": start_sim_process(logs, fault_hang=True),
        # The role chunk and two tokens, then silence with the connection open.
        "stall": start_sim_process(logs, fault_stall_after=3),
    }
    yield started
    for process in started.values():
        process.stop()


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeUpstream]]:
    started: dict[str, FakeUpstream] = {mode: FakeUpstream(mode) for mode in FAKE_MODES}
    started["html"] = OddUpstream("html")
    started["vendor_json"] = OddUpstream("vendor_json")
    started["stream_no_usage"] = OddUpstream("stream_no_usage")
    yield started
    for fake in started.values():
        fake.stop()


def route(name: str, *backends: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "timeouts": STALLING,
        "health": UNCHECKED,
        "retries": ONCE,
        "backends": list(backends),
        **extra,
    }


@pytest.fixture(scope="module")
def gateway(
    logs: Path, workers: dict[str, Process], fakes: dict[str, FakeUpstream]
) -> Iterator[Gateway]:
    good, hang, stall = workers["good"].url, workers["hang"].url, workers["stall"].url
    served = {"model": "tiny-llama"}
    models = [
        # Answers compared with the worker's own.
        route("tiny-llama", backend("good", good), timeouts=GENEROUS),
        route(
            "tiny-llama-passthrough",
            backend("good-pass", good, **served),
            timeouts=GENEROUS,
            non_stream="passthrough",
        ),
        # Stalls before the first token: a fallback, another backend, or a 504.
        route("ft-fallback", backend("hang-fb", hang, **served), fallbacks=["backup"]),
        route("backup", backend("good-backup", good, **served), timeouts=GENEROUS),
        # Smooth weighted round robin: a fresh route's first pick is its heaviest backend.
        route(
            "ft-retry",
            backend("hang-retry", hang, weight=3, **served),
            backend("good-retry", good, weight=1, **served),
            retries=TWICE,
        ),
        route("ft-only", backend("hang-only", hang, **served)),
        # Stalls mid-answer: another backend, or a 504.
        route(
            "idle-retry",
            backend("stall-retry", stall, weight=3, **served),
            backend("good-idle", good, weight=1, **served),
            retries=TWICE,
        ),
        route("idle-only", backend("stall-only", stall, **served)),
        # Passthrough keeps the old exchange: only total_s bounds it.
        route(
            "passthrough-hang",
            backend("hang-pass", hang, **served),
            timeouts={**STALLING, "first_token_s": 1, "idle_s": 1, "total_s": PASSTHROUGH_TOTAL_S},
            non_stream="passthrough",
        ),
        # A 200 that is not JSON, in either mode.
        route(
            "html-passthrough", backend("html-pass", fakes["html"].url), non_stream="passthrough"
        ),
        route("html-assemble", backend("html-asm", fakes["html"].url)),
        *(
            route(f"fake-{mode}", backend(f"fake-{mode}", fake.url))
            for mode, fake in fakes.items()
            if mode not in ("html", "vendor_json")
        ),
        route(
            "vendor-json",
            backend("vendor-json", fakes["vendor_json"].url),
            non_stream="passthrough",
        ),
    ]
    process = start_gateway(logs, gateway_config(models))
    yield process
    process.stop()


def post(
    gateway: Gateway, payload: dict[str, Any], *, path: str = "/v1/chat/completions"
) -> tuple[httpx.Response, float, str]:
    """The gateway's answer, how long it took, and the request id to find its log line by."""
    request_id = new_request_id()
    headers = {"Authorization": f"Bearer {DEMO_KEY}", "X-Request-ID": request_id}
    start = time.monotonic()
    response = httpx.post(
        gateway.url + path, json=payload, headers=headers, timeout=CLIENT_TIMEOUT_S
    )
    return response, time.monotonic() - start, request_id


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "max_tokens": 12, **extra}


def direct(worker: Process, payload: dict[str, Any], path: str) -> dict[str, Any]:
    response = httpx.post(worker.url + path, json=payload, timeout=CLIENT_TIMEOUT_S)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def same_answer(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Everything but the ids and times each request gets afresh, and the nulls vLLM adds
    to a whole answer that no stream carries."""
    for key in ("object", "model"):
        assert ours[key] == theirs[key]
    assert ours["id"] and isinstance(ours["created"], int)
    usage_keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert {k: ours["usage"][k] for k in usage_keys} == {k: theirs["usage"][k] for k in usage_keys}
    assert len(ours["choices"]) == len(theirs["choices"])
    for mine, real in zip(ours["choices"], theirs["choices"], strict=True):
        for key in ("index", "finish_reason", "stop_reason", "logprobs"):
            assert mine[key] == real[key], key
        if "message" in real:
            assert mine["message"]["role"] == real["message"]["role"]
            assert mine["message"]["content"] == real["message"]["content"]
        else:
            assert mine["text"] == real["text"]


# -- the answer --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-llama-passthrough"])
def test_chat_answer_is_the_workers_own(
    gateway: Gateway, workers: dict[str, Process], model: str
) -> None:
    payload = chat(model)
    response, _, request_id = post(gateway, payload)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    ours = response.json()
    theirs = direct(workers["good"], chat("tiny-llama"), "/v1/chat/completions")
    same_answer(ours, theirs)
    assert ours["choices"][0]["finish_reason"] == "length"
    entry = wait_for_line(gateway, request_id)
    assert (entry["status"], entry["stream"], entry["error"]) == (200, False, None)
    assert entry["prompt_tokens"] == ours["usage"]["prompt_tokens"]
    assert entry["completion_tokens"] == ours["usage"]["completion_tokens"] == 12


def test_stop_string_gives_the_workers_finish_and_stop_reason(
    gateway: Gateway, workers: dict[str, Process]
) -> None:
    words = direct(workers["good"], chat("tiny-llama", max_tokens=20), "/v1/chat/completions")
    stop = words["choices"][0]["message"]["content"].split()[5]
    response, _, _ = post(gateway, chat("tiny-llama", max_tokens=20, stop=[stop]))
    assert response.status_code == 200, response.text
    theirs = direct(
        workers["good"], chat("tiny-llama", max_tokens=20, stop=[stop]), "/v1/chat/completions"
    )
    same_answer(response.json(), theirs)
    assert theirs["choices"][0]["finish_reason"] == "stop"
    assert theirs["choices"][0]["stop_reason"] == stop


def test_completions_batch_answer_is_the_workers_own(
    gateway: Gateway, workers: dict[str, Process]
) -> None:
    payload = {"model": "tiny-llama", "prompt": ["once upon", "a time there"], "max_tokens": 7}
    response, _, _ = post(gateway, payload, path="/v1/completions")
    assert response.status_code == 200, response.text
    ours = response.json()
    assert [choice["index"] for choice in ours["choices"]] == [0, 1]
    same_answer(ours, direct(workers["good"], payload, "/v1/completions"))


def test_the_openai_sdk_reads_the_assembled_answer(gateway: Gateway) -> None:
    client = openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=CLIENT_TIMEOUT_S
    )
    completion = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=5)  # type: ignore[arg-type]
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    text = client.completions.create(model="tiny-llama", prompt="hello", max_tokens=4)
    assert text.object == "text_completion" and text.choices[0].text


def test_embeddings_are_not_streamed(gateway: Gateway) -> None:
    response, _, _ = post(gateway, {"model": "tiny-llama", "input": "hello"}, path="/v1/embeddings")
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "list"


# -- stalls ------------------------------------------------------------------------------------


def test_stall_before_the_first_token_falls_back_at_first_token_s(gateway: Gateway) -> None:
    response, took, request_id = post(gateway, chat("ft-fallback"))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    assert PHASE_S <= took < TOTAL_S / 2
    entry = wait_for_line(gateway, request_id)
    assert (entry["fallback_from"], entry["model"], entry["backend"]) == (
        "ft-fallback",
        "backup",
        "good-backup",
    )


def test_stall_before_the_first_token_is_retried_on_another_backend(gateway: Gateway) -> None:
    response, took, request_id = post(gateway, chat("ft-retry"))
    assert response.status_code == 200, response.text
    assert PHASE_S <= took < TOTAL_S / 2
    entry = wait_for_line(gateway, request_id)
    assert (entry["attempts"], entry["backend"]) == (2, "good-retry")
    assert [d["choice"] for d in entry["decisions"]] == ["hang-retry", "good-retry"]


def test_stall_before_the_first_token_alone_is_a_504_at_first_token_s(gateway: Gateway) -> None:
    response, took, request_id = post(gateway, chat("ft-only"))
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_timeout"
    assert "timeouts.first_token_s" in error["message"]
    assert PHASE_S <= took < TOTAL_S / 2
    assert wait_for_line(gateway, request_id)["error"] == "upstream_timeout"


def test_stall_mid_answer_is_cut_at_idle_s_and_retried(
    gateway: Gateway, workers: dict[str, Process]
) -> None:
    response, took, request_id = post(gateway, chat("idle-retry"))
    assert response.status_code == 200, response.text
    assert PHASE_S <= took < TOTAL_S / 2
    # The client never sees the two tokens the stalled backend sent: a whole, fresh answer.
    same_answer(
        response.json(), direct(workers["good"], chat("tiny-llama"), "/v1/chat/completions")
    )
    entry = wait_for_line(gateway, request_id)
    assert (entry["attempts"], entry["backend"]) == (2, "good-idle")
    assert entry["completion_tokens"] == 12


def test_stall_mid_answer_alone_is_a_504_at_idle_s(gateway: Gateway) -> None:
    response, took, _ = post(gateway, chat("idle-only"))
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_timeout"
    assert "timeouts.idle_s" in error["message"]
    assert PHASE_S <= took < TOTAL_S / 2


def test_passthrough_keeps_the_old_exchange_bounded_by_total_s(gateway: Gateway) -> None:
    response, took, _ = post(gateway, chat("passthrough-hang"))
    assert response.status_code == 504, response.text
    assert "timeouts.total_s" in response.json()["error"]["message"]
    assert took >= PASSTHROUGH_TOTAL_S  # first_token_s (1 s) does not apply to it


# -- answers that are not whole ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "status", "content"),
    [
        ("stream_no_done", 200, "Hello world"),  # finished, usage sent, [DONE] lost: whole
        ("stream_split_events", 200, "Hello"),  # one byte per read: reassembled
        ("stream_end_early", 502, "before the answer finished"),
        ("stream_cut", 502, "broke off the stream"),
        ("stream_no_usage", 502, "without its usage"),
    ],
)
def test_a_stream_that_is_not_whole_is_never_a_200(
    gateway: Gateway, mode: str, status: int, content: str
) -> None:
    response, _, request_id = post(gateway, chat(f"fake-{mode}"))
    assert response.status_code == status, response.text
    body = response.json()
    if status == 200:
        assert body["choices"][0]["message"]["content"] == content
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == 2
    else:
        assert content in body["error"]["message"]
        assert body["error"]["type"] == "upstream_error"
        assert wait_for_line(gateway, request_id)["status"] == 502


def test_a_json_200_is_labelled_application_json_whatever_the_upstream_wrote(
    gateway: Gateway,
) -> None:
    """The upstream's own label (4 KB of parameters) never reaches the client."""
    response, _, _ = post(gateway, chat("vendor-json"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["choices"][0]["message"]["content"] == "hi"


@pytest.mark.parametrize(
    ("model", "says"),
    [("html-passthrough", "'text/html', not JSON"), ("html-assemble", "not an event stream")],
)
def test_a_200_that_is_not_json_is_a_502(gateway: Gateway, model: str, says: str) -> None:
    response, _, _ = post(gateway, chat(model))
    assert response.status_code == 502, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = orjson.loads(response.content)["error"]
    assert error["code"] == "bad_gateway"
    assert says in error["message"]
