"""Configuration that reads like it works (issue 11), through a real `vgate serve` and
`vgate check-config`: warnings at start-up for a deprecated field and for timeouts that leave
a fallback too little time, and an `openai` backend that names no key."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fake_upstream import ScriptedUpstream, chat_answer, read_request
from tests.servers import DEMO_KEY, REPO, Gateway, gateway_config, start_gateway

KEY_VARIABLE = "UPSTREAM_KEY_FOR_TEST"
UPSTREAM_KEY = "sk-upstream-0123456789"


async def openai_compatible(
    upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answers as any OpenAI-compatible server does, noting each request's headers."""
    while True:
        path, headers, body = await read_request(reader)
        model = orjson.loads(body).get("model") if body else None
        upstream.state.setdefault("requests", []).append((path, model, headers))
        if path == "/v1/models":
            models = orjson.dumps({"object": "list", "data": []})
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(models)}\r\n\r\n".encode()
                + models
            )
        else:
            writer.write(chat_answer(body, "hello"))
        await writer.drain()


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    server = ScriptedUpstream(openai_compatible)
    yield server
    server.stop()


def config(url: str) -> dict[str, Any]:
    return gateway_config(
        [
            {
                "name": "keyless",
                "fallbacks": ["keyed"],
                "retries": {"attempts": 1},  # the deprecated name: max_retries 0
                # The route: 15 s kept of 30, for a fallback that may take 30 to start.
                "timeouts": {"first_token_s": 10, "total_s": 30},
                "backends": [{"name": "local", "provider": "openai", "url": url}],
            },
            {
                "name": "keyed",
                "backends": [
                    {
                        "name": "hosted",
                        "provider": "openai",
                        "url": url,
                        "api_key_env": KEY_VARIABLE,
                    }
                ],
            },
        ]
    )


@pytest.fixture(scope="module")
def gateway(logs: Path, upstream: ScriptedUpstream) -> Iterator[Gateway]:
    process = start_gateway(logs, config(upstream.url), env={KEY_VARIABLE: UPSTREAM_KEY})
    yield process
    process.stop()


def config_file(gateway: Gateway) -> Path:
    port = gateway.url.rsplit(":", 1)[1]
    assert gateway.access_log_path is not None
    return gateway.access_log_path.parent / f"gateway-{port}.yaml"  # start_gateway's


def ask(gateway: Gateway, model: str) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {DEMO_KEY}"},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )


def upstream_headers(upstream: ScriptedUpstream, model: str) -> dict[str, str]:
    (headers,) = [h for _, m, h in upstream.state.get("requests", []) if m == model]
    return headers


EXPECTED = [
    "models[0].retries.attempts: deprecated, use max_retries: 0 (retries after the first attempt)",
    "models[0].timeouts (route 'keyless'): the route keeps 15 s of total_s (30 s; by default"
    " at most half) for its fallback 'keyed', less than the fallback's first_token_s (30 s)",
]


def test_serve_logs_each_warning_at_start_up(gateway: Gateway) -> None:
    source = str(config_file(gateway))
    warnings = [line for line in gateway.log().splitlines() if " WARNING vgate.config: " in line]
    assert len(warnings) == 2, gateway.log()
    for line, expected in zip(warnings, EXPECTED, strict=True):
        assert f"WARNING vgate.config: {source}: {expected}" in line


def test_check_config_prints_the_warnings_and_passes(gateway: Gateway) -> None:
    source = config_file(gateway)
    checked = subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "check-config", str(source)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, KEY_VARIABLE: UPSTREAM_KEY},
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == f"{source}: ok (2 models: keyless, keyed)\n"
    printed = checked.stderr.splitlines()
    assert len(printed) == 2
    for line, expected in zip(printed, EXPECTED, strict=True):
        assert line.startswith(f"vgate: warning: {source}: {expected}")


def test_a_named_key_that_is_not_set_still_fails_the_check(gateway: Gateway) -> None:
    environment = {k: v for k, v in os.environ.items() if k != KEY_VARIABLE}
    checked = subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "check-config", str(config_file(gateway))],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environment,
        timeout=60,
    )
    assert checked.returncode == 2
    assert f"models[1].backends[0].api_key_env: environment variable {KEY_VARIABLE} is not set" in (
        checked.stderr
    )


def test_an_openai_backend_without_a_key_sends_no_authorization(
    gateway: Gateway, upstream: ScriptedUpstream
) -> None:
    response = ask(gateway, "keyless")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "hello"
    assert "authorization" not in upstream_headers(upstream, "keyless")
    # The health probes too: the keyless backend's without, the other's with its key.
    probes = {h.get("authorization") for p, _, h in upstream.state["requests"] if p == "/v1/models"}
    assert probes == {None, f"Bearer {UPSTREAM_KEY}"}


def test_an_openai_backend_with_a_key_sends_it(
    gateway: Gateway, upstream: ScriptedUpstream
) -> None:
    response = ask(gateway, "keyed")
    assert response.status_code == 200, response.text
    assert upstream_headers(upstream, "keyed")["authorization"] == f"Bearer {UPSTREAM_KEY}"
