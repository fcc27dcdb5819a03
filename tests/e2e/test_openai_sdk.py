"""The gateway through the official OpenAI SDK, as an application developer uses it."""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import new_request_id, wait_for_line
from tests.servers import (
    DEMO_KEY,
    Gateway,
    backend,
    gateway_config,
    poll_until,
    sim_gauge,
    start_gateway,
    start_sim,
)

MESSAGES = [{"role": "user", "content": "Tell me about the sea"}]
# The timed worker's time to first token (also before a non-stream reply): long, so that the
# gateway's own time, well under it even on a slow machine, is never mistaken for it.
TTFT_MS = 1000
FAIL_MS = 400  # the failing worker's delay before it answers 500
_TIMING = re.compile(r"gateway;dur=\d+\.\d{3}, upstream;dur=\d+\.\d{3}(, wait;dur=\d+\.\d{3})?")


def server_timing(headers: Mapping[str, str]) -> dict[str, float]:
    """Server-Timing's durations (ms) by name, after checking the header's exact form."""
    value = headers["server-timing"]
    assert _TIMING.fullmatch(value), value
    return {
        name: float(duration)
        for name, _, duration in (part.partition(";dur=") for part in value.split(", "))
    }


def test_chat_completion(client: openai.OpenAI) -> None:
    response = client.chat.completions.with_raw_response.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=12
    )
    completion = response.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    assert len(completion.choices[0].message.content.split()) == 12
    assert response.headers["x-vgate-model"] == "tiny-llama"
    assert response.headers["x-vgate-backend"] in {"w1", "w2"}
    assert len(response.headers["x-request-id"]) == 32
    timing = server_timing(response.headers)
    assert set(timing) == {"gateway", "upstream"}  # no retry, no queueing: no wait


def test_same_request_same_answer_through_either_worker(client: openai.OpenAI) -> None:
    answers = {
        client.chat.completions.create(model="tiny-llama", messages=MESSAGES)
        .choices[0]
        .message.content
        for _ in range(4)
    }
    assert len(answers) == 1


def test_alias_routes_to_its_model(client: openai.OpenAI) -> None:
    response = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
    assert response.headers["x-vgate-model"] == "tiny-llama"
    assert response.parse().model == "tiny-llama"


def test_weights_spread_requests(client: openai.OpenAI) -> None:
    backends = [
        client.chat.completions.with_raw_response.create(
            model="tiny-llama", messages=MESSAGES, max_tokens=1
        ).headers["x-vgate-backend"]
        for _ in range(8)
    ]
    assert backends.count("w1") == 6 and backends.count("w2") == 2


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny-llama",
        messages=MESSAGES,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10 == len(text.split())
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)
    blocking = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=10)
    assert blocking.choices[0].message.content == text


def test_stream_without_usage_request_has_no_usage_chunk_but_is_accounted(
    client: openai.OpenAI, gateway: Gateway
) -> None:
    request_id = new_request_id()
    chunks = list(
        client.chat.completions.create(
            model="tiny-llama",
            messages=MESSAGES,
            max_tokens=7,
            stream=True,
            extra_headers={"X-Request-ID": request_id},
        )
    )
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    entry = wait_for_line(gateway, request_id)
    assert entry["stream"] is True and entry["completion_tokens"] == 7
    assert entry["ttft_ms"] is not None and entry["prompt_tokens"] > 0


