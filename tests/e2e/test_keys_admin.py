"""Keys, the admin API and guardrails against a real gateway: every refusal as the client sees
it, keys issued and edited while the gateway runs, and nothing secret in any answer or log."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import yaml

from gateway.edge.auth import hash_key
from tests.servers import (
    REPO,
    Gateway,
    Process,
    backend,
    gateway_config,
    poll_until,
    start_gateway,
)

FULL = "vg-test-full-0123456789abcdefghijkl"
LIMITED = "vg-test-limited-0123456789abcdefgh"
OFF = "vg-test-off-0123456789abcdefghijklm"
ADMIN = "vg-admin-0123456789abcdefghijklmnop"
SECRETS = (FULL, LIMITED, OFF, ADMIN)
MESSAGES = [{"role": "user", "content": "hi"}]
BIG = 10**6  # limits far beyond what these tests send: shown, never reached


def keys_entries() -> list[dict[str, Any]]:
    return [
        {"id": "key-full", "name": "full", "sha256": hash_key(FULL)},
        {
            "id": "key-limited",
            "name": "limited",
            "sha256": hash_key(LIMITED),
            "tier": "batch",
            "models": ["default"],  # an alias: the tiny-llama route
            "limits": {"rpm": BIG, "tpm": BIG, "tokens_per_day": BIG, "max_concurrent": 64},
            "guardrails": {"max_tokens": 8, "max_input_bytes": 64},
        },
        {"id": "key-off", "name": "off", "sha256": hash_key(OFF), "disabled": True},
    ]


def write_keys(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_text("# test keys\n" + yaml.safe_dump({"keys": entries}, sort_keys=False))


def config_for(sims: tuple[Process, Process], keys_file: Path, **extra: Any) -> dict[str, Any]:
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
    config["keys"] = {"file": str(keys_file), "reload_interval_s": 0.1}
    config["admin"] = {"key_sha256_env": "VGATE_TEST_ADMIN_SHA256"}
    config["guardrails"] = {
        "deny_patterns": ["(?i)forbidden\\s+word", "launch-code-[0-9]+"],
        "max_input_bytes": 4096,
    }
    config.update(extra)
    return config


def start(logs: Path, config: dict[str, Any]) -> Gateway:
    return start_gateway(logs, config, env={"VGATE_TEST_ADMIN_SHA256": hash_key(ADMIN)})


@pytest.fixture(scope="module")
def gateway(
    logs: Path, sims: tuple[Process, Process], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    write_keys(keys_file, keys_entries())
    process = start(logs, config_for(sims, keys_file))
    yield process
    process.stop()


@pytest.fixture
def own_gateway(
    logs: Path, sims: tuple[Process, Process], tmp_path: Path
) -> Iterator[tuple[Gateway, Path]]:
    """A gateway of the test's own, with a keys file the test may edit."""
    keys_file = tmp_path / "keys.yaml"
    write_keys(keys_file, keys_entries())
    process = start(logs, config_for(sims, keys_file))
    yield process, keys_file
    process.stop()


def chat(gateway: Gateway, key: str | None, **body: Any) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    payload = {"model": "tiny-llama", "messages": MESSAGES, **body}
    return httpx.post(gateway.url + "/v1/chat/completions", json=payload, headers=headers)


def admin(gateway: Gateway, method: str, path: str, key: str | None = ADMIN) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.request(method, gateway.url + path, headers=headers)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def assert_nothing_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text
        assert hash_key(secret) not in text
    assert "sha256" not in text


def vgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


# -- authentication and authorization ----------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "code", "message"),
    [
        (None, "missing_api_key", "Missing API key"),
        ("Basic dXNlcjpwYXNz", "invalid_api_key", "Malformed Authorization header"),
        ("Bearer", "invalid_api_key", "Malformed Authorization header"),
        ("Bearer vg-nobody-0123456789abcdefghijklm", "invalid_api_key", "Incorrect API key"),
        (f"Bearer {OFF}", "invalid_api_key", "disabled"),
    ],
)
def test_every_authentication_failure_is_401(
    gateway: Gateway, authorization: str | None, code: str, message: str
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "tiny-llama", "messages": MESSAGES},
        headers=headers,
    )
    assert response.status_code == 401
    error = error_of(response)
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]


def test_the_sdk_raises_authentication_error_for_a_disabled_key(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=OFF, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="tiny-llama", messages=MESSAGES)  # type: ignore[arg-type]


