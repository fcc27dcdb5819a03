"""What operators rely on: metrics, health and readiness, start-up checks, the OpenAI adapter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import new_request_id, wait_for_line
from tests.servers import (
    DEMO_KEY,
    REPO,
    Gateway,
    Process,
    backend,
    free_port,
    gateway_config,
    start_gateway,
    start_sim,
)

MESSAGES = [{"role": "user", "content": "hello there"}]


def samples(gateway: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(gateway.url + "/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_requests_tokens_and_overhead(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    before = samples(gateway)
    request_ids = [new_request_id() for _ in range(2)]
    completion = client.chat.completions.create(
        model="default",
        messages=MESSAGES,
        max_tokens=3,
        extra_headers={"X-Request-ID": request_ids[0]},
    )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="nope", messages=MESSAGES, extra_headers={"X-Request-ID": request_ids[1]}
        )
    # A request is counted as it ends, just after its response went out, and its access-log
    # line is written just after that: once both lines are there, so is every observation.
    for request_id in request_ids:
        wait_for_line(gateway, request_id)
    after = samples(gateway)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("vgate_requests_total", endpoint="chat", model="tiny-llama", status="200") == 1
    assert delta("vgate_requests_total", endpoint="chat", model="none", status="404") == 1
    assert delta("vgate_tokens_generated_total", model="tiny-llama") == 3
    assert delta("vgate_tokens_prompt_total", model="tiny-llama") == completion.usage.prompt_tokens
    assert delta("vgate_gateway_overhead_seconds_count", endpoint="chat") == 2
    assert after[("vgate_requests_in_flight", frozenset())] == 0
    # Unknown model names, keys and request ids never become label values.
    labels = {value for _, label_set in after for _, value in label_set}
    assert "nope" not in labels and "demo" not in labels


def test_latency_histograms_count_every_request_and_hold_no_id_or_key(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    before = samples(gateway)
    request_ids = [new_request_id() for _ in range(4)]
    plain, streamed = request_ids[:2], request_ids[2:]
    for request_id in plain:
        client.chat.completions.create(
            model="tiny-llama",
            messages=MESSAGES,
            max_tokens=2,
            extra_headers={"X-Request-ID": request_id},
        )
    for request_id in streamed:
        chunks = list(
            client.chat.completions.create(
                model="tiny-llama",
                messages=MESSAGES,
                max_tokens=2,
                stream=True,
                extra_headers={"X-Request-ID": request_id},
            )
        )
        assert chunks
    # Metrics are observed as a request ends, the access-log line just after: once every
    # line is there, every observation is too.
    for request_id in request_ids:
        wait_for_line(gateway, request_id)
    after = samples(gateway)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    chat = {"endpoint": "chat", "model": "tiny-llama"}
    assert delta("vgate_request_latency_seconds_count", **chat) == 4
    assert delta("vgate_request_latency_seconds_bucket", **chat, le="+Inf") == 4
    assert delta("vgate_request_latency_seconds_sum", **chat) > 0
    # Only streams have a first token to time.
    assert delta("vgate_ttft_seconds_count", model="tiny-llama") == 2
    assert delta("vgate_ttft_seconds_bucket", model="tiny-llama", le="+Inf") == 2
    assert delta("vgate_ttft_seconds_sum", model="tiny-llama") > 0
    assert delta("vgate_gateway_overhead_seconds_count", endpoint="chat") == 4
    assert (
        sum(delta("vgate_upstream_duration_seconds_count", backend=name) for name in ("w1", "w2"))
        == 4
    )
    # No request id, key secret or key name anywhere in the exposition.
    text = httpx.get(gateway.url + "/metrics").text
    for secret in (*request_ids, DEMO_KEY, "key-demo"):
        assert secret not in text


def test_health_and_ready(gateway: Gateway) -> None:
    assert httpx.get(gateway.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/ready")
    assert ready.status_code == 200
    assert ready.json()["models"]["tiny-llama"] == {"live": ["w1", "w2"], "down": []}


def test_not_ready_while_a_model_has_no_live_backend(
    logs: Path, sims: tuple[Process, Process]
) -> None:
    config = gateway_config(
        [
            {"name": "tiny-llama", "backends": [backend("up", sims[0].url)]},
            {"name": "orphan", "backends": [backend("gone", f"http://127.0.0.1:{free_port()}")]},
        ]
    )
    gateway = start_gateway(logs, config)
    try:
        ready = httpx.get(gateway.url + "/ready")
        assert ready.status_code == 503
        assert ready.json()["models"]["orphan"] == {"live": [], "down": ["gone"]}
        assert httpx.get(gateway.url + "/health").status_code == 200
    finally:
        gateway.stop()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        env=env,
    )


def test_check_config(tmp_path: Path) -> None:
    ok = run_cli("check-config")
    assert ok.returncode == 0 and "ok (2 models" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            gateway_config(
                [{"name": "m", "backends": [backend("b", "http://127.0.0.1:1", weight=-2)]}]
            )
        )
    )
    result = run_cli("check-config", str(bad))
    assert result.returncode == 2
    assert f"{bad}: models[0].backends[0].weight: Input should be greater than or equal to 1" in (
        result.stderr
    )


def test_serve_refuses_a_bad_config_at_start_up(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        yaml.safe_dump(
            gateway_config(
                [
                    {
                        "name": "gpt",
                        "backends": [
                            {
                                "name": "oa",
                                "provider": "openai",
                                "url": "https://api.openai.com",
                                "api_key_env": "VGATE_TEST_UNSET_KEY",
                            }
                        ],
                    }
                ]
            )
        )
    )
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert (
        "models[0].backends[0].api_key_env: environment variable VGATE_TEST_UNSET_KEY is not set"
        in (result.stderr)
    )
    assert "Traceback" not in result.stderr


def test_openai_provider_sends_the_configured_key(logs: Path) -> None:
    # The sim with --api-key stands in for api.openai.com: it refuses calls without the key.
    upstream = start_sim(logs, models=("gpt-4o-mini",), api_key="sk-upstream-secret")

    def models(health: bool) -> list[dict[str, object]]:
        return [
            {
                "name": "gpt-4o-mini",
                "health": {"enabled": health},
                "backends": [
                    {
                        "name": "openai",
                        "provider": "openai",
                        "url": upstream.url,
                        "api_key_env": "TEST_OPENAI_KEY",
                    }
                ],
            }
        ]

    good = start_gateway(
        logs, gateway_config(models(True)), env={"TEST_OPENAI_KEY": "sk-upstream-secret"}
    )
    wrong = start_gateway(logs, gateway_config(models(True)), env={"TEST_OPENAI_KEY": "sk-wrong"})
    unchecked = start_gateway(
        logs, gateway_config(models(False)), env={"TEST_OPENAI_KEY": "sk-wrong"}
    )
    try:
        client = openai.OpenAI(base_url=good.url + "/v1", api_key=DEMO_KEY, max_retries=0)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=2)
        assert reply.usage.completion_tokens == 2
        assert httpx.get(good.url + "/ready").status_code == 200
        # A wrong key for the upstream fails the (authenticated) health check: out of rotation.
        ready = httpx.get(wrong.url + "/ready")
        assert ready.status_code == 503 and ready.json()["models"]["gpt-4o-mini"]["down"] == [
            "openai"
        ]
        # Without health checks the request finds out: the gateway's problem, not the caller's.
        client = openai.OpenAI(base_url=unchecked.url + "/v1", api_key=DEMO_KEY, max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert caught.value.status_code == 502
        assert caught.value.response.json()["error"]["code"] == "upstream_auth_failed"
    finally:
        for process in (good, wrong, unchecked, upstream):
            process.stop()


def test_stream_cut_off_at_the_total_deadline(logs: Path, gateway_for) -> None:
    slow = start_sim(logs, tokens_per_s=20)
    try:
        # 20 tokens a second for 3 s: about 60 of the 200 asked for, then the deadline.
        gateway = gateway_for(
            slow.url, timeouts={"connect_s": 1, "first_token_s": 2, "idle_s": 2, "total_s": 3}
        )
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=DEMO_KEY, max_retries=0)
        received = 0
        with pytest.raises(openai.APIError, match=r"timeouts\.total_s"):
            for _ in client.chat.completions.create(
                model="tiny-llama", messages=MESSAGES, max_tokens=200, stream=True
            ):
                received += 1
        assert 10 <= received < 200
    finally:
        slow.stop()
