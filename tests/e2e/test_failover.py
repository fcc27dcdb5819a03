"""Failover against real processes (issue 11): a timeout is not retried on the backend that
timed out, fallbacks keep a share of the deadline, a broken stream is resumed on a fallback
route, and an error that combines two causes reads as two sentences.

One gateway serves every route here; the routes' backends are three `vgate sim` workers:
`faulty` misbehaves as each test tells it (PUT /sim/faults, which also restarts its request
count), `ok` answers every request, `refusing` answers but cannot continue an assistant
message. Every backend of every route that points at `faulty` is its own backend to the
gateway, however many share the worker.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.config import RetryConfig
from tests.e2e.conftest import new_request_id, wait_for_line
from tests.servers import (
    DEMO_KEY,
    Gateway,
    Process,
    backend,
    gateway_config,
    iter_stop,
    sim_gauge,
    start_gateway,
    start_sim,
)

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "tell me about rivers"}]
NO_BREAKER = {"consecutive_failures": 1000, "min_requests": 1000}
# Wall-time margin over what the gateway must take: process start-up of the answer, the
# fallback's own first token, and a loaded machine's scheduling.
MARGIN_S = 1.0
SILENT_FIRST_TOKEN_S = 2.0
SLOW_FIRST_TOKEN_S = 1.0


def retries(attempts: int, **extra: Any) -> dict[str, Any]:
    """A retries section allowing `attempts` in all, in whichever spelling the config has
    (`max_retries` counts retries only; `attempts` counted the first one too)."""
    if "max_retries" in RetryConfig.model_fields:
        return {"max_retries": attempts - 1, "budget_ratio": 1.0, **extra}
    return {"attempts": attempts, "budget_ratio": 1.0, **extra}


def timeouts(first_token_s: float, total_s: float, **extra: float) -> dict[str, float]:
    return {
        "connect_s": 1,
        "first_token_s": first_token_s,
        "idle_s": 2,
        "total_s": total_s,
        **extra,
    }


@pytest.fixture(scope="module")
def sims(logs: Path) -> Iterator[dict[str, Process]]:
    started = {
        "faulty": start_sim(logs),
        "ok": start_sim(logs),
        "refusing": start_sim(logs, no_continue_final_message=True),
    }
    yield started
    iter_stop(iter(started.values()))


@pytest.fixture(scope="module")
def gateway(logs: Path, sims: dict[str, Process]) -> Iterator[Gateway]:
    faulty, ok = sims["faulty"].url, sims["ok"].url

    def on(url: str, name: str, **extra: Any) -> dict[str, Any]:
        return backend(name, url, model="tiny-llama", **extra)

    def route(name: str, *backends: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"name": name, "breaker": NO_BREAKER, "backends": list(backends), **extra}

    # The fallbacks: a first token within 1 s, which is also the share of a primary's
    # total_s they are kept (fallback_reserve_s unset: the first fallback's first_token_s).
    rescue_timeouts = timeouts(1, 20)
    models = [
        route("rescue", on(ok, "rescuer"), timeouts=rescue_timeouts),
        route(
            "rescue-regenerating",
            on(ok, "regenerator", continue_final_message=False),
            timeouts=rescue_timeouts,
        ),
        route("rescue-refusing", on(sims["refusing"].url, "refuser"), timeouts=rescue_timeouts),
        # A: one backend that times out, three attempts allowed, a healthy fallback.
        route(
            "silent",
            on(faulty, "silent-1"),
            timeouts=timeouts(SILENT_FIRST_TOKEN_S, 20),
            retries=retries(3, backoff_initial_s=0.01),
            fallbacks=["rescue"],
        ),
        route(
            "slow",
            on(faulty, "slow-1"),
            timeouts=timeouts(SLOW_FIRST_TOKEN_S, 20),
            retries=retries(3, backoff_initial_s=0.01),
            fallbacks=["rescue"],
        ),
        # A: two backends, one silent, no fallback; the silent one is picked first.
        route(
            "pair",
            on(faulty, "pair-silent", weight=1000),
            on(ok, "pair-healthy"),
            timeouts=timeouts(SILENT_FIRST_TOKEN_S, 20),
            retries=retries(3, backoff_initial_s=0.01),
        ),
        # A: fast failures on the only backend, no fallback.
        route(
            "flaky",
            on(faulty, "flaky-1"),
            timeouts=timeouts(5, 20),
            retries=retries(2, backoff_initial_s=0.01, retry_after_max_s=2),
        ),
        # B: three silent backends whose attempts would use the whole of total_s.
        route(
            "three-silent",
            on(faulty, "mute-1"),
            on(faulty, "mute-2"),
            on(faulty, "mute-3"),
            timeouts=timeouts(1, 3),
            retries=retries(3, backoff_initial_s=0.01),
            fallbacks=["rescue"],
        ),
        route(
            "three-silent-reserved",
            on(faulty, "hush-1"),
            on(faulty, "hush-2"),
            on(faulty, "hush-3"),
            timeouts=timeouts(1, 3, fallback_reserve_s=2),
            retries=retries(3, backoff_initial_s=0.01),
            fallbacks=["rescue"],
        ),
        route(
            "silent-passthrough",
            on(faulty, "quiet-1"),
            non_stream="passthrough",
            timeouts=timeouts(1, 3),
            retries=retries(3, backoff_initial_s=0.01),
            fallbacks=["rescue"],
        ),
        # C: a single backend whose streams break, a fallback to continue on.
        route("cut-prefill", on(faulty, "cut-p"), timeouts=timeouts(5, 20), fallbacks=["rescue"]),
        route(
            "cut-regenerate",
            on(faulty, "cut-r"),
            timeouts=timeouts(5, 20),
            fallbacks=["rescue-regenerating"],
        ),
        # D: a broken stream that cannot be resumed, for two reasons.
        route(
            "cut-unreplayable",
            on(faulty, "cut-u"),
            timeouts=timeouts(5, 20),
            resume={"max_text_chars": 1},
        ),
        route(
            "cut-refused",
            on(faulty, "cut-f"),
            timeouts=timeouts(5, 20),
            fallbacks=["rescue-refusing"],
        ),
    ]
    process = start_gateway(logs, gateway_config(models))
    yield process
    process.stop()


@pytest.fixture
def faulty(sims: dict[str, Process]) -> Iterator[Any]:
    """Set the faulty worker's faults (its request count starts afresh); cleared after."""
    url = sims["faulty"].url

    def set_faults(**faults: Any) -> None:
        httpx.put(url + "/sim/faults", json=faults).raise_for_status()

    yield set_faults
    httpx.delete(url + "/sim/faults").raise_for_status()


