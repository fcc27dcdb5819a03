"""The edge against a hostile or careless client, on a real `vgate serve`: what a failed
request is charged, no redirect built from the client's Host, what a key limited to some
models can learn, how much of a client's input is echoed, and JWT bearer tokens."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import openai
import orjson
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from gateway.edge.auth import hash_key
from tests.e2e.conftest import new_request_id, wait_for_line
from tests.servers import (
    Gateway,
    Process,
    backend,
    gateway_config,
    poll_until,
    start_gateway,
    start_sim,
)

SHORT_CONTEXT = 128  # the sim's max_model_len: a few hundred words are a prompt too long
TOO_LONG = [{"role": "user", "content": "word " * 400}]
MESSAGES = [{"role": "user", "content": "hello"}]
ADMIN = "vg-admin-0123456789abcdefghijklmnop"
KEYS = {
    "rpm": ("vg-edge-rpm-0123456789abcdefghijklm", {"limits": {"rpm": 3}}),
    "conc": ("vg-edge-conc-0123456789abcdefghijkl", {"limits": {"max_concurrent": 1}}),
    "down": ("vg-edge-down-0123456789abcdefghijkl", {"limits": {"rpm": 2}}),
    "narrow": ("vg-edge-narrow-0123456789abcdefghij", {"models": ["default"]}),
    "full": ("vg-edge-full-0123456789abcdefghijkl", {}),
    "jwt-rpm": ("vg-edge-jwt-rpm-0123456789abcdefgh", {"limits": {"rpm": 2}}),
    "rails": (
        "vg-edge-rails-0123456789abcdefghijk",
        {"limits": {"rpm": 3}, "guardrails": {"max_input_bytes": 64}},
    ),
}
ISSUER = "https://idp.test"
AUDIENCE = "vgate-edge"
HS_SECRET = "hs-secret-for-the-edge-tests-0123456789abcdefghijklmnopqrstuvwxyz"


def write_keys(path: Path) -> Path:
    entries = [
        {"id": f"key-{name}", "name": name, "sha256": hash_key(secret), **extra}
        for name, (secret, extra) in KEYS.items()
    ]
    path.write_text(yaml.safe_dump({"keys": entries}, sort_keys=False))
    return path


def models(sim: Process) -> list[dict[str, Any]]:
    return [
        {"name": "tiny-llama", "aliases": ["default"], "backends": [backend("w1", sim.url)]},
        {"name": "tiny-embed", "backends": [backend("e1", sim.url)]},
        {
            "name": "down",
            "retries": {"max_retries": 0},
            "health": {"enabled": False},
            "backends": [backend("d1", "http://127.0.0.1:9", model="tiny-llama")],
        },
    ]


@pytest.fixture(scope="module")
def sim(logs: Path) -> Iterator[Process]:
    process = start_sim(logs, max_model_len=SHORT_CONTEXT)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def keys_file(logs: Path) -> Path:
    return write_keys(logs / "edge-keys.yaml")


@pytest.fixture(scope="module")
def gateway(logs: Path, sim: Process, keys_file: Path) -> Iterator[Gateway]:
    """API keys and HS256 JWTs whose secret is in the environment."""
    config = gateway_config(models(sim))
    config["keys"] = {"file": str(keys_file), "reload_interval_s": 0}
    config["admin"] = {"key_sha256": hash_key(ADMIN)}
    config["jwt"] = {
        "enabled": True,
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "secret_env": "VGATE_EDGE_JWT_SECRET",
        "profile_claim": "vgate_key",
    }
    process = start_gateway(logs, config, env={"VGATE_EDGE_JWT_SECRET": HS_SECRET})
    yield process
    process.stop()


def chat(gateway: Gateway, key: str, **body: Any) -> httpx.Response:
    payload = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 4, **body}
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {KEYS[key][0]}"},
        json=payload,
        timeout=30,
    )


def requests_seen(sim: Process) -> int:
    return int(httpx.get(sim.url + "/sim/stats").json()["requests"])


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


# -- 1. what a failed request is charged -------------------------------------------------------


def test_a_prompt_the_upstream_refuses_is_charged_so_rpm_holds(
    gateway: Gateway, sim: Process
) -> None:
    """rpm 3: three too-long prompts reach the upstream (400 each), then the key is refused
    at the edge (429) without upstream work. Before, every 400 was refunded: all forwarded."""
    before = requests_seen(sim)
    statuses = [chat(gateway, "rpm", messages=TOO_LONG).status_code for _ in range(8)]
    assert statuses[:3] == [400, 400, 400], statuses
    assert 429 in statuses[3:], statuses
    forwarded = requests_seen(sim) - before
    assert forwarded == statuses.count(400), (forwarded, statuses)
    # The client's error was the upstream's answer, passed through.
    refused = chat(gateway, "rpm", messages=TOO_LONG)
    assert refused.status_code == 429
    assert error_of(refused)["code"] == "rate_limit_exceeded"


def test_a_guardrails_refusal_is_charged_too(gateway: Gateway, sim: Process) -> None:
    """rpm 3 and at most 64 bytes of prompt: three refusals (400), then 429. Before, a
    refusal was never charged: a key could send refused prompts without limit."""
    before = requests_seen(sim)
    statuses = []
    for _ in range(6):
        response = chat(gateway, "rails", messages=TOO_LONG)
        statuses.append(response.status_code)
        if response.status_code == 400:
            assert error_of(response)["code"] == "input_too_large"
    assert statuses[:3] == [400, 400, 400], statuses
    assert 429 in statuses[3:], statuses
    assert requests_seen(sim) == before  # none of it reached the upstream


def test_the_concurrency_slot_comes_back_after_every_client_error(gateway: Gateway) -> None:
    # max_concurrent 1: a slot kept by a failed request would make the next one a 429.
    for _ in range(5):
        response = chat(gateway, "conc", messages=TOO_LONG)
        assert response.status_code == 400, response.text
        assert chat(gateway, "conc", model="no-such-model").status_code == 404
    assert chat(gateway, "conc").status_code == 200


def test_gateway_and_upstream_faults_are_still_given_back(gateway: Gateway) -> None:
    # rpm 2: the backend refuses connections (502/503): none of them is charged.
    for _ in range(5):
        response = chat(gateway, "down", model="down")
        assert response.status_code in (502, 503), response.text
    assert chat(gateway, "down").status_code == 200


# -- 2. no redirect built from client input ----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions/"),
        ("POST", "/v1/embeddings/"),
        ("GET", "/admin/keys/"),
        ("POST", "/admin/keys/reload/"),
        ("GET", "/health/"),
        ("GET", "/metrics/"),
    ],
)
def test_a_slash_too_many_is_404_never_a_redirect(gateway: Gateway, method: str, path: str) -> None:
    response = httpx.request(
        method,
        gateway.url + path,
        headers={"host": "evil.example", "authorization": f"Bearer {ADMIN}"},
        json={"model": "tiny-llama", "messages": MESSAGES},
        follow_redirects=False,
    )
    assert response.status_code == 404, (response.status_code, response.headers)
    assert "location" not in response.headers
    assert "evil.example" not in response.text
    assert error_of(response)["type"] == "invalid_request_error"


# -- 3. a key limited to some models sees only those -------------------------------------------


def test_forbidden_and_unknown_models_look_alike_to_a_limited_key(gateway: Gateway) -> None:
    narrow = openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=KEYS["narrow"][0], max_retries=0, timeout=30
    )
    answers = {}
    for model in ("tiny-embed", "no-such-model"):
        with pytest.raises(openai.NotFoundError) as caught:
            narrow.chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
        answers[model] = caught.value.response
        with pytest.raises(openai.NotFoundError):
            narrow.embeddings.create(model=model, input="hi")
        with pytest.raises(openai.NotFoundError) as retrieved:
            narrow.models.retrieve(model)
        assert retrieved.value.response.json() == answers[model].json()
    forbidden, unknown = (error_of(answers[m]) for m in ("tiny-embed", "no-such-model"))
    assert forbidden["code"] == unknown["code"] == "model_not_found"
    assert forbidden["message"].replace("tiny-embed", "X") == unknown["message"].replace(
        "no-such-model", "X"
    )
    assert {forbidden["param"], forbidden["type"]} == {"model", "invalid_request_error"}
    # Only the key's own models are named; the others, not even the one it asked for... exists.
    assert "tiny-llama" in unknown["message"]
    assert "down" not in unknown["message"] and "tiny-embed" not in unknown["message"]
    assert sorted(m.id for m in narrow.models.list()) == ["default", "tiny-llama"]
    assert narrow.models.retrieve("default").id == "default"
    # A key without a list still sees every model, and the full list in a 404.
    full = openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=KEYS["full"][0], max_retries=0, timeout=30
    )
    assert "tiny-embed" in {m.id for m in full.models.list()}
    with pytest.raises(openai.NotFoundError) as caught:
        full.chat.completions.create(model="no-such-model", messages=MESSAGES)  # type: ignore[arg-type]
    assert "tiny-embed" in error_of(caught.value.response)["message"]


# -- 4 and 5. what of a client's input is echoed -----------------------------------------------


def test_an_unknown_path_is_truncated_in_the_error_and_the_access_log(gateway: Gateway) -> None:
    request_id = new_request_id()
    path = "/v1/" + "a" * 8000
    response = httpx.get(gateway.url + path, headers={"x-request-id": request_id})
    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "not_found"
    assert len(response.content) < 400
    assert error["message"].startswith("Unknown path /v1/aaaa") and "…" in error["message"]
    line = wait_for_line(gateway, request_id)
    assert line["path"].startswith("/v1/aaaa") and len(line["path"]) <= 101
    assert len(line["_raw"]) < 1500


def test_a_long_method_on_a_known_path_is_not_echoed_in_full(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1]))) as sock:
        sock.settimeout(30)
        method = "X" * 300
        sock.sendall(
            f"{method} /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 4")
    assert method.encode() not in answer


@pytest.mark.parametrize(
    "request_id",
    ['<script>alert("x")</script>', "a\\b", "x" * 129, "quote'd", "{json}", "spa ce"],
)
def test_an_insane_request_id_is_replaced(gateway: Gateway, request_id: str) -> None:
    response = httpx.get(
        gateway.url + "/v1/models",
        headers={"authorization": f"Bearer {KEYS['full'][0]}", "x-request-id": request_id},
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] != request_id
    assert len(response.headers["x-request-id"]) == 32


def test_plain_request_ids_are_kept(gateway: Gateway) -> None:
    for request_id in (
        "req_0123abcd",
        "6f1c7a0e-2b7e-4d8a-9a53-2d1e0b6b7f10",
        "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1",
    ):
        response = httpx.get(gateway.url + "/v1/models", headers={"x-request-id": request_id})
        assert response.headers["x-request-id"] == request_id


def test_an_admin_key_id_is_truncated_and_admin_paths_never_redirect(gateway: Gateway) -> None:
    response = httpx.get(
        gateway.url + "/admin/keys/" + "k" * 5000, headers={"authorization": f"Bearer {ADMIN}"}
    )
    assert response.status_code == 404
    assert len(response.content) < 400 and error_of(response)["code"] == "key_not_found"


# -- 6. JWT bearer tokens ----------------------------------------------------------------------


def hs_token(profile: str = "key-full", **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now,
        "exp": now + 600,
        "vgate_key": profile,
        **overrides,
    }
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, HS_SECRET, "HS256")


def sdk(gateway: Gateway, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=api_key, max_retries=0, timeout=30)


def test_the_openai_sdk_with_a_jwt_as_its_api_key(gateway: Gateway) -> None:
    token = hs_token()
    client = sdk(gateway, token)
    request_id = new_request_id()
    reply = client.chat.completions.create(
        model="tiny-llama",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=4,
        extra_headers={"X-Request-ID": request_id},
    )
    assert reply.choices[0].message.content
    streamed = client.chat.completions.create(
        model="tiny-llama",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=4,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert client.embeddings.create(model="tiny-embed", input="hi").data
    assert {m.id for m in client.models.list()} >= {"tiny-llama", "tiny-embed"}
    line = wait_for_line(gateway, request_id)
    assert (line["key"], line["status"]) == ("full", 200)  # the profile's name, never the token
    assert token not in line["_raw"]
    assert token.split(".")[2] not in gateway.log()


def test_a_bad_jwt_is_401_saying_why(gateway: Gateway) -> None:
    now = int(time.time())
    cases = [
        (hs_token(exp=now - 3600), "token_expired", "expired"),
        (hs_token(aud="someone-else"), "invalid_token", "audience"),
        (hs_token(iss="https://evil.test"), "invalid_token", "issuer"),
        (hs_token(nbf=now + 3600), "invalid_token", "not valid yet"),
        (hs_token(profile="key-nobody"), "invalid_token", "no enabled key profile"),
        (hs_token(exp=None), "invalid_token", "no 'exp' claim"),
        (hs_token()[:-4] + "AAAA", "invalid_token", "signature"),
        (
            jwt.encode({"vgate_key": "key-full"}, None, algorithm="none"),
            "invalid_token",
            "algorithm",
        ),
    ]
    for token, code, reason in cases:
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk(gateway, token).chat.completions.create(model="tiny-llama", messages=MESSAGES)  # type: ignore[arg-type]
        error = error_of(caught.value.response)
        assert (error["code"], error["type"]) == (code, "invalid_request_error"), error
        assert reason in error["message"], (reason, error["message"])
        assert token not in caught.value.response.text
        assert caught.value.response.headers["www-authenticate"].startswith("Bearer")
    # An API key that is simply wrong keeps its own answer.
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(gateway, "vg-wrong").models.list()
    assert error_of(caught.value.response)["code"] == "invalid_api_key"


def test_a_jwt_gets_its_profiles_models_and_limits(gateway: Gateway) -> None:
    narrow = sdk(gateway, hs_token("narrow"))  # by the key's name, which only it has
    assert sorted(m.id for m in narrow.models.list()) == ["default", "tiny-llama"]
    with pytest.raises(openai.NotFoundError):
        narrow.embeddings.create(model="tiny-embed", input="hi")
    limited = sdk(gateway, hs_token("key-jwt-rpm"))  # rpm 2, shared with the key itself
    limited.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert chat(gateway, "jwt-rpm").status_code == 200
    with pytest.raises(openai.RateLimitError):
        limited.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]


# -- RS256 against a JWKS URL ------------------------------------------------------------------


class JwksServer:
    """An identity provider's JWKS endpoint, serving what the test sets, counting fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = orjson.dumps({"keys": owner.keys})
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def rsa_pair(kid: str) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public: dict[str, Any] = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return private, {**public, "kid": kid, "alg": "RS256", "use": "sig"}


