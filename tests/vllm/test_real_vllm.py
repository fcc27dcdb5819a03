"""Through the gateway to real vLLM workers, with the official openai SDK.

One `vgate up` for the module (tests/vllm/conftest.py): w1 and w2 serve the tiny random Llama
as tiny-llama (max length 2048), e1 serves all-MiniLM-L6-v2 as tiny-embed. The tests run in
this file's order; the last one stops the stack. Timing is asserted in one place only (a
disconnect frees the vLLM slot within a second); everything else waits with generous limits.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.servers import DEMO_KEY, free_port, poll_until
from tests.upstack import Up, descendants, group_of, launch, processes, ready_state
from tests.vllm.conftest import CPU_ENV, MAX_MODEL_LEN

MESSAGES: Any = [{"role": "user", "content": "def fib(n): return"}]
EXACT = {"ignore_eos": True}  # the random model may draw <|im_end|> at any step
AUTH = {"Authorization": f"Bearer {DEMO_KEY}"}


def scrape(port: int) -> dict[str, float]:
    """A worker's vLLM metrics, summed by name (request_success_total also by reason)."""
    out: dict[str, float] = collections.defaultdict(float)
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10.0).text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if name == "vllm:request_success_total":
            name += ":" + name_labels.split('finished_reason="', 1)[1].split('"', 1)[0]
        out[name] += float(value)
    return out


def totals(stack: Up, workers: tuple[str, ...] = ("w1", "w2")) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for worker in workers:
        for name, value in scrape(stack.ports[worker]).items():
            out[name] += value
    return out


def counted(stack: Up, before: dict[str, float], name: str, want: float, **kw: Any) -> None:
    """vLLM's counter `name` grew by `want` (it is updated as the request finishes)."""
    poll_until(lambda: totals(stack, **kw)[name] - before[name] == want, timeout_s=10)


@pytest.fixture
def client(stack: Up) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=300)


def direct(stack: Up, worker: str) -> openai.OpenAI:
    base = f"http://127.0.0.1:{stack.ports[worker]}/v1"
    return openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=300)


@pytest.fixture(autouse=True)
def all_live(stack: Up) -> None:
    """Every test starts with every backend in rotation."""
    want = {"tiny-llama": ["w1", "w2"], "tiny-embed": ["e1"], "ghost": ["w1-ghost"]}
    poll_until(lambda: {k: v["live"] for k, v in ready_state(stack).items()} == want, timeout_s=600)


def test_chat_usage_is_what_vllm_counted(stack: Up, client: openai.OpenAI) -> None:
    before = totals(stack)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=32, extra_body=EXACT
    )
    reply = raw.parse()
    assert raw.headers["x-vgate-backend"] in ("w1", "w2")
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 32
    counted(stack, before, "vllm:generation_tokens_total", 32)
    counted(stack, before, "vllm:prompt_tokens_total", reply.usage.prompt_tokens)
    # The same request straight to a worker: the same prompt, counted alike.
    alone = direct(stack, "w2").chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=4, extra_body=EXACT
    )
    assert alone.usage is not None
    assert alone.usage.prompt_tokens == reply.usage.prompt_tokens


