"""The gateway through the official OpenAI SDK, as an application developer uses it."""

from __future__ import annotations

import base64
import struct
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.servers import DEMO_KEY, Gateway, poll_until, sim_gauge

MESSAGES = [{"role": "user", "content": "Tell me about the sea"}]


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
    timing = response.headers["server-timing"]
    assert timing.startswith("gateway;dur=") and ", upstream;dur=" in timing


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
    before = len(gateway.access_log())
    chunks = list(
        client.chat.completions.create(
            model="tiny-llama", messages=MESSAGES, max_tokens=7, stream=True
        )
    )
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    entry = gateway.wait_for_log(before + 1)[-1]
    assert entry["stream"] is True and entry["completion_tokens"] == 7
    assert entry["ttft_ms"] is not None and entry["prompt_tokens"] > 0


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


def test_stream_chunks_arrive_before_the_stream_ends(logs, gateway_for) -> None:
    from tests.servers import start_sim

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
    from tests.servers import start_sim

    # Streams trickle at 10 tokens/s; the non-streaming answer takes 30 s to start.
    slow = start_sim(logs, tokens_per_s=10, ttft_ms=0 if streaming else 30000)
    try:
        gateway = gateway_for(slow.url)
        body = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 200, "stream": streaming}
        headers = {"Authorization": f"Bearer {DEMO_KEY}"}
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
        # The client is gone: the worker's slot must be free long before its answer was due.
        poll_until(lambda: sim_gauge(slow.url, "vllm:num_requests_running") == 0, timeout_s=2)
        entry = poll_until(lambda: [e for e in gateway.access_log() if e["status"] == 499])[-1]
        assert entry["error"] == "client_disconnected" and entry["stream"] is streaming
    finally:
        slow.stop()
