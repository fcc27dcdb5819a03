"""The simulated vLLM worker, served by a real uvicorn in-process and spoken to over HTTP."""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn

from chaos.sim import (
    CHAT_TOKENS_GENERATION_PROMPT,
    CHAT_TOKENS_PER_MESSAGE,
    VOCABULARY,
    SimSettings,
    SimWorker,
    add_arguments,
    settings_from_args,
)

MODEL = "tiny-llama"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
]
# Three words, then two: the per-message and generation-prompt overheads come on top.
MESSAGES_TOKENS = 5 + 2 * CHAT_TOKENS_PER_MESSAGE + CHAT_TOKENS_GENERATION_PROMPT


@asynccontextmanager
async def serve(settings: SimSettings) -> AsyncIterator[httpx.AsyncClient]:
    """A SimWorker on a free port, and a client for it."""
    config = uvicorn.Config(
        SimWorker(settings),
        host="127.0.0.1",
        port=0,
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn exited before starting")
        await asyncio.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            yield client
    finally:
        server.should_exit = True
        await task


SETTINGS = SimSettings(models=(MODEL, "other"), max_model_len=64)

# One event loop for the module, so the shared worker below outlives a single test: stopping
# uvicorn costs a tenth of a second or more.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def sim() -> AsyncIterator[httpx.AsyncClient]:
    """A worker shared by the tests that don't count its metrics."""
    async with serve(SETTINGS) as client:
        yield client


async def chat(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post("/v1/chat/completions", json={"model": MODEL, **body})


async def complete(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post("/v1/completions", json={"model": MODEL, **body})


async def events(response: httpx.Response) -> AsyncIterator[str]:
    """The data of each SSE event, asserting vLLM's framing on the way."""
    async for line in response.aiter_lines():
        if line:
            assert line.startswith("data: "), line
            yield line.removeprefix("data: ")


async def collect(response: httpx.Response) -> list[Any]:
    import orjson

    payloads = [data async for data in events(response)]
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return [orjson.loads(data) for data in payloads[:-1]]


def sample(text: str, name: str, **labels: str) -> float:
    """One sample of a metric from Prometheus text, matched by name and the given labels."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        found = dict(pair.split("=", 1) for pair in label_text.removesuffix("}").split(",") if pair)
        if all(found.get(key) == f'"{value_}"' for key, value_ in labels.items()):
            return float(value)
    raise AssertionError(f"no {name} {labels} in:\n{text}")


async def metrics_until(
    client: httpx.AsyncClient, condition: Callable[[str], bool], timeout_s: float = 10.0
) -> str:
    """Poll /metrics until `condition` holds, failing after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        text = (await client.get("/metrics")).text
        if condition(text):
            return text
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"metrics condition not met within {timeout_s}s:\n{text}")
        await asyncio.sleep(0.01)


def gauge(text: str, name: str) -> float:
    return sample(text, name, model_name=MODEL)


# ---- shapes ----------------------------------------------------------------------------------


async def test_chat_completion_has_vllm_shape_and_consistent_usage(
    sim: httpx.AsyncClient,
) -> None:
    response = await chat(sim, messages=MESSAGES, max_tokens=7)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and len(body["id"]) == len("chatcmpl-") + 32
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None
    message = choice["message"]
    assert message["role"] == "assistant"
    content = message["content"]
    words = content.split()
    assert len(words) == 7 and content == "".join(" " + word for word in words)
    assert set(words) <= set(VOCABULARY)
    assert body["usage"] == {
        "prompt_tokens": MESSAGES_TOKENS,
        "total_tokens": MESSAGES_TOKENS + 7,
        "completion_tokens": 7,
        "prompt_tokens_details": None,
    }


async def test_completion_has_vllm_shape(sim: httpx.AsyncClient) -> None:
    response = await complete(sim, prompt="one two three", max_tokens=4)
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    [choice] = body["choices"]
    assert choice["index"] == 0 and len(choice["text"].split()) == 4
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"]["prompt_tokens"] == 3 and body["usage"]["completion_tokens"] == 4


async def test_completion_prompt_forms(sim: httpx.AsyncClient) -> None:
    body = (await complete(sim, prompt=["a b", "c d e"], max_tokens=2)).json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"] != body["choices"][1]["text"]
    assert body["usage"] == {
        "prompt_tokens": 5,
        "total_tokens": 9,
        "completion_tokens": 4,
        "prompt_tokens_details": None,
    }
    body = (await complete(sim, prompt=[5, 6, 7, 8], max_tokens=1)).json()
    assert body["usage"]["prompt_tokens"] == 4


async def test_default_max_tokens_is_capped_by_the_context(sim: httpx.AsyncClient) -> None:
    body = (await complete(sim, prompt="x")).json()
    assert body["usage"]["completion_tokens"] == SimSettings().default_max_tokens
    body = (await complete(sim, prompt="x " * 55)).json()
    assert body["usage"]["completion_tokens"] == 64 - 55


async def test_output_is_deterministic_per_request(sim: httpx.AsyncClient) -> None:
    async def text(**body: Any) -> str:
        response = await complete(sim, **body)
        assert response.status_code == 200
        return str(response.json()["choices"][0]["text"])

    first = await text(prompt="the same prompt", max_tokens=12)
    assert await text(prompt="the same prompt", max_tokens=12) == first
    assert await text(prompt="another prompt", max_tokens=12) != first
    assert await text(prompt="the same prompt", max_tokens=12, model="other") != first
    assert await text(prompt="the same prompt", max_tokens=12, seed=7) != first
    # A shorter budget cuts the same text short, as greedy decoding would.
    assert first.startswith(await text(prompt="the same prompt", max_tokens=5))


async def test_continue_final_message_continues_where_the_prefill_stops(
    sim: httpx.AsyncClient,
) -> None:
    whole = (await chat(sim, messages=MESSAGES, max_tokens=10)).json()
    text = whole["choices"][0]["message"]["content"]
    prefill = "".join(" " + word for word in text.split()[:4])
    continued = await chat(
        sim,
        messages=[*MESSAGES, {"role": "assistant", "content": prefill}],
        continue_final_message=True,
        add_generation_prompt=False,
        max_tokens=6,
    )
    assert continued.status_code == 200
    body = continued.json()
    assert prefill + body["choices"][0]["message"]["content"] == text
    # The prefill is prompt; its role marker replaces the generation prompt, as in ChatML.
    assert body["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"] + 4
    assert body["usage"]["completion_tokens"] == 6


async def test_a_foreign_prefill_is_continued_with_new_text(sim: httpx.AsyncClient) -> None:
    response = await chat(
        sim,
        messages=[*MESSAGES, {"role": "assistant", "content": " not what it says"}],
        continue_final_message=True,
        add_generation_prompt=False,
        max_tokens=3,
    )
    assert response.status_code == 200
    assert len(response.json()["choices"][0]["message"]["content"].split()) == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "Cannot set both"),
        ({"add_generation_prompt": False, "final": "user"}, "not an assistant message"),
    ],
)
async def test_continue_final_message_is_checked(
    sim: httpx.AsyncClient, extra: dict[str, Any], message: str
) -> None:
    final = extra.pop("final", "assistant")
    response = await chat(
        sim,
        messages=[*MESSAGES, {"role": final, "content": " x"}],
        continue_final_message=True,
        **extra,
    )
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