def rs_token(private: rsa.RSAPrivateKey, kid: str) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 600, "vgate_key": "key-full"}
    return jwt.encode(claims, private, algorithm="RS256", headers={"kid": kid})


def test_rs256_tokens_against_a_jwks_url_with_a_key_rotated_in(
    logs: Path, sim: Process, keys_file: Path
) -> None:
    idp = JwksServer()
    first, first_jwk = rsa_pair("k1")
    second, second_jwk = rsa_pair("k2")
    idp.keys = [first_jwk]
    config = gateway_config(models(sim))
    config["keys"] = {"file": str(keys_file)}
    config["jwt"] = {
        "enabled": True,
        "issuer": ISSUER,
        "audience": [AUDIENCE, "other"],
        "jwks_url": idp.url,
        "jwks_min_refresh_s": 1,
    }
    gateway = start_gateway(logs, config)
    try:
        assert idp.fetches == 1  # at start-up, before serving
        reply = sdk(gateway, rs_token(first, "k1")).chat.completions.create(
            model="tiny-llama",
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=4,
        )
        assert reply.choices[0].message.content
        # The IdP rotates a key in: a token signed with it makes the gateway fetch again.
        idp.keys = [first_jwk, second_jwk]
        rotated = sdk(gateway, rs_token(second, "k2"))

        def served() -> bool:
            try:
                rotated.models.list()
            except openai.AuthenticationError as exc:
                assert "does not know" in exc.message
                return False
            return True

        poll_until(served, timeout_s=30, interval_s=0.2)
        fetched = idp.fetches
        # Unknown key ids cost at most one fetch per jwks_min_refresh_s (1 s), however many.
        started = time.monotonic()
        for n in range(20):
            with pytest.raises(openai.AuthenticationError) as caught:
                sdk(gateway, rs_token(second, f"nope-{n}")).models.list()
            assert "does not know" in caught.value.message
        elapsed = time.monotonic() - started
        assert idp.fetches - fetched <= elapsed / 1.0 + 1, (idp.fetches - fetched, elapsed)
    finally:
        gateway.stop()
        idp.close()