def test_a_model_the_key_may_not_use_is_404_like_an_unknown_one(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=LIMITED, max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="tiny-embed", input="hi")
    assert caught.value.status_code == 404
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "model_not_found"
    assert body["param"] == "model"
    assert "'tiny-embed'" in body["message"]
    # Only the key's own models are named: nothing of the others, not even that they exist.
    assert body["message"].endswith("Models this key may use: tiny-llama.")
    # The key's models are named by an alias; the route's own name is allowed too.
    for model in ("default", "tiny-llama"):
        reply = client.chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
        assert reply.choices[0].message.content
    # And a key without a list may use every model.
    full = openai.OpenAI(base_url=gateway.url + "/v1", api_key=FULL, max_retries=0)
    assert full.embeddings.create(model="tiny-embed", input="hi").data


def test_a_limited_key_lists_only_its_models(gateway: Gateway) -> None:
    limited = openai.OpenAI(base_url=gateway.url + "/v1", api_key=LIMITED, max_retries=0)
    assert sorted(m.id for m in limited.models.list()) == ["default", "tiny-llama"]
    full = openai.OpenAI(base_url=gateway.url + "/v1", api_key=FULL, max_retries=0)
    assert sorted(m.id for m in full.models.list()) == ["default", "tiny-embed", "tiny-llama"]


# -- guardrails -------------------------------------------------------------------------------


def test_max_tokens_over_the_keys_cap_is_400(gateway: Gateway) -> None:
    for param in ("max_tokens", "max_completion_tokens"):
        response = chat(gateway, LIMITED, **{param: 9})
        assert response.status_code == 400
        error = error_of(response)
        assert (error["code"], error["param"]) == ("max_tokens_exceeded", param)
        assert "at most 8" in error["message"]
    assert chat(gateway, LIMITED, max_tokens=8).status_code == 200
    # Naming no limit is no way around it: the cap is sent upstream.
    response = chat(gateway, LIMITED)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] <= 8
    # Other keys have no cap of their own.
    assert chat(gateway, FULL, max_tokens=12).status_code == 200


def test_input_over_the_size_cap_is_400(gateway: Gateway) -> None:
    # The key's own cap (64 bytes of text), counted in UTF-8: 22 three-byte characters.
    response = chat(gateway, LIMITED, messages=[{"role": "user", "content": "語" * 22}])
    assert response.status_code == 400
    error = error_of(response)
    assert (error["code"], error["param"]) == ("input_too_large", "messages")
    assert "66 bytes" in error["message"] and "at most 64" in error["message"]
    assert chat(gateway, LIMITED, messages=[{"role": "user", "content": "語" * 21}]).is_success
    # The global default (4096) for keys without their own, text parts counted too.
    parts = [{"type": "text", "text": "x" * 2048}, {"type": "text", "text": "y" * 2049}]
    response = chat(gateway, FULL, messages=[{"role": "user", "content": parts}])
    assert response.status_code == 400
    assert error_of(response)["code"] == "input_too_large"
    completions = httpx.post(
        gateway.url + "/v1/completions",
        json={"model": "tiny-llama", "prompt": "z" * 4097},
        headers={"Authorization": f"Bearer {FULL}"},
    )
    assert completions.status_code == 400
    assert error_of(completions)["param"] == "prompt"


def test_a_deny_pattern_is_400_and_nothing_of_the_prompt_is_logged(gateway: Gateway) -> None:
    before = len(gateway.access_log())
    marker = "zebra-quartz-7731"  # appears nowhere but in these prompts
    refused = [
        chat(gateway, FULL, messages=[{"role": "user", "content": f"{marker} FORBIDDEN  word"}]),
        chat(
            gateway,
            FULL,
            stream=True,
            messages=[
                {"role": "system", "content": f"be nice {marker}"},
                {"role": "user", "content": [{"type": "text", "text": "launch-code-12345"}]},
            ],
        ),
        chat(gateway, LIMITED, max_tokens=100, messages=[{"role": "user", "content": marker}]),
        chat(gateway, FULL, messages=[{"role": "user", "content": marker * 300}]),
    ]
    assert [r.status_code for r in refused] == [400, 400, 400, 400]
    codes = [error_of(r)["code"] for r in refused]
    assert codes == [
        "content_policy_violation",
        "content_policy_violation",
        "max_tokens_exceeded",
        "input_too_large",
    ]
    first, second = (error_of(r) for r in refused[:2])
    assert "deny pattern 0" in first["message"] and "deny pattern 1" in second["message"]
    for response in refused:
        assert marker not in response.text and "launch-code" not in response.text.lower()
    # Only the prompt is searched: the pattern in another field is no violation.
    assert chat(gateway, FULL, user="forbidden word").status_code == 200
    entries = gateway.wait_for_log(before + 5)[before:]
    assert [e["error"] for e in entries[:4]] == codes
    for text in (gateway.access_log_path.read_text(), gateway.log()):  # type: ignore[union-attr]
        assert marker not in text
        assert "launch-code-12345" not in text
        assert "FORBIDDEN" not in text