async def test_a_worker_without_continuation_refuses_it() -> None:
    async with serve(SimSettings(continue_final_message=False)) as client:
        response = await chat(
            client,
            messages=[*MESSAGES, {"role": "assistant", "content": " x"}],
            continue_final_message=True,
            add_generation_prompt=False,
        )
        assert response.status_code == 400
        assert "continue_final_message" in response.json()["error"]["message"]
        assert (await chat(client, messages=MESSAGES)).status_code == 200


async def test_stop_string_ends_the_text_before_it(sim: httpx.AsyncClient) -> None:
    full = (await complete(sim, prompt="stop here", max_tokens=20)).json()["choices"][0]["text"]
    stop = " " + full.split()[5]
    body = (await complete(sim, prompt="stop here", max_tokens=20, stop=[stop])).json()
    [choice] = body["choices"]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == full[: full.index(stop)]
    assert stop not in choice["text"]
    assert len(choice["text"].split()) < body["usage"]["completion_tokens"] <= 6


async def test_embeddings(sim: httpx.AsyncClient) -> None:
    request = {"model": MODEL, "input": ["alpha beta", "gamma"]}
    response = await sim.post("/v1/embeddings", json=request)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert body["usage"] == {
        "prompt_tokens": 3,
        "total_tokens": 3,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }
    first, second = body["data"]
    assert (first["index"], first["object"], second["index"]) == (0, "embedding", 1)
    for item in body["data"]:
        assert len(item["embedding"]) == SimSettings().embedding_dim
        assert math.isclose(math.hypot(*item["embedding"]), 1.0, abs_tol=1e-5)
    assert first["embedding"] != second["embedding"]
    again = (await sim.post("/v1/embeddings", json=request)).json()
    assert again["data"] == body["data"]

    encoded = (
        await sim.post("/v1/embeddings", json={**request, "encoding_format": "base64"})
    ).json()
    for plain, packed in zip(body["data"], encoded["data"], strict=True):
        raw = base64.b64decode(packed["embedding"])
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == plain["embedding"]

    tokens = (await sim.post("/v1/embeddings", json={"input": [[1, 2, 3], [4]]})).json()
    assert tokens["usage"]["prompt_tokens"] == 4 and len(tokens["data"]) == 2


