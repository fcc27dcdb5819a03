"""Chaos and the response cache in front of real vLLM workers: `vgate up` with an outage
injected on one of them, and the cache on (requests that do not ask for a deterministic
answer bypass it, as the chaos test's do).

A stack of its own for the module (tests/vllm/conftest.py's is for test_real_vllm.py, and
takes no extra config): w1 and w2 serve the tiny random Llama as tiny-llama, and the config's
one experiment answers every request sent to w1 with a 503. w1 comes first (its weight) and no
breaker opens, so every request meets the fault, and is answered by w2 instead. w1 itself
never sees those requests: vLLM's own counters show where each one went.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.edge.auth import hash_key
from tests.servers import DEMO_KEY, free_port, poll_until
from tests.upstack import Up, start_up
from tests.vllm.conftest import MAX_MODEL_LEN, START_TIMEOUT_S, chat_worker

ADMIN = "vg-admin-0123456789abcdefghijklmnop"
MESSAGES: Any = [{"role": "user", "content": "def fib(n): return"}]
EXACT = {"ignore_eos": True}  # the random model may draw <|im_end|> at any step
FINISHED = "vllm:request_success_total"


@pytest.fixture(scope="module")
def stack(vllm_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    log_dir = tmp_path_factory.mktemp("vllm-chaos")
    config = {
        "models": [
            {
                "name": "tiny-llama",
                "context_window": MAX_MODEL_LEN,
                "timeouts": {"first_token_s": 120, "idle_s": 60, "total_s": 600},
                "breaker": {"consecutive_failures": 1000, "min_requests": 1000},
                "retries": {"max_retries": 1, "backoff_initial_s": 0.001, "budget_ratio": 1.0},
            }
        ],
        "workers": [
            {**chat_worker("w1", free_port(), log_dir), "weight": 1000},
            chat_worker("w2", free_port(), log_dir),
        ],
        "admin": {"key_sha256_env": "VGATE_TEST_ADMIN_SHA256"},
        "cache": {"enabled": True},
        "chaos": {
            "enabled": True,
            "experiments": [
                {"name": "outage", "fault": {"kind": "error", "status": 503}, "backends": ["w1"]}
            ],
        },
    }
    up = start_up(
        log_dir,
        config,
        timeout_s=START_TIMEOUT_S + 30,
        env={"VGATE_TEST_ADMIN_SHA256": hash_key(ADMIN)},
    )
    yield up
    up.stop(timeout_s=120)


def finished(stack: Up) -> dict[str, float]:
    """vLLM's own count of the requests each worker finished."""
    out: dict[str, float] = collections.defaultdict(float)
    for worker, port in stack.ports.items():
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10.0).text
        for line in text.splitlines():
            if line.startswith(FINISHED + "{"):
                out[worker] += float(line.rsplit(" ", 1)[1])
    return out


def injected(stack: Up) -> float:
    wanted = 'vgate_chaos_injected_total{experiment="outage",fault="error"} '
    for line in httpx.get(stack.url + "/metrics", timeout=10.0).text.splitlines():
        if line.startswith(wanted):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def line_of(stack: Up, request_id: str) -> dict[str, Any]:
    found = poll_until(
        lambda: [e for e in stack.access_log() if e["request_id"] == request_id], timeout_s=30
    )
    assert len(found) == 1
    return found[0]  # type: ignore[no-any-return]


def test_an_outage_injected_on_one_vllm_worker_is_answered_by_the_other(stack: Up) -> None:
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=300)
    before, injected_before = finished(stack), injected(stack)
    ids = []
    for stream in (False, True, False, True):
        request_id = f"chaos-{uuid.uuid4().hex}"
        ids.append(request_id)
        headers = {"X-Request-ID": request_id}
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model="tiny-llama",
                    messages=MESSAGES,
                    max_tokens=8,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body=EXACT,
                    extra_headers=headers,
                )
            )
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
        else:
            raw = client.chat.completions.with_raw_response.create(
                model="tiny-llama",
                messages=MESSAGES,
                max_tokens=8,
                extra_body=EXACT,
                extra_headers=headers,
            )
            assert raw.headers["x-vgate-backend"] == "w2"
            usage = raw.parse().usage
            assert usage is not None and usage.completion_tokens == 8
    for request_id in ids:
        line = line_of(stack, request_id)
        assert line["chaos"] == ["outage:error"]
        assert (line["status"], line["attempts"], line["backend"]) == (200, 2, "w2")
    assert injected(stack) - injected_before == 4
    # Injected in front of w1: it never saw these requests, w2 served all four.
    poll_until(lambda: finished(stack)["w2"] - before["w2"] == 4, timeout_s=10)
    assert finished(stack)["w1"] == before["w1"]

    # Stopped at run time: w1 answers again, and nothing more is injected.
    admin = {"Authorization": f"Bearer {ADMIN}"}
    listed = httpx.get(stack.url + "/admin/chaos", headers=admin, timeout=10).json()
    assert [(e["name"], e["injected"]) for e in listed["data"]] == [("outage", 4)]
    stopped = httpx.delete(stack.url + "/admin/chaos/outage", headers=admin, timeout=10)
    assert stopped.status_code == 200, stopped.text
    request_id = f"chaos-{uuid.uuid4().hex}"
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-llama",
        messages=MESSAGES,
        max_tokens=8,
        extra_body=EXACT,
        extra_headers={"X-Request-ID": request_id},
    )
    assert raw.headers["x-vgate-backend"] == "w1"
    line = line_of(stack, request_id)
    assert "chaos" not in line and line["attempts"] == 1
    assert injected(stack) - injected_before == 4


def test_a_repeated_deterministic_request_is_served_from_the_cache_with_the_same_answer(
    stack: Up,
) -> None:
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=300)
    asked: Any = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": f"cache me {uuid.uuid4().hex}"}],
        "max_tokens": 8,
        "temperature": 0,
        "extra_body": EXACT,
    }
    before = sum(finished(stack).values())
    first = client.chat.completions.with_raw_response.create(**asked)
    assert first.headers["x-vgate-cache"] == "miss"
    poll_until(lambda: sum(finished(stack).values()) - before == 1, timeout_s=10)

    second = client.chat.completions.with_raw_response.create(**asked)
    assert second.headers["x-vgate-cache"] == "hit"
    answer, again = first.parse(), second.parse()
    assert again.choices[0].message.content == answer.choices[0].message.content
    assert again.usage == answer.usage
    # The same request as a stream: a hit too, the same text as SSE.
    chunks = list(client.chat.completions.create(**asked, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    assert sum(finished(stack).values()) - before == 1  # vLLM answered once