def test_chat_stream_carries_vllms_usage(stack: Up, client: openai.OpenAI) -> None:
    before = totals(stack)
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=MESSAGES,
            max_tokens=32,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXACT,
        )
    )
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == ["length"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.completion_tokens == 32
    counted(stack, before, "vllm:generation_tokens_total", 32)
    counted(stack, before, "vllm:prompt_tokens_total", usage.prompt_tokens)
    # Not asked for: no usage chunk reaches the client (the gateway still counts it).
    quiet = list(
        client.chat.completions.create(
            model="default", messages=MESSAGES, max_tokens=8, stream=True, extra_body=EXACT
        )
    )
    assert all(chunk.usage is None for chunk in quiet)
    assert [c.choices[0].finish_reason for c in quiet if c.choices][-1] == "length"


def test_completions_plain_and_streamed(stack: Up, client: openai.OpenAI) -> None:
    before = totals(stack)
    reply = client.completions.create(
        model="tiny-llama", prompt="def fib(n):", max_tokens=16, extra_body=EXACT
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 16
    assert reply.choices[0].text and reply.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(
            model="tiny-llama",
            prompt="def fib(n):",
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXACT,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 16
    counted(stack, before, "vllm:generation_tokens_total", 32)
    counted(
        stack, before, "vllm:prompt_tokens_total", reply.usage.prompt_tokens + usage.prompt_tokens
    )


def test_embeddings_go_to_the_embeddings_worker(stack: Up, client: openai.OpenAI) -> None:
    raw = client.embeddings.with_raw_response.create(
        model="tiny-embed", input=["hello world", "def fib(n): return"]
    )
    reply = raw.parse()
    assert raw.headers["x-vgate-backend"] == "e1"
    assert [len(item.embedding) for item in reply.data] == [384, 384]
    for item in reply.data:
        assert abs(sum(x * x for x in item.embedding) - 1.0) < 1e-3  # unit norm
    assert reply.usage.prompt_tokens > 0
    alone = direct(stack, "e1").embeddings.create(model="tiny-embed", input="hello world")
    assert alone.data[0].embedding == pytest.approx(reply.data[0].embedding, abs=1e-5)


@pytest.mark.parametrize(
    ("case", "status"),
    [("prompt over the context", 400), ("max_tokens over the context", 400), ("ghost", 404)],
)
def test_vllms_own_errors_reach_the_client_as_they_are(
    stack: Up, client: openai.OpenAI, case: str, status: int
) -> None:
    body: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 8}
    if case == "prompt over the context":
        body["messages"] = [{"role": "user", "content": "hello world " * MAX_MODEL_LEN}]
    elif case == "max_tokens over the context":
        body["max_tokens"] = MAX_MODEL_LEN * 2
    # The route `ghost` sends model "no-such-model" to w1.
    model, upstream_model = ("ghost", "no-such-model") if case == "ghost" else ("tiny-llama",) * 2
    want = httpx.post(
        f"http://127.0.0.1:{stack.ports['w1']}/v1/chat/completions",
        json={**body, "model": upstream_model},
        timeout=60,
    )
    got = httpx.post(
        stack.url + "/v1/chat/completions", json={**body, "model": model}, headers=AUTH, timeout=60
    )
    assert (want.status_code, got.status_code) == (status, status)
    assert got.json() == want.json()  # vLLM's own error, OpenAI's shape, untouched
    assert set(got.json()["error"]) >= {"message", "type", "param", "code"}
    # ...and the SDK raises for it what it raises for OpenAI's own.
    error = openai.NotFoundError if status == 404 else openai.BadRequestError
    with pytest.raises(error) as caught:
        client.chat.completions.create(model=model, **body)
    assert caught.value.status_code == status
    assert caught.value.body == want.json()["error"]


def test_a_client_disconnect_frees_the_vllm_slot_within_a_second(
    stack: Up, client: openai.OpenAI
) -> None:
    asked = MAX_MODEL_LEN - 64  # seconds of decoding: far longer than the check
    before = totals(stack)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=asked, stream=True, extra_body=EXACT
    )
    port = stack.ports[raw.headers["x-vgate-backend"]]
    request_id = raw.headers["x-request-id"]
    stream = raw.parse()
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break  # decoding has started
    closed = time.monotonic()
    stream.close()
    while True:
        running = scrape(port)["vllm:num_requests_running"]
        freed_s = time.monotonic() - closed  # after the scrape that saw it: an upper bound
        if running == 0 or freed_s > 10:
            break
        time.sleep(0.01)
    assert running == 0
    assert freed_s <= 1.0, f"the vLLM slot was freed {freed_s:.2f}s after the disconnect"
    # Aborted, not finished: fewer tokens than asked, and no request ended by length.
    time.sleep(0.5)
    after = totals(stack)
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert 0 < generated < asked
    length = "vllm:request_success_total:length"
    assert after[length] == before[length]
    line = poll_until(
        lambda: [e for e in stack.access_log() if e["request_id"] == request_id], timeout_s=10
    )[0]
    assert line["status"] == 499
    print(f"\nslot freed {freed_s:.3f}s after the disconnect")


def test_32_concurrent_requests_all_succeed_on_both_workers(
    stack: Up, client: openai.OpenAI
) -> None:
    def one(i: int) -> tuple[str, int]:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": f"request {i}: def fib(n): return"}],
            max_tokens=16,
            extra_body=EXACT,
        )
        reply = raw.parse()
        assert reply.usage is not None
        return raw.headers["x-vgate-backend"], reply.usage.completion_tokens

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert [tokens for _, tokens in results] == [16] * 32
    spread = collections.Counter(backend for backend, _ in results)
    assert set(spread) == {"w1", "w2"}, spread
    print(f"\n32 concurrent: {dict(spread)}")