# -- the admin API ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "vg-wrong-0123456789abcdefghijklmno", FULL])
def test_admin_without_the_admin_key_is_401(gateway: Gateway, key: str | None) -> None:
    for method, path in (
        ("GET", "/admin/keys"),
        ("GET", "/admin/keys/key-full"),
        ("POST", "/admin/keys/reload"),
    ):
        response = admin(gateway, method, path, key)
        assert response.status_code == 401, path
        error = error_of(response)
        assert error["code"] == ("missing_api_key" if key is None else "invalid_api_key")


def test_admin_lists_keys_without_secrets(gateway: Gateway) -> None:
    response = admin(gateway, "GET", "/admin/keys")
    assert response.status_code == 200
    assert_nothing_secret(response.text)
    keys = {key["id"]: key for key in response.json()["data"]}
    assert set(keys) == {"key-full", "key-limited", "key-off"}
    limited = keys["key-limited"]
    assert limited["name"] == "limited"
    assert limited["tier"] == "batch"
    assert limited["models"] == ["default"]
    assert limited["limits"] == {
        "rpm": BIG,
        "tpm": BIG,
        "tokens_per_day": BIG,
        "max_concurrent": 64,
    }
    assert limited["guardrails"] == {"max_tokens": 8, "max_input_bytes": 64, "max_n": None}
    assert limited["disabled"] is False
    assert keys["key-off"]["disabled"] is True
    assert keys["key-full"]["models"] is None


def test_admin_shows_one_key_with_its_usage(gateway: Gateway) -> None:
    before = admin(gateway, "GET", "/admin/keys/key-limited").json()["process_usage"]
    tokens = 0
    for _ in range(3):
        response = chat(gateway, LIMITED, max_tokens=4)
        assert response.status_code == 200
        usage = response.json()["usage"]
        tokens += usage["prompt_tokens"] + usage["completion_tokens"]

    def counted() -> dict[str, Any] | None:
        usage = admin(gateway, "GET", "/admin/keys/key-limited").json()["process_usage"]
        return usage if usage["requests_today"] >= before["requests_today"] + 3 else None

    usage = poll_until(counted)
    assert usage["requests_today"] == before["requests_today"] + 3
    assert usage["tokens_today"] == before["tokens_today"] + tokens
    assert usage["remaining"]["tokens_per_day"] == BIG - usage["tokens_today"]
    detail = admin(gateway, "GET", "/admin/keys/key-limited")
    assert_nothing_secret(detail.text)
    assert detail.json()["id"] == "key-limited"
    missing = admin(gateway, "GET", "/admin/keys/key-nobody")
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "key_not_found"
    assert admin(gateway, "GET", "/admin/keys/key-full").json()["limits_usage"] is None