async def test_models_and_health(sim: httpx.AsyncClient) -> None:
    body = (await sim.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == [MODEL, "other"]
    card = body["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "vllm"
    assert card["max_model_len"] == 64 and card["root"] == MODEL
    health = await sim.get("/health")
    assert health.status_code == 200 and health.content == b""


async def test_model_may_be_left_out(sim: httpx.AsyncClient) -> None:
    response = await sim.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert response.status_code == 200 and response.json()["model"] == MODEL


# ---- errors ----------------------------------------------------------------------------------


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status
    return dict(body["error"])


async def test_unknown_model_is_404(sim: httpx.AsyncClient) -> None:
    body = error(await chat(sim, model="nope", messages=MESSAGES), 404)
    assert body["message"] == "The model `nope` does not exist."
    assert (body["type"], body["param"]) == ("NotFoundError", "model")
    body = error(await sim.post("/v1/embeddings", json={"model": "nope", "input": "x"}), 404)
    assert body["type"] == "NotFoundError"


async def test_context_overflow_is_400_naming_the_numbers(sim: httpx.AsyncClient) -> None:
    body = error(await complete(sim, prompt="a b c", max_tokens=62), 400)
    assert (body["type"], body["param"]) == ("BadRequestError", "max_tokens")
    assert "62 > 64 - 3" in body["message"]
    body = error(await complete(sim, prompt="word " * 64), 400)
    assert body["param"] == "input_tokens" and "64 input tokens" in body["message"]
    body = error(await complete(sim, prompt="x", max_tokens=0), 400)
    assert body["param"] == "max_tokens"
    # The context limit counts the chat template's tokens too.
    body = error(await chat(sim, messages=MESSAGES, max_tokens=64 - MESSAGES_TOKENS + 1), 400)
    assert f"your request has {MESSAGES_TOKENS} input tokens" in body["message"]
    assert (await chat(sim, messages=MESSAGES, max_tokens=64 - MESSAGES_TOKENS)).status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": MODEL}),
        ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "no role"}]}),
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": "9"}),
        ("/v1/completions", {"model": MODEL}),
        ("/v1/completions", {"model": MODEL, "prompt": ""}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": 3}),
        ("/v1/embeddings", {"model": MODEL}),
        ("/v1/embeddings", {"model": MODEL, "input": []}),
        ("/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": "hex"}),
    ],
)
async def test_invalid_fields_are_400(
    sim: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    assert error(await sim.post(path, json=body), 400)["type"] == "Bad Request"


async def test_stream_options_need_stream(sim: httpx.AsyncClient) -> None:
    options = {"include_usage": True}
    body = error(await complete(sim, prompt="x", stream_options=options), 400)
    assert body["param"] == "stream_options"


async def test_invalid_json_and_media_type_are_400(sim: httpx.AsyncClient) -> None:
    headers = {"content-type": "application/json"}
    response = await sim.post("/v1/chat/completions", content=b"{nope", headers=headers)
    assert "JSON" in error(response, 400)["message"]
    response = await sim.post("/v1/chat/completions", content=b"[]", headers=headers)
    assert error(response, 400)["type"] == "Bad Request"
    response = await sim.post(
        "/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"}
    )
    assert "Unsupported Media Type" in error(response, 400)["message"]


async def test_unknown_path_and_wrong_method(sim: httpx.AsyncClient) -> None:
    # FastAPI's own routing errors: vLLM leaves them in FastAPI's shape.
    response = await sim.post("/v1/nothing", json={})
    assert response.status_code == 404 and response.json() == {"detail": "Not Found"}
    response = await sim.get("/v1/chat/completions")
    assert response.status_code == 405 and response.json() == {"detail": "Method Not Allowed"}
    assert response.headers["allow"] == "POST"
    assert (await sim.post("/health")).status_code == 405


