"""GET /openapi.json, and schemathesis against a live gateway with it (issue 9).

The fuzz run is bounded in examples (and by a wall-clock timeout far beyond what it needs) so
that it fits `make test` on a loaded CI machine; its seed is fixed so that a failure found
once is found again. Every check runs but `positive_data_acceptance`: a body the gateway's
schema accepts is forwarded, and the upstream (here `vgate sim`, as vLLM) may still refuse
it with its own 400, which the gateway passes through as it should. That the gateway never
forwards a body its schema calls invalid is `negative_data_rejection`, which does run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import DEMO_KEY, Gateway, Process, backend, gateway_config, start_gateway

MODELS = ["tiny-llama", "default", "tiny-embed"]
EXAMPLES = int(os.environ.get("VGATE_SCHEMATHESIS_EXAMPLES", "30"))  # per operation
SEED = os.environ.get("VGATE_SCHEMATHESIS_SEED", "1")
RUN_TIMEOUT_S = 240  # a generous bound for a run that takes ~10 s on an idle machine


@pytest.fixture(scope="module")
def gateway(logs: Path, sims: tuple[Process, Process]) -> Iterator[Gateway]:
    first, second = sims
    config = gateway_config(
        [
            {
                "name": "tiny-llama",
                "aliases": ["default"],
                "backends": [backend("w1", first.url), backend("w2", second.url)],
            },
            {"name": "tiny-embed", "backends": [backend("e1", first.url)]},
        ]
    )
    # The guardrails' paths are fuzzed too; their refusals are documented 400s.
    config["guardrails"] = {"deny_patterns": ["(?i)forbidden\\s+word"], "max_input_bytes": 65536}
    process = start_gateway(logs, config)
    yield process
    process.stop()


def document(gateway: Gateway) -> dict[str, Any]:
    response = httpx.get(gateway.url + "/openapi.json", timeout=10)  # no key: like /health
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    result: dict[str, Any] = response.json()
    return result


def test_the_description_is_served_without_a_key_and_names_every_endpoint(
    gateway: Gateway,
) -> None:
    spec = document(gateway)
    assert spec["openapi"] == "3.1.0"
    assert set(spec["paths"]) == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/models/{model}",
        "/health",
        "/ready",
        "/metrics",
        "/openapi.json",
    }
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        operation = spec["paths"][path]["post"]
        assert operation["security"] == [{"bearer": []}]
        assert {"200", "400", "401", "404", "429", "502", "503", "504"} <= set(
            operation["responses"]
        )
    assert spec["paths"]["/health"]["get"]["security"] == []
    schemas = spec["components"]["schemas"]
    # Built from this gateway's config: its models, its n cap (the default, 16).
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["model"]["enum"] == MODELS
    assert chat["n"]["anyOf"][0]["maximum"] == 16
    assert set(schemas["Error"]["properties"]["error"]["required"]) == {"message", "type"}
    assert document(gateway) == spec


def test_schemathesis_finds_nothing_against_a_live_gateway(gateway: Gateway, logs: Path) -> None:
    report = logs / "schemathesis-junit.xml"
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        gateway.url + "/openapi.json",
        "--header",
        f"Authorization: Bearer {DEMO_KEY}",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        SEED,
        "--workers",
        "1",
        "--request-timeout",
        "20",
        "--report",
        "junit",
        "--report-junit-path",
        str(report),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"},
        cwd=logs,  # its caches (.schemathesis/, .hypothesis/) land there, not in the repo
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-12000:]
    assert "No issues found" in output, output[-12000:]
    assert "Traceback" not in gateway.log()