def test_access_log_has_one_line_per_request_with_its_timings_and_nothing_secret(
    client: openai.OpenAI, gateway: Gateway
) -> None:
    secret = "the-prompt-text-that-must-never-be-logged"
    messages = [{"role": "user", "content": secret}]
    plain_id, stream_id = new_request_id(), new_request_id()
    plain = client.chat.completions.with_raw_response.create(
        model="default", messages=messages, max_tokens=5, extra_headers={"X-Request-ID": plain_id}
    )
    usage = plain.parse().usage
    assert usage is not None
    streamed = client.chat.completions.with_raw_response.create(
        model="tiny-llama",
        messages=messages,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Request-ID": stream_id},
    )
    chunks = list(streamed.parse())
    stream_usage = chunks[-1].usage
    assert stream_usage is not None

    for request_id, response, tokens, stream in (
        (plain_id, plain, (usage.prompt_tokens, 5), False),
        (stream_id, streamed, (stream_usage.prompt_tokens, 6), True),
    ):
        entry = wait_for_line(gateway, request_id)
        assert response.headers["x-request-id"] == request_id
        assert (entry["method"], entry["path"]) == ("POST", "/v1/chat/completions")
        assert (entry["status"], entry["error"], entry["stream"]) == (200, None, stream)
        assert (entry["key"], entry["model"]) == ("demo", "tiny-llama")  # the alias resolved
        assert entry["backend"] == response.headers["x-vgate-backend"]
        assert (entry["attempts"], entry["fallback_from"]) == (1, None)
        assert (entry["prompt_tokens"], entry["completion_tokens"]) == tokens
        assert 0 < entry["upstream_ms"] <= entry["latency_ms"]
        # The access log and Server-Timing tell the same upstream time.
        assert entry["upstream_ms"] == pytest.approx(
            server_timing(response.headers)["upstream"], abs=0.002
        )
        if stream:
            # Until the first event reached the client, which the upstream's part is within.
            assert entry["upstream_ms"] <= entry["ttft_ms"] <= entry["latency_ms"]
        raw = entry["_raw"]
        assert secret not in raw and DEMO_KEY not in raw and "Bearer" not in raw


def test_completions_plain_and_streaming(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="tiny-llama", prompt="Once upon", max_tokens=5)
    assert completion.object == "text_completion" and completion.usage.completion_tokens == 5
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny-llama", prompt="Once upon", max_tokens=5, stream=True
        )
        if c.choices
    )
    assert streamed == completion.choices[0].text


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="tiny-embed", input=["a cat", "a dog"])
    assert [item.index for item in result.data] == [0, 1]
    vectors = [item.embedding for item in result.data]
    assert len(vectors[0]) == 384 and vectors[0] != vectors[1]
    assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-3
    assert result.usage.prompt_tokens > 0
    encoded = client.embeddings.with_raw_response.create(
        model="tiny-embed", input="a cat", encoding_format="base64"
    ).http_response.json()["data"][0]["embedding"]
    raw = base64.b64decode(encoded)
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw))[:4] == pytest.approx(
        vectors[0][:4], abs=1e-6
    )


def test_models_lists_names_and_aliases(client: openai.OpenAI) -> None:
    assert sorted(model.id for model in client.models.list()) == [
        "default",
        "tiny-embed",
        "tiny-llama",
    ]


def test_models_retrieve_by_name_or_alias(client: openai.OpenAI, gateway: Gateway) -> None:
    for name in ("tiny-llama", "default", "tiny-embed"):
        model = client.models.retrieve(name)
        assert (model.id, model.object, model.owned_by) == (name, "model", "vgate")
    with pytest.raises(openai.NotFoundError) as unknown:
        client.models.retrieve("gpt-nope")
    error = unknown.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found"
    assert "tiny-llama" in error["message"]  # names the available ones
    anonymous = openai.OpenAI(base_url=gateway.url + "/v1", api_key="vg-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.retrieve("tiny-llama")


def test_stream_chunks_arrive_before_the_stream_ends(logs, gateway_for) -> None:

    slow = start_sim(logs, tokens_per_s=20, max_num_seqs=4)
    try:
        gateway = gateway_for(slow.url)
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=DEMO_KEY, max_retries=0)
        stream = client.chat.completions.create(
            model="tiny-llama", messages=MESSAGES, max_tokens=40, stream=True
        )
        first = next(iter(stream))
        # The worker is still generating (40 tokens at 20/s): the chunk was not buffered.
        assert first.choices[0].delta.role == "assistant"
        assert sim_gauge(slow.url, "vllm:num_requests_running") == 1
        stream.close()
    finally:
        slow.stop()


