"""Streams that break after reaching the client are continued elsewhere, as one answer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import new_request_id, wait_for_line
from tests.servers import (
    DEMO_KEY,
    Gateway,
    Process,
    backend,
    gateway_config,
    iter_stop,
    poll_until,
    sim_gauge,
    start_gateway,
    start_sim,
)

MESSAGES = [{"role": "user", "content": "tell me about rivers"}]
IDLE_S = 0.5
# The faulty worker is picked first (its weight) and misbehaves as each test tells it.
FIRST = {"weight": 1000}
NO_PREFILL = {"continue_final_message": False}


@pytest.fixture(scope="module")
def sims(logs: Path) -> Iterator[dict[str, Process]]:
    started = {
        "faulty": start_sim(logs),
        "ok": start_sim(logs),
        "other": start_sim(logs, models=("other-llama",)),
        "refusing": start_sim(logs, no_continue_final_message=True),
    }
    yield started
    iter_stop(iter(started.values()))


@pytest.fixture(scope="module")
def gateway(logs: Path, sims: dict[str, Process]) -> Iterator[Gateway]:
    faulty, ok = sims["faulty"].url, sims["ok"].url
    # Only idle_s is short: a stall that it did not end would run on for 20 s or more.
    timeouts = {"connect_s": 1, "first_token_s": 20, "idle_s": IDLE_S, "total_s": 30}

    def route(name: str, *backends: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "timeouts": timeouts, "backends": list(backends)}

    models = [
        route(
            "prefill",
            backend("p1", faulty, model="tiny-llama", **FIRST),
            backend("p2", ok, model="tiny-llama"),
        ),
        route(
            "regenerate",
            backend("r1", faulty, model="tiny-llama", **FIRST, **NO_PREFILL),
            backend("r2", ok, model="tiny-llama", **NO_PREFILL),
        ),
        route(
            "diverging",
            backend("d1", faulty, model="tiny-llama", **FIRST, **NO_PREFILL),
            backend("d2", sims["other"].url, model="other-llama", **NO_PREFILL),
        ),
        route(
            "refused",
            backend("f1", faulty, model="tiny-llama", **FIRST),
            backend("f2", sims["refusing"].url, model="tiny-llama"),
        ),
        route("alone", backend("a1", faulty, model="tiny-llama")),
        {
            **route("unresumed", backend("u1", faulty, model="tiny-llama")),
            "resume": {"enabled": False},
        },
    ]
    process = start_gateway(logs, gateway_config(models))
    yield process
    process.stop()


@pytest.fixture
def faulty(sims: dict[str, Process]) -> Iterator[Any]:
    url = sims["faulty"].url

    def set_faults(**faults: Any) -> None:
        httpx.put(url + "/sim/faults", json=faults).raise_for_status()

    yield set_faults
    httpx.delete(url + "/sim/faults").raise_for_status()


@pytest.fixture
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=20
    ) as sdk:
        yield sdk


def streamed(client: openai.OpenAI, model: str, **extra: Any) -> tuple[str, Any, list[Any]]:
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=60,
            stream=True,
            stream_options={"include_usage": True},
            **extra,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage, chunks


def whole_answer(client: openai.OpenAI) -> tuple[str, Any]:
    """What the route answers when nothing breaks: the reference."""
    reply = client.chat.completions.create(
        model="prefill",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=60,
    )
    return reply.choices[0].message.content or "", reply.usage


def last_entry(gateway: Gateway, before: int) -> dict[str, Any]:
    return gateway.wait_for_log(before + 1)[-1]


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    """A sample's value, 0 when absent; labels in any order, as Prometheus sorts them."""
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    for line in httpx.get(gateway.url + "/metrics").text.splitlines():
        series, _, value = line.rpartition(" ")
        metric_name, _, label_text = series.partition("{")
        if metric_name == name and set(label_text.removesuffix("}").split(",")) == wanted:
            return float(value)
    return 0.0


def test_a_stream_cut_after_40_of_60_tokens_is_continued_from_a_prefill(
    gateway: Gateway, sims: dict[str, Process], client: openai.OpenAI, faulty: Any
) -> None:
    expected, expected_usage = whole_answer(client)
    faulty(cut_after_chunks=40)  # the role chunk and 39 tokens reach the client
    prompt_before = sim_gauge(sims["ok"].url, "vllm:prompt_tokens_total")
    before = len(gateway.access_log())
    text, usage, chunks = streamed(client, "prefill")
    assert text == expected
    assert len(text.split()) == 60
    assert usage.completion_tokens == 60
    assert usage.prompt_tokens == expected_usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1  # one answer, one id
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
    # The healthy worker was sent the 39 delivered tokens as a prefill to continue.
    prompt_after = sim_gauge(sims["ok"].url, "vllm:prompt_tokens_total")
    assert prompt_after - prompt_before == expected_usage.prompt_tokens + 39
    entry = last_entry(gateway, before)
    assert entry["status"] == 200 and entry["error"] is None
    assert entry["resumptions"] == 1 and entry["backend"] == "p2"
    assert entry["completion_tokens"] == 60
    labels = {"model": "prefill", "mode": "prefill", "outcome": "resumed"}
    assert metric(gateway, "vgate_stream_resumptions_total", **labels) == 1