@pytest.fixture
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=30
    ) as sdk:
        yield sdk


def sim_requests(sim: Process) -> int:
    """Inference requests the worker was sent since its faults were last set."""
    return int(httpx.get(sim.url + "/sim/stats").json()["requests"])


def metric_sum(gateway: Gateway, name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include `labels`."""
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    total = 0.0
    for line in httpx.get(gateway.url + "/metrics").text.splitlines():
        series, _, value = line.rpartition(" ")
        metric_name, _, label_text = series.partition("{")
        if metric_name == name and wanted <= set(label_text.removesuffix("}").split(",")):
            total += float(value)
    return total


def ask(
    client: openai.OpenAI, model: str, *, stream: bool, max_tokens: int = 3
) -> tuple[str, str, Any, float, str]:
    """One request: (answer text, the answering model's header, usage, wall seconds, its
    request id)."""
    request_id = new_request_id()
    headers = {"X-Request-ID": request_id}
    chat = client.chat.completions.with_raw_response
    started = time.monotonic()
    if stream:
        streamed = chat.create(
            model=model,
            messages=MESSAGES,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
        chunks = list(streamed.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage, answered_as = chunks[-1].usage, streamed.headers["x-vgate-model"]
    else:
        whole = chat.create(
            model=model, messages=MESSAGES, max_tokens=max_tokens, extra_headers=headers
        )
        reply = whole.parse()
        text, usage = reply.choices[0].message.content or "", reply.usage
        answered_as = whole.headers["x-vgate-model"]
    elapsed = time.monotonic() - started
    return text, answered_as, usage, elapsed, request_id


def choices(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """(route, backend) of each backend chosen, as the request's log line records them (a
    decision that found no backend left chose none)."""
    return [(d["route"], d["choice"]) for d in entry["decisions"] if d["choice"] is not None]


def straight_to(sim: Process, max_tokens: int) -> tuple[str, dict[str, int]]:
    """The request's answer from `sim` itself, past the gateway. The sims are deterministic
    (the same model and messages, the same words): it is what an unbroken stream says."""
    body = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": max_tokens}
    reply = httpx.post(sim.url + "/v1/chat/completions", json=body, timeout=10)
    reply.raise_for_status()
    data = reply.json()
    return data["choices"][0]["message"]["content"], data["usage"]


# ------------------------------------------------------------------------------------------
# A. A timeout is not retried on the backend that timed out.


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_a_silent_only_backend_is_tried_once_then_the_fallback_answers(
    gateway: Gateway,
    sims: dict[str, Process],
    client: openai.OpenAI,
    faulty: Any,
    stream: bool,
) -> None:
    faulty(hang=True)  # accepts the request, never sends headers
    text, model, _, elapsed, request_id = ask(client, "silent", stream=stream)
    assert model == "rescue" and text
    # One first-token window on the silent backend, then the fallback: not three windows.
    assert elapsed < SILENT_FIRST_TOKEN_S + MARGIN_S, f"answered after {elapsed:.2f}s"
    entry = wait_for_line(gateway, request_id)
    assert entry["status"] == 200 and entry["error"] is None
    assert entry["model"] == "rescue" and entry["fallback_from"] == "silent"
    assert choices(entry) == [("silent", "silent-1"), ("rescue", "rescuer")]
    assert entry["attempts"] == 2  # across routes: one on each
    assert sim_requests(sims["faulty"]) == 1


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_a_first_token_too_late_is_waited_for_once_then_the_fallback_answers(
    gateway: Gateway,
    sims: dict[str, Process],
    client: openai.OpenAI,
    faulty: Any,
    stream: bool,
) -> None:
    faulty(latency_ms=5000)  # every answer starts 5 s late; first_token_s is 1
    text, model, _, elapsed, request_id = ask(client, "slow", stream=stream)
    assert model == "rescue" and text
    assert elapsed < SLOW_FIRST_TOKEN_S + MARGIN_S, f"answered after {elapsed:.2f}s"
    entry = wait_for_line(gateway, request_id)
    assert entry["fallback_from"] == "slow"
    assert choices(entry) == [("slow", "slow-1"), ("rescue", "rescuer")]
    assert sim_requests(sims["faulty"]) == 1


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_after_a_timeout_the_next_attempt_goes_to_the_untried_backend(
    gateway: Gateway,
    sims: dict[str, Process],
    client: openai.OpenAI,
    faulty: Any,
    stream: bool,
) -> None:
    faulty(hang=True)
    text, model, _, elapsed, request_id = ask(client, "pair", stream=stream)
    assert model == "pair" and text
    entry = wait_for_line(gateway, request_id)
    assert entry["backend"] == "pair-healthy" and entry["fallback_from"] is None
    # The silent backend weighs 1000 to the healthy one's 1: it is picked first, times
    # out, and the retry goes to the other (never the silent one a second time).
    assert choices(entry) == [("pair", "pair-silent"), ("pair", "pair-healthy")]
    assert elapsed < SILENT_FIRST_TOKEN_S + MARGIN_S, f"answered after {elapsed:.2f}s"
    assert sim_requests(sims["faulty"]) == 1


@pytest.mark.parametrize(
    "fault",
    [
        {"error_status": 500},
        {"error_status": 503},
        {"error_status": 429, "retry_after_s": 1},
        {"reset": True},
    ],
    ids=["500", "503", "429-retry-after", "reset"],
)
def test_a_fast_failure_is_still_retried_on_the_only_backend(
    gateway: Gateway,
    sims: dict[str, Process],
    client: openai.OpenAI,
    faulty: Any,
    fault: dict[str, Any],
) -> None:
    # A rate of 0.5 fails requests 1, 3, 5...: request 0 goes straight to the worker, so
    # the gateway's first attempt fails and its second is answered.
    faulty(**fault, error_rate=0.5)
    straight_to(sims["faulty"], 1)
    text, model, _, elapsed, request_id = ask(client, "flaky", stream=False)
    assert model == "flaky" and text
    entry = wait_for_line(gateway, request_id)
    assert entry["status"] == 200 and entry["attempts"] == 2
    assert choices(entry) == [("flaky", "flaky-1"), ("flaky", "flaky-1")]
    stats = httpx.get(sims["faulty"].url + "/sim/stats").json()
    assert stats == {"requests": 3, "faulted": 1}
    if "retry_after_s" in fault:
        assert elapsed >= 1.0  # the upstream's Retry-After was honoured before the retry
    assert elapsed < 3.0


# ------------------------------------------------------------------------------------------
# B. Fallbacks keep a share of the deadline.


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
@pytest.mark.parametrize(
    ("model", "attempts"),
    [
        # fallback_reserve_s unset: the fallback's first_token_s (1 s) is kept for it,
        # which leaves the route two of its three 1 s attempts.
        ("three-silent", 2),
        # fallback_reserve_s 2: the route has 1 s, one attempt.
        ("three-silent-reserved", 1),
    ],
)
def test_three_silent_backends_leave_the_fallback_its_share_of_total_s(
    gateway: Gateway,
    sims: dict[str, Process],
    client: openai.OpenAI,
    faulty: Any,
    stream: bool,
    model: str,
    attempts: int,
) -> None:
    # total_s 3, first_token_s 1: three attempts would take it all and end in a 504.
    faulty(hang=True)
    text, answered_as, _, elapsed, request_id = ask(client, model, stream=stream)
    assert answered_as == "rescue" and text
    assert elapsed < 3.5, f"answered after {elapsed:.2f}s"
    assert elapsed >= attempts * 1.0  # each attempt had its whole first-token window
    entry = wait_for_line(gateway, request_id)
    assert entry["status"] == 200 and entry["fallback_from"] == model
    tried = [name for route, name in choices(entry) if route == model]
    assert len(tried) == len(set(tried)) == attempts  # a timed-out backend is left alone
    assert choices(entry)[-1] == ("rescue", "rescuer")
    assert sim_requests(sims["faulty"]) == attempts


def test_a_silent_passthrough_answer_leaves_the_fallback_its_share_of_total_s(
    gateway: Gateway, sims: dict[str, Process], client: openai.OpenAI, faulty: Any
) -> None:
    # Passed through, a non-streaming answer is bounded by total_s alone: without the
    # reserve the silent backend used all 3 s and the client got a 504.
    faulty(hang=True)
    text, model, _, elapsed, request_id = ask(client, "silent-passthrough", stream=False)
    assert model == "rescue" and text
    assert elapsed < 3.5, f"answered after {elapsed:.2f}s"
    entry = wait_for_line(gateway, request_id)
    assert choices(entry) == [("silent-passthrough", "quiet-1"), ("rescue", "rescuer")]
    assert sim_requests(sims["faulty"]) == 1


# ------------------------------------------------------------------------------------------
# C. Resumption continues on a fallback route.


@pytest.mark.parametrize(
    ("model", "mode", "rescuer"),
    [("cut-prefill", "prefill", "rescuer"), ("cut-regenerate", "regenerate", "regenerator")],
)
def test_a_stream_cut_on_a_single_backend_route_is_resumed_on_its_fallback(
    gateway: Gateway,
    sims: dict[str, Process],
    client: openai.OpenAI,
    faulty: Any,
    model: str,
    mode: str,
    rescuer: str,
) -> None:
    expected, expected_usage = straight_to(sims["ok"], 60)
    faulty(cut_after_chunks=40)  # the role chunk and 39 tokens reach the client
    labels = {"mode": mode, "outcome": "resumed"}
    resumed_before = metric_sum(gateway, "vgate_stream_resumptions_total", **labels)
    prompt_before = sim_gauge(sims["ok"].url, "vllm:prompt_tokens_total")
    generated_before = sim_gauge(sims["ok"].url, "vllm:generation_tokens_total")
    text, answered_as, usage, _, request_id = ask(client, model, stream=True, max_tokens=60)
    assert answered_as == model  # the headers went out before the stream broke
    assert text == expected
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected_usage["prompt_tokens"], 60)
    entry = wait_for_line(gateway, request_id)
    assert entry["status"] == 200 and entry["error"] is None
    assert entry["resumptions"] == 1 and entry["backend"] == rescuer
    assert sim_requests(sims["faulty"]) == 1  # never back to the backend that broke
    prompt_sent = sim_gauge(sims["ok"].url, "vllm:prompt_tokens_total") - prompt_before
    generated = sim_gauge(sims["ok"].url, "vllm:generation_tokens_total") - generated_before
    if mode == "prefill":
        # The fallback was sent the 39 delivered tokens to continue, and made the other 21.
        assert (prompt_sent, generated) == (expected_usage["prompt_tokens"] + 39, 21)
    else:
        assert (prompt_sent, generated) == (expected_usage["prompt_tokens"], 60)
    resumed = metric_sum(gateway, "vgate_stream_resumptions_total", **labels) - resumed_before
    assert resumed == 1


# ------------------------------------------------------------------------------------------
# D. Errors that combine two causes keep a separator.

# How the second cause starts: a sentence of its own.
SECOND_CAUSE = re.compile(r"(It was not resumed|Resuming it failed):")


@pytest.mark.parametrize(
    ("model", "second_cause"),
    [
        # Not resumable at all: its answer is longer than resume.max_text_chars (1).
        ("cut-unreplayable", "It was not resumed"),
        # Resumed on the fallback, whose worker refuses to continue an assistant message.
        ("cut-refused", "Resuming it failed"),
    ],
)
def test_an_unresumed_stream_names_both_causes_as_two_sentences(
    client: openai.OpenAI, faulty: Any, model: str, second_cause: str
) -> None:
    faulty(cut_after_chunks=10)
    with pytest.raises(openai.APIError) as caught:
        ask(client, model, stream=True, max_tokens=60)
    message = caught.value.message
    found = SECOND_CAUSE.search(message)
    assert found is not None and found.group(1) == second_cause, message
    first_cause = message[: found.start()]
    assert "broke off the stream" in first_cause, message
    assert first_cause.endswith((". ", "! ", "? ")), message  # never "...connection It was"