def test_admin_shows_the_limit_stores_usage(own_gateway: tuple[Gateway, Path]) -> None:
    """`limits_usage` is the limit engine's own state: requests left this minute drop by
    the requests made, the day's tokens are the reconciled usage, no slot stays held."""
    gateway, keys_file = own_gateway
    counted = "vg-test-counted-0123456789abcdefgh"
    limits = {"rpm": 10, "tpm": BIG, "tokens_per_day": BIG, "max_concurrent": 4}
    entry = {"id": "key-counted", "name": "counted", "sha256": hash_key(counted)}
    write_keys(keys_file, [*keys_entries(), {**entry, "limits": limits}])
    assert admin(gateway, "POST", "/admin/keys/reload").status_code == 200
    started = time.monotonic()
    detail = admin(gateway, "GET", "/admin/keys/key-counted")
    assert detail.json()["limits_usage"] == {
        "source": "local",
        "requests_remaining": 10,
        "tokens_remaining": BIG,
        "tokens_today": 0,
        "tokens_per_day_remaining": BIG,
        "in_flight": 0,
    }
    tokens = 0
    for _ in range(3):  # rpm 10 gives back one request per 6 s: allowed for below
        response = chat(gateway, counted, max_tokens=4)
        assert response.status_code == 200
        tokens += response.json()["usage"]["total_tokens"]

    def settled() -> dict[str, Any] | None:
        body = admin(gateway, "GET", "/admin/keys/key-counted").json()
        return body if body["limits_usage"]["tokens_today"] == tokens else None

    body = poll_until(settled)
    given_back = int((time.monotonic() - started) // 6)  # 0 unless the machine is slow
    assert_nothing_secret(str(body))
    usage = body["limits_usage"]
    assert 7 <= usage["requests_remaining"] <= 7 + given_back
    assert usage["tokens_per_day_remaining"] == BIG - tokens
    assert usage["in_flight"] == 0
    assert body["process_usage"]["requests_today"] == 3


def test_without_an_admin_key_there_is_no_admin_api(
    logs: Path, sims: tuple[Process, Process], tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.yaml"
    write_keys(keys_file, keys_entries())
    config = config_for(sims, keys_file)
    del config["admin"]
    process = start_gateway(logs, config)
    try:
        for key in (ADMIN, None):
            response = admin(process, "GET", "/admin/keys", key)
            assert response.status_code == 404
            assert error_of(response)["code"] == "not_found"
    finally:
        process.stop()


# -- keys issued and edited while the gateway runs ---------------------------------------------


def test_a_created_key_works_without_a_restart(own_gateway: tuple[Gateway, Path]) -> None:
    gateway, keys_file = own_gateway
    created = vgate(
        "keys", "create", "--name", "newcomer", "--models", "tiny-embed", "--rpm", str(BIG),
        "--file", str(keys_file),
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("vg-") and len(secret) == 35
    assert secret not in created.stderr
    text = keys_file.read_text()
    assert text.startswith("# test keys\n")  # the file's comments are kept
    assert secret not in text and hash_key(secret) in text
    assert [e["id"] for e in yaml.safe_load(text)["keys"]][:3] == [
        "key-full",
        "key-limited",
        "key-off",
    ]
    # Picked up by the file watch: the key works, for its models only.
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=0)

    def works() -> bool:
        try:
            return bool(client.embeddings.create(model="tiny-embed", input="hi").data)
        except openai.AuthenticationError:
            return False

    poll_until(works)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="tiny-llama", messages=MESSAGES)  # type: ignore[arg-type]
    assert chat(gateway, FULL).status_code == 200  # the others still work
    poll_until(lambda: "keys file" in gateway.log() and "reloaded: 4 keys" in gateway.log())
    assert secret not in gateway.log()


def test_keys_list_shows_no_secret_or_hash(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    write_keys(keys_file, keys_entries())
    created = vgate("keys", "create", "--name", "listed", "--file", str(keys_file))
    secret = created.stdout.strip()
    table = vgate("keys", "list", "--file", str(keys_file))
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == [
        "ID", "NAME", "TIER", "MODELS", "LIMITS", "GUARDRAILS", "DISABLED",
    ]  # fmt: skip
    for wanted in ("key-full", "key-limited", "key-off", "listed", "rpm=1000000", "max_tokens=8"):
        assert wanted in table.stdout
    as_json = vgate("keys", "list", "--json", "--file", str(keys_file))
    keys = orjson.loads(as_json.stdout)["keys"]
    assert [k["name"] for k in keys] == ["full", "limited", "off", "listed"]
    for output in (table.stdout, table.stderr, as_json.stdout):
        assert_nothing_secret(output)
        assert secret not in output and hash_key(secret) not in output


def test_an_invalid_keys_file_keeps_the_old_keys(own_gateway: tuple[Gateway, Path]) -> None:
    gateway, keys_file = own_gateway
    good = keys_file.read_text()
    newcomer = "vg-test-newcomer-0123456789abcdefg"
    entries = [*keys_entries(), {"id": "key-new", "name": "new", "sha256": hash_key(newcomer)}]
    entries[0] = {**entries[0], "sha256": "not-a-hash"}  # one bad entry spoils the file
    write_keys(keys_file, entries)
    # Both in the log once the watch has read the whole new file (it may first catch the
    # file half-written, invalid in another way).
    poll_until(
        lambda: (
            "invalid; the 3 keys loaded before stay in force" in (log := gateway.log())
            and "keys[0].sha256" in log
        )
    )
    assert chat(gateway, FULL).status_code == 200  # old keys in force...
    assert chat(gateway, newcomer).status_code == 401  # ...and none of the new file's
    # Reloading by hand says why, and changes nothing either.
    response = admin(gateway, "POST", "/admin/keys/reload")
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "invalid_keys_file"
    assert "keys[0].sha256" in error["message"] and "3 keys stay in force" in error["message"]
    assert chat(gateway, FULL).status_code == 200
    # Fixed: the watch takes it.
    entries[0] = keys_entries()[0]
    write_keys(keys_file, entries)
    poll_until(lambda: chat(gateway, newcomer).status_code == 200)
    # Reverted and reloaded by hand: the newcomer is gone at once.
    keys_file.write_text(good)
    response = admin(gateway, "POST", "/admin/keys/reload")
    assert response.status_code == 200
    assert response.json() == {
        "object": "keys.reload",
        "source": str(keys_file),
        "keys": 3,
        "enabled": 2,
        "disabled": 1,
    }
    assert chat(gateway, newcomer).status_code == 401
