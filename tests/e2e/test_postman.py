"""deploy/postman's collection, run by real newman against `make run`'s stack: two simulated
workers and `vgate serve` on the embedded config (config/gateway.yaml), moved to free ports by
the same environment overrides `make run` uses.

The stack has the environment's keys: config/demo-keys.yaml's, plus those of the environment it
does not hold yet (the demo keys the collection needs, built here from their secrets), and
the admin key. newman runs every request; the test checks how many requests and assertions
ran, with none failed (newman passes a collection that runs nothing, or half of it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.servers import REPO, Process, free_port, spawn, start_sim

POSTMAN = REPO / "deploy" / "postman"
COLLECTION = POSTMAN / "vgate.postman_collection.json"
ENVIRONMENT = POSTMAN / "vgate.postman_environment.json"
NEWMAN_VERSION = "6.2.2"
NEWMAN_HOME = REPO / ".run" / f"newman-{NEWMAN_VERSION}"  # .run/ is git-ignored
NPM_QUIET = ("--no-audit", "--no-fund", "--loglevel=error")
# What one run must do; change them with the collection. The assertions: the requests' own
# `pm.test`s (93), and the collection's "no 5xx" once per request.
EXPECTED_REQUESTS = 29
EXPECTED_ASSERTIONS = 93 + 29

# The environment's keys, by variable: what each demo key may do.
DEMO_KEYS: dict[str, dict[str, Any]] = {
    "apiKey": {"id": "key-demo", "name": "demo"},
    "restrictedKey": {
        "id": "key-demo-embed-only",
        "name": "demo-embed-only",
        "models": ["tiny-embed"],
    },
    "limitedKey": {"id": "key-demo-limited", "name": "demo-limited", "limits": {"rpm": 1}},
}


def environment() -> dict[str, str]:
    values = json.loads(ENVIRONMENT.read_text())["values"]
    return {value["key"]: value["value"] for value in values}


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def keys_file(folder: Path) -> Path:
    """`make run`'s keys (config/demo-keys.yaml), plus the environment's keys it does not hold
    (by id). A key it holds must be the environment's secret's."""
    keys = yaml.safe_load((REPO / "config" / "demo-keys.yaml").read_text())
    held = {key["id"]: key for key in keys["keys"]}
    secrets = environment()
    for variable, entry in DEMO_KEYS.items():
        digest = sha256(secrets[variable])
        if entry["id"] in held:
            assert held[entry["id"]]["sha256"] == digest, f"{entry['id']}: not {variable}'s key"
        else:
            keys["keys"].append({**entry, "sha256": digest})
    path = folder / "keys.yaml"
    path.write_text(yaml.safe_dump(keys, sort_keys=False))
    return path


def newman_binary() -> Path:
    """newman from the npm registry, installed once into .run/ (npm must be there)."""
    binary = NEWMAN_HOME / "node_modules" / ".bin" / "newman"
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("newman needs npm (apt-get install npm)")
    NEWMAN_HOME.mkdir(parents=True, exist_ok=True)
    installed = subprocess.run(
        [npm, "install", "--prefix", str(NEWMAN_HOME), f"newman@{NEWMAN_VERSION}", *NPM_QUIET],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if installed.returncode != 0 or not binary.exists():
        pytest.skip(f"npm could not install newman@{NEWMAN_VERSION}: {installed.stderr[-800:]}")
    return binary


def requests_of(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in items:
        if "item" in item:
            yield from requests_of(item["item"])
        else:
            yield item


def declared_tests(item: dict[str, Any]) -> int:
    """How many `pm.test` assertions a request or the collection declares (one run each)."""
    scripts = [e["script"]["exec"] for e in item.get("event", []) if e["listen"] == "test"]
    return sum("\n".join(lines).count("pm.test(") for lines in scripts)


@pytest.fixture(scope="module")
def stack(logs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`make run`'s: two sims (tiny-llama, tiny-embed) and the gateway on the embedded
    config, with the environment's keys and admin key; the gateway's URL."""
    folder = tmp_path_factory.mktemp("postman")
    workers = [start_sim(logs), start_sim(logs)]
    started: list[Process] = list(workers)
    try:
        first, second = (worker.url for worker in workers)
        port = free_port()
        env = {
            "VGATE_SERVER__PORT": str(port),
            "VGATE_SERVER__DRAIN_DELAY_S": "0",
            "VGATE_MODELS__0__BACKENDS__0__URL": first,
            "VGATE_MODELS__0__BACKENDS__1__URL": second,
            "VGATE_MODELS__1__BACKENDS__0__URL": first,
            "VGATE_MODELS__1__BACKENDS__1__URL": second,
            "VGATE_KEYS__FILE": str(keys_file(folder)),
            "VGATE_ADMIN__KEY_SHA256": sha256(environment()["adminKey"]),
        }
        gateway = spawn(f"gateway-{port}", ["serve"], port=port, log_dir=logs, env=env)
        started.append(gateway)
        yield gateway.url
    finally:
        for process in reversed(started):
            process.stop()


def run_newman(newman: Path, url: str, report: Path) -> tuple[dict[str, Any], str]:
    """One run of the collection: newman's stats, and its failures in words."""
    run = subprocess.run(
        [
            *(str(newman), "run", str(COLLECTION), "--environment", str(ENVIRONMENT)),
            *("--env-var", f"baseUrl={url}", "--timeout-request", "30000"),
            *("--reporters", "cli,json", "--reporter-json-export", str(report)),
            *("--color", "off", "--disable-unicode"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "NO_UPDATE_NOTIFIER": "1"},
    )
    assert report.exists(), run.stdout + run.stderr
    result = json.loads(report.read_text())["run"]
    failures = "\n".join(
        f"{f['source'].get('name')}: {f['error'].get('test') or ''} {f['error']['message']}"
        for f in result["failures"]
    )
    assert run.returncode == 0, f"{failures}\n{run.stdout[-4000:]}"
    return result["stats"], failures


def test_collection_runs_clean_under_newman(stack: str, tmp_path: Path) -> None:
    newman = newman_binary()
    collection = json.loads(COLLECTION.read_text())
    requests = list(requests_of(collection["item"]))
    declared = sum(declared_tests(r) for r in requests) + declared_tests(collection) * len(requests)
    assert (len(requests), declared) == (EXPECTED_REQUESTS, EXPECTED_ASSERTIONS)
    # Twice, as against `make run` again and again: the rate-limited key is spent by then.
    for run in (1, 2):
        stats, failures = run_newman(newman, stack, tmp_path / f"newman-{run}.json")
        assert stats["requests"] == {"total": EXPECTED_REQUESTS, "pending": 0, "failed": 0}
        assert stats["assertions"]["failed"] == 0, failures
        assert stats["assertions"]["total"] == EXPECTED_ASSERTIONS