def test_a_stream_cut_after_40_of_60_tokens_is_regenerated_and_matched(
    gateway: Gateway, sims: dict[str, Process], client: openai.OpenAI, faulty: Any
) -> None:
    expected, expected_usage = whole_answer(client)
    faulty(cut_after_chunks=40)
    generated_before = sim_gauge(sims["ok"].url, "vllm:generation_tokens_total")
    before = len(gateway.access_log())
    text, usage, _ = streamed(client, "regenerate")
    assert text == expected
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        expected_usage.prompt_tokens,
        60,
    )
    # Regenerated from the start: all 60 tokens again, the first 39 held back.
    generated_after = sim_gauge(sims["ok"].url, "vllm:generation_tokens_total")
    assert generated_after - generated_before == 60
    entry = last_entry(gateway, before)
    assert entry["resumptions"] == 1 and entry["backend"] == "r2"
    labels = {"model": "regenerate", "mode": "regenerate", "outcome": "resumed"}
    assert metric(gateway, "vgate_stream_resumptions_total", **labels) == 1


def test_a_completions_stream_is_resumed_by_regenerating(
    client: openai.OpenAI, faulty: Any
) -> None:
    def complete() -> str:
        chunks = client.completions.create(
            model="prefill", prompt="rivers run", max_tokens=30, stream=True
        )
        return "".join(c.choices[0].text for c in chunks if c.choices)

    expected = complete()
    faulty(cut_after_chunks=12)
    assert complete() == expected


def test_a_stalled_stream_is_resumed_within_the_idle_timeout_and_one_attempt(
    gateway: Gateway, client: openai.OpenAI, faulty: Any
) -> None:
    expected, _ = whole_answer(client)
    faulty(stall_after_chunks=40)
    request_id = new_request_id()
    started = time.monotonic()
    text, usage, _ = streamed(client, "prefill", extra_headers={"X-Request-ID": request_id})
    elapsed = time.monotonic() - started
    assert text == expected and usage.completion_tokens == 60
    # Resumed once the stream was idle for idle_s, not at a later deadline (20 s and more
    # away: the margin is for a slow machine), and in one attempt.
    assert IDLE_S <= elapsed < IDLE_S + 6.0
    entry = wait_for_line(gateway, request_id)
    assert entry["resumptions"] == 1 and entry["backend"] == "p2"


def test_a_regenerated_answer_that_diverges_ends_with_an_error_event(
    gateway: Gateway, client: openai.OpenAI, faulty: Any
) -> None:
    faulty(cut_after_chunks=40)
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(
            model="diverging",
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=60,
            stream=True,
        ):
            received.append(chunk.choices[0].delta.content or "")
    assert "departs from the text already delivered" in caught.value.message
    assert "d2" in caught.value.message
    assert len("".join(received).split()) == 39  # nothing spliced on
    labels = {"model": "diverging", "mode": "regenerate", "outcome": "diverged"}
    assert metric(gateway, "vgate_stream_resumptions_total", **labels) == 1


def test_a_refused_prefill_reports_the_original_failure(
    gateway: Gateway, client: openai.OpenAI, faulty: Any
) -> None:
    faulty(cut_after_chunks=40)
    with pytest.raises(openai.APIError) as caught:
        streamed(client, "refused")
    message = caught.value.message
    assert message.startswith("Backend 'f1' broke off the stream")
    assert "Resuming it failed" in message and "continue_final_message" in message
    labels = {"model": "refused", "mode": "prefill", "outcome": "failed"}
    assert metric(gateway, "vgate_stream_resumptions_total", **labels) == 1


def test_resumption_is_bounded_by_its_attempts(
    gateway: Gateway, client: openai.OpenAI, faulty: Any
) -> None:
    faulty(cut_after_chunks=10)  # every stream of its only backend breaks
    before = len(gateway.access_log())
    with pytest.raises(openai.APIError) as caught:
        streamed(client, "alone")
    assert "It was not resumed: it was already resumed 2 times" in caught.value.message
    entry = last_entry(gateway, before)
    assert entry["resumptions"] == 2 and entry["error"] == "upstream_stream_broken"


def test_without_resumption_a_broken_stream_ends_with_an_error_event(
    client: openai.OpenAI, faulty: Any
) -> None:
    faulty(cut_after_chunks=10)
    with pytest.raises(openai.APIError, match="broke off the stream"):
        streamed(client, "unresumed")


def test_an_unparseable_chunk_is_dropped_and_counted(
    gateway: Gateway, client: openai.OpenAI, faulty: Any
) -> None:
    expected, _ = whole_answer(client)
    faulty(garbage_after_chunks=5)
    before = len(gateway.access_log())
    text, usage, _ = streamed(client, "prefill")  # the SDK would fail on the garbage
    assert text == expected and usage.completion_tokens == 60
    entry = last_entry(gateway, before)
    assert entry["dropped_events"] == 1 and entry["resumptions"] == 0
    poll_until(lambda: metric(gateway, "vgate_stream_events_dropped_total", model="prefill") == 1)
