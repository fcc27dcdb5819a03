"""Non-streaming answers assembled from vLLM's stream equal vLLM's own non-streaming ones.

The gateway asks real vLLM for a stream and builds the JSON answer (route `non_stream:
assemble`, the default); the same request sent straight to the worker that answered must get
the same choices, logprobs and usage. Runs on the session's `vgate up` stack
(tests/vllm/conftest.py), before tests/vllm/test_real_vllm.py, whose last test stops it.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.servers import DEMO_KEY, poll_until
from tests.upstack import Up, ready_state

AUTH = {"Authorization": f"Bearer {DEMO_KEY}"}
MESSAGES = [{"role": "user", "content": "def fib(n): return"}]
GREEDY = {"temperature": 0, "ignore_eos": True}  # the random model may draw <|im_end|> early


@pytest.fixture(autouse=True)
def chat_workers_live(stack: Up) -> None:
    poll_until(lambda: ready_state(stack)["tiny-llama"]["live"] == ["w1", "w2"], timeout_s=600)


def both(stack: Up, path: str, payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The gateway's answer, and the answer of the worker that gave it, asked directly."""
    body = {"model": "tiny-llama", **payload}
    through = httpx.post(stack.url + path, json=body, headers=AUTH, timeout=300)
    assert through.status_code == 200, through.text
    worker = through.headers["x-vgate-backend"]
    direct = httpx.post(f"http://127.0.0.1:{stack.ports[worker]}{path}", json=body, timeout=300)
    assert direct.status_code == 200, direct.text
    return through.json(), direct.json()


def assert_same(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """All but the fresh id and time, and the nulls vLLM adds to a whole answer (message
    `refusal`/`audio`..., `prompt_logprobs`, `system_fingerprint`, usage details)."""
    assert (ours["object"], ours["model"]) == (theirs["object"], theirs["model"])
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert ours["usage"][key] == theirs["usage"][key], key
    assert len(ours["choices"]) == len(theirs["choices"])
    for mine, real in zip(ours["choices"], theirs["choices"], strict=True):
        for key in ("index", "finish_reason", "stop_reason", "logprobs", "text"):
            assert mine.get(key) == real.get(key), key
        if "message" in real:
            for key in ("role", "content"):
                assert mine["message"][key] == real["message"][key], key
            # vLLM writes an empty list where the stream had no tool calls at all.
            assert (mine["message"].get("tool_calls") or []) == (
                real["message"].get("tool_calls") or []
            )


def test_chat_with_logprobs(stack: Up) -> None:
    payload = {"messages": MESSAGES, "max_tokens": 12, "logprobs": True, "top_logprobs": 2}
    ours, theirs = both(stack, "/v1/chat/completions", {**payload, **GREEDY})
    assert ours["choices"][0]["logprobs"]["content"]  # a list per token, concatenated
    assert_same(ours, theirs)


def test_chat_with_two_sampled_choices(stack: Up) -> None:
    payload = {"messages": MESSAGES, "max_tokens": 8, "n": 2, "temperature": 1.0, "seed": 7}
    ours, theirs = both(stack, "/v1/chat/completions", {**payload, "ignore_eos": True})
    assert [choice["index"] for choice in ours["choices"]] == [0, 1]
    assert_same(ours, theirs)


def test_completions_batch_with_logprobs_and_echo(stack: Up) -> None:
    payload = {"prompt": ["def fib(n):", "import os"], "max_tokens": 6, "logprobs": 2}
    ours, theirs = both(stack, "/v1/completions", {**payload, **GREEDY})
    assert_same(ours, theirs)
    echoed, real = both(
        stack, "/v1/completions", {"prompt": "x = 1", "max_tokens": 3, "echo": True, **GREEDY}
    )
    assert echoed["choices"][0]["text"].startswith("x = 1")
    assert_same(echoed, real)