def test_a_worker_killed_under_load(stack: Up, client: openai.OpenAI) -> None:
    """Kill w1 (its whole process group, SIGKILL) with streams committed to both workers and
    requests arriving: the requests succeed on w2; each stream ends whole (resumed on w2) or
    with an SSE error event, never silently; w1 is restarted and rejoins."""
    first_pid = stack.worker_pid(stack.ports["w1"])
    streams_n, tokens = 8, 600
    committed = threading.Semaphore(0)
    stop_load = threading.Event()

    def stream(i: int) -> dict[str, Any]:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": f"stream {i}: def fib(n): return"}],
            max_tokens=tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXACT,
        )
        outcome: dict[str, Any] = {"backend": raw.headers["x-vgate-backend"], "text": ""}
        finishes, ids, usage, signalled = [], set(), None, False
        try:
            for chunk in raw.parse():
                ids.add(chunk.id)
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    outcome["text"] += choice.delta.content or ""
                    if choice.finish_reason:
                        finishes.append(choice.finish_reason)
                if outcome["text"] and not signalled:
                    signalled = True
                    committed.release()
        except openai.APIError as exc:  # an SSE error event
            outcome.update(end="error event", error=str(exc))
        else:
            whole = finishes == ["length"] and usage is not None and len(ids) == 1
            outcome.update(end="whole" if whole else "SILENT", finishes=finishes, usage=usage)
        finally:
            if not signalled:
                committed.release()
        return outcome

    def load() -> list[str]:
        seen = []
        while not stop_load.is_set():
            raw = client.chat.completions.with_raw_response.create(
                model="tiny-llama", messages=MESSAGES, max_tokens=32, extra_body=EXACT
            )
            assert raw.parse().usage.completion_tokens == 32  # type: ignore[union-attr]
            seen.append(raw.headers["x-vgate-backend"])
        return seen

    with ThreadPoolExecutor(streams_n + 3) as pool:
        loaders = [pool.submit(load) for _ in range(3)]
        streams = [pool.submit(stream, i) for i in range(streams_n)]
        for _ in range(streams_n):
            assert committed.acquire(timeout=300)
        os.killpg(first_pid, signal.SIGKILL)
        killed = time.monotonic()
        outcomes = [future.result(timeout=600) for future in streams]
        time.sleep(2)
        stop_load.set()
        served = [backend for future in loaders for backend in future.result(timeout=600)]

    ends = collections.Counter((o["backend"], o["end"]) for o in outcomes)
    print(f"\nstreams: {dict(ends)}; requests during the test: {collections.Counter(served)}")
    assert any(o["backend"] == "w1" for o in outcomes), "no stream was on the killed worker"
    assert not [o for o in outcomes if o["end"] == "SILENT"], outcomes
    assert all(o["end"] == "whole" for o in outcomes if o["backend"] == "w2"), outcomes
    for o in outcomes:
        if o["end"] == "error event":
            assert o["backend"] == "w1" and o["error"], o
    assert served.count("w2") > 0

    # The supervisor noticed, said why, restarted it; it is back in rotation and serving.
    poll_until(lambda: "w1" in ready_state(stack)["tiny-llama"]["live"], timeout_s=600)
    rejoined_s = time.monotonic() - killed
    assert stack.worker_pid(stack.ports["w1"]) != first_pid
    log = stack.log()
    assert "worker w1 died: killed by SIGKILL from outside vgate (not the OOM killer)" in log
    assert "worker w1: restarting in" in log

    def lands_on_w1() -> bool:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny-llama", messages=MESSAGES, max_tokens=4, extra_body=EXACT
        )
        return raw.headers["x-vgate-backend"] == "w1"

    poll_until(lands_on_w1, timeout_s=120, interval_s=0.5)
    resumed = [e for e in stack.access_log() if e.get("resumptions")]
    print(f"w1 back in rotation {rejoined_s:.1f}s after the kill; resumed streams: {len(resumed)}")


def test_a_missing_model_fails_the_start_with_vllms_reason(tmp_path: Path) -> None:
    config = {
        "models": [{"name": "tiny-llama"}],
        "workers": [
            {
                "name": "lost",
                "model": "no-such-org/no-such-model",
                "served_name": "tiny-llama",
                "port": free_port(),
                "env": CPU_ENV,
                "log_dir": str(tmp_path),
            }
        ],
    }
    up = launch(tmp_path, config)
    try:
        assert up.popen.wait(300) == 1
    finally:
        up.stop()
    log = up.log()
    assert (
        "vgate: worker lost failed to start: model not found: 'no-such-org/no-such-model'"
        " (exit status 1)"
    ) in log
    assert "| huggingface_hub.errors.LocalEntryNotFoundError" in log
    assert not descendants(up.popen.pid)


def test_sigterm_stops_the_stack_and_leaves_no_process(stack: Up) -> None:
    """Last: stops the module's stack. Every worker's process tree (API server, engine core,
    model worker) is gone, zombies included."""
    table = processes()
    started = descendants(stack.popen.pid)
    groups = {table[pid][1] for pid in started if pid in table}
    assert len(groups) == 3
    assert len(started) >= 9  # per worker: API server, engine core, worker, resource tracker...
    t = time.monotonic()
    assert stack.stop(signal.SIGTERM, timeout_s=120) == 0
    stop_s = time.monotonic() - t
    left = [pid for pgid in groups for pid in group_of(pgid)]
    left += [pid for pid in started if pid in processes()]
    assert not left, {pid: processes().get(pid) for pid in left}
    print(f"\nvgate up stopped in {stop_s:.1f}s, {len(started)} processes, none left")