@pytest.mark.parametrize("streaming", [True, False])
def test_client_disconnect_frees_the_worker(logs, gateway_for, streaming: bool) -> None:
    # Streams trickle at 10 tokens/s; the non-streaming answer takes 30 s to start.
    slow = start_sim(logs, tokens_per_s=10, ttft_ms=0 if streaming else 30000)
    try:
        gateway = gateway_for(slow.url)
        body = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 200, "stream": streaming}
        request_id = new_request_id()
        headers = {"Authorization": f"Bearer {DEMO_KEY}", "X-Request-ID": request_id}
        with httpx.Client(base_url=gateway.url, headers=headers, timeout=30) as http:
            if streaming:
                with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    assert response.status_code == 200
                    chunks = response.iter_raw()  # kept: a dropped iterator closes the response
                    assert b"data: " in next(chunks)
                    assert sim_gauge(slow.url, "vllm:num_requests_running") == 1
            else:
                with ThreadPoolExecutor(1) as pool:
                    pending = pool.submit(http.post, "/v1/chat/completions", json=body, timeout=2.0)
                    poll_until(lambda: sim_gauge(slow.url, "vllm:num_requests_running") == 1)
                    with pytest.raises(httpx.ReadTimeout):
                        pending.result()
        # The client is gone: the worker's slot must be free long before its answer was due
        # (20 s and 30 s away; the margin is for a slow machine).
        poll_until(lambda: sim_gauge(slow.url, "vllm:num_requests_running") == 0, timeout_s=10)
        entry = wait_for_line(gateway, request_id)
        assert (entry["status"], entry["error"]) == (499, "client_disconnected")
        assert entry["stream"] is streaming and entry["backend"] == "only"
    finally:
        slow.stop()


@pytest.fixture(scope="module")
def timed(logs: Path) -> Iterator[Gateway]:
    """Routes in front of a worker whose time to first token is TTFT_MS: `timed` alone, and
    `retried`/`retried-s` where a worker answering 500 after FAIL_MS is tried first."""
    names = ("timed", "retried", "retried-s")
    worker = start_sim(logs, models=names, ttft_ms=TTFT_MS)
    failing = start_sim(logs, models=names[1:], fault_status=500, fault_latency_ms=FAIL_MS)
    retries = {"max_retries": 1, "backoff_initial_s": 0.01, "backoff_max_s": 0.02}
    models = [{"name": "timed", "backends": [backend("timed", worker.url)]}]
    for name in names[1:]:
        # One request each, so the route's first choice is its first backend (weights 1:1).
        models.append(
            {
                "name": name,
                "retries": retries,
                "backends": [
                    backend(f"{name}-failing", failing.url),
                    backend(f"{name}-ok", worker.url),
                ],
            }
        )
    gateway = start_gateway(logs, gateway_config(models))
    yield gateway
    for process in (gateway, failing, worker):
        process.stop()


def timed_request(gateway: Gateway, model: str, stream: bool) -> tuple[httpx.Headers, str]:
    client = openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=10
    )
    request_id = new_request_id()
    response = client.chat.completions.with_raw_response.create(
        model=model,
        messages=MESSAGES,
        max_tokens=3,
        stream=stream,
        extra_headers={"X-Request-ID": request_id},
    )
    parsed = response.parse()
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)  # type: ignore[union-attr]
    else:
        text = parsed.choices[0].message.content  # type: ignore[union-attr]
    assert len(text.split()) == 3
    return response.headers, request_id


@pytest.mark.parametrize("stream", [False, True])
def test_server_timing_puts_the_workers_time_under_upstream(timed: Gateway, stream: bool) -> None:
    headers, request_id = timed_request(timed, "timed", stream)
    timing = server_timing(headers)
    assert set(timing) == {"gateway", "upstream"}
    # The worker waited TTFT_MS before its first token: the upstream's time, not the gateway's.
    assert timing["upstream"] >= TTFT_MS
    assert timing["gateway"] < TTFT_MS
    entry = wait_for_line(timed, request_id)
    assert entry["upstream_ms"] == pytest.approx(timing["upstream"], abs=0.002)
    assert entry["latency_ms"] >= timing["upstream"] + timing["gateway"] - 0.01
    if stream:
        assert entry["ttft_ms"] >= TTFT_MS


@pytest.mark.parametrize("stream", [False, True])
def test_server_timing_counts_a_slow_failed_attempt_as_upstream(
    timed: Gateway, stream: bool
) -> None:
    model = "retried-s" if stream else "retried"
    headers, request_id = timed_request(timed, model, stream)
    assert headers["x-vgate-backend"] == f"{model}-ok"
    entry = wait_for_line(timed, request_id)
    assert (entry["attempts"], entry["backend"], entry["status"]) == (2, f"{model}-ok", 200)
    timing = server_timing(headers)
    # Both attempts' time with the workers, summed: the 500 after FAIL_MS, then the answer.
    assert timing["upstream"] >= FAIL_MS + TTFT_MS
    assert timing["gateway"] < TTFT_MS
    # The retry's backoff (at most backoff_max_s) is a wait, neither side's work.
    assert timing.get("wait", 0.0) <= 20.001
    assert entry["upstream_ms"] == pytest.approx(timing["upstream"], abs=0.002)