async def test_api_key_guards_v1_only() -> None:
    async with serve(SimSettings(api_key="sk-sim")) as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sk-sim"}):
            response = await client.post(
                "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers
            )
            assert response.status_code == 401 and response.json() == {"error": "Unauthorized"}
        assert (await client.get("/v1/models")).status_code == 401
        ok = await client.post(
            "/v1/completions",
            json={"prompt": "x", "max_tokens": 1},
            headers={"authorization": "Bearer sk-sim"},
        )
        assert ok.status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


# ---- streaming -------------------------------------------------------------------------------


async def test_chat_stream_events_match_the_plain_reply(sim: httpx.AsyncClient) -> None:
    plain = (await chat(sim, messages=MESSAGES, max_tokens=6)).json()
    request = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with sim.stream("POST", "/v1/chat/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        chunks = await collect(response)
    role, *content, usage = chunks
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert role["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert len(content) == 6
    assert [chunk["choices"][0]["finish_reason"] for chunk in content] == [None] * 5 + ["length"]
    text = "".join(chunk["choices"][0]["delta"]["content"] for chunk in content)
    assert text == plain["choices"][0]["message"]["content"]
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": MESSAGES_TOKENS,
        "total_tokens": MESSAGES_TOKENS + 6,
        "completion_tokens": 6,
    }


async def test_completion_stream_groups_tokens_and_omits_usage_by_default() -> None:
    async with serve(SimSettings(tokens_per_chunk=3)) as client:
        request = {"model": MODEL, "prompt": "p q", "max_tokens": 7, "stream": True}
        async with client.stream("POST", "/v1/completions", json=request) as response:
            chunks = await collect(response)
        plain = (await complete(client, prompt="p q", max_tokens=7)).json()
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    texts = [chunk["choices"][0]["text"] for chunk in chunks]
    assert [len(text.split()) for text in texts] == [3, 3, 1]
    assert "".join(texts) == plain["choices"][0]["text"]
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_continuous_usage_stats(sim: httpx.AsyncClient) -> None:
    request = {
        "model": MODEL,
        "prompt": "a b",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    async with sim.stream("POST", "/v1/completions", json=request) as response:
        chunks = await collect(response)
    assert [chunk["usage"]["completion_tokens"] for chunk in chunks] == [1, 2, 3, 3]
    assert chunks[-1]["choices"] == []


async def test_chunks_arrive_while_the_request_is_still_running() -> None:
    async with serve(SimSettings(tokens_per_s=100)) as client:
        request = {"model": MODEL, "prompt": "slow", "max_tokens": 30, "stream": True}
        async with client.stream("POST", "/v1/completions", json=request) as response:
            stream = events(response)
            first = await anext(stream)
            # The first chunk is here, and the engine is still generating the rest.
            assert gauge((await client.get("/metrics")).text, "vllm:num_requests_running") == 1
            rest = [data async for data in stream]
        assert '"finish_reason":null' in first
        assert rest[-1] == "[DONE]" and len(rest) == 30
        text = await metrics_until(
            client, lambda text: gauge(text, "vllm:num_requests_running") == 0
        )
        assert sample(text, "vllm:generation_tokens_total", model_name=MODEL) == 30
        assert sample(text, "vllm:request_success_total", finished_reason="length") == 1


# ---- capacity, disconnects, metrics ----------------------------------------------------------


async def test_requests_beyond_max_num_seqs_wait() -> None:
    settings = SimSettings(max_num_seqs=1, tokens_per_s=20)
    async with serve(settings) as client:
        slow = {"model": MODEL, "prompt": "hold", "max_tokens": 200, "stream": True}
        async with client.stream("POST", "/v1/completions", json=slow) as holder:
            # Keep the iterator: a dropped one is finalized, and that closes the connection.
            holding = events(holder)
            await anext(holding)  # it holds the only slot now

            # A waiting stream has its 200 already, like vLLM's; leaving frees its place.
            async with client.stream("POST", "/v1/completions", json=slow) as queued:
                assert queued.status_code == 200
                await metrics_until(client, lambda t: gauge(t, "vllm:num_requests_waiting") == 1)
            await metrics_until(client, lambda t: gauge(t, "vllm:num_requests_waiting") == 0)

            waiter = asyncio.create_task(complete(client, prompt="next", max_tokens=2))
            text = await metrics_until(client, lambda t: gauge(t, "vllm:num_requests_waiting") == 1)
            assert gauge(text, "vllm:num_requests_running") == 1
            assert not waiter.done()
        # The holder left: the waiter gets the slot and finishes.
        response = await asyncio.wait_for(waiter, 10)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
        text = await metrics_until(client, lambda t: gauge(t, "vllm:num_requests_running") == 0)
        assert gauge(text, "vllm:num_requests_waiting") == 0
        assert sample(text, "vllm:request_success_total", finished_reason="abort") == 2
        assert sample(text, "vllm:request_success_total", finished_reason="length") == 1


async def test_disconnect_mid_stream_aborts_at_once() -> None:
    async with serve(SimSettings(tokens_per_s=20)) as client:
        request = {"model": MODEL, "prompt": "bye", "max_tokens": 200, "stream": True}
        async with client.stream("POST", "/v1/completions", json=request) as response:
            stream = events(response)
            await anext(stream)
            text = (await client.get("/metrics")).text
            assert gauge(text, "vllm:num_requests_running") == 1
        # 200 tokens at 20/s would take 10 s; the abort frees the slot long before.
        text = await metrics_until(
            client, lambda t: gauge(t, "vllm:num_requests_running") == 0, timeout_s=5
        )
        assert sample(text, "vllm:request_success_total", finished_reason="abort") == 1
        assert sample(text, "vllm:generation_tokens_total", model_name=MODEL) < 200


async def test_disconnect_before_a_plain_reply_aborts_at_once() -> None:
    async with serve(SimSettings(ttft_ms=30_000)) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": MESSAGES},
                timeout=httpx.Timeout(5, read=0.2),
            )
        # The reply was due in 30 s; the abort frees the slot long before.
        text = await metrics_until(
            client, lambda t: gauge(t, "vllm:num_requests_running") == 0, timeout_s=5
        )
        assert sample(text, "vllm:request_success_total", finished_reason="abort") == 1


async def test_metrics_count_tokens_and_requests() -> None:
    async with serve(SETTINGS) as client:
        await check_metrics_count_tokens_and_requests(client)


async def check_metrics_count_tokens_and_requests(sim: httpx.AsyncClient) -> None:
    before = (await sim.get("/metrics")).text
    assert gauge(before, "vllm:num_requests_running") == 0
    assert gauge(before, "vllm:num_requests_waiting") == 0
    usages = [
        (await chat(sim, messages=MESSAGES, max_tokens=3)).json()["usage"],
        (await complete(sim, prompt="a b c d", max_tokens=5)).json()["usage"],
    ]
    full = (await complete(sim, prompt="stop here", max_tokens=20)).json()["choices"][0]["text"]
    stopped = await complete(sim, prompt="stop here", max_tokens=20, stop=" " + full.split()[2])
    usages.append(stopped.json()["usage"])
    text = (await sim.get("/metrics")).text
    assert (
        sample(text, "vllm:prompt_tokens_total", model_name=MODEL)
        == sum(usage["prompt_tokens"] for usage in usages) + 2
    )  # the unstopped "stop here" request
    assert (
        sample(text, "vllm:generation_tokens_total", model_name=MODEL)
        == sum(usage["completion_tokens"] for usage in usages) + 20
    )
    assert sample(text, "vllm:request_success_total", finished_reason="length") == 3
    assert sample(text, "vllm:request_success_total", finished_reason="stop") == 1
    assert (
        sample(text, "vllm:request_success_total", model_name="other", finished_reason="length")
        == 0
    )


# ---- command line ----------------------------------------------------------------------------


async def test_command_line_builds_settings() -> None:  # async only for the module mark
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert settings_from_args(parser.parse_args(["--port", "1"])) == SimSettings()
    argv = [
        *("--port", "1", "--model", "a", "--model", "b", "--ttft-ms", "5"),
        *("--tokens-per-s", "9", "--tokens-per-chunk", "2", "--max-num-seqs", "3"),
        *("--max-model-len", "99", "--default-max-tokens", "4", "--embedding-dim", "8"),
        *("--api-key", "k"),
    ]
    args = parser.parse_args(argv)
    assert (args.host, args.port) == ("127.0.0.1", 1)
    assert settings_from_args(args) == SimSettings(
        models=("a", "b"),
        ttft_ms=5,
        tokens_per_s=9,
        tokens_per_chunk=2,
        max_num_seqs=3,
        max_model_len=99,
        default_max_tokens=4,
        embedding_dim=8,
        api_key="k",
    )
