"""The JWT verifier: RS256 against a JWKS (file and URL), HS256 with a secret from the
environment, and every way a token or a `jwt:` section can be wrong."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import threading
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from gateway.config import GatewayConfig, JwtConfig, load_config
from gateway.edge.auth import KeyRing, hash_key
from gateway.edge.jwt_auth import RemoteKeys, TokenVerifier, looks_like_jwt, parse_jwks
from gateway.errors import AuthenticationError, ConfigError
from gateway.wire.headers import bearer_token

ISSUER = "https://idp.example"
AUDIENCE = "vgate"
SECRET = "s" * 64
SECRET_ENV = "VGATE_TEST_JWT_SECRET"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


PRIVATE = rsa_key()
OTHER = rsa_key()


def jwk_of(key: rsa.RSAPrivateKey, kid: str | None, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    return {**jwk, **extra}


def jwks(*keys: dict[str, Any]) -> bytes:
    return orjson.dumps({"keys": list(keys)})


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now + 300,
        "iat": now,
        "sub": "alice@example",
        "vgate_key": "key-team",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def rs256(
    payload: dict[str, Any], *, key: Any = PRIVATE, kid: str | None = "k1", **kw: Any
) -> bytes:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(
        payload, key, algorithm=kw.get("algorithm", "RS256"), headers=headers
    ).encode()


def hs256(payload: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> bytes:
    return jwt.encode(payload, secret, algorithm=algorithm).encode()


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def hs_signed(header: dict[str, Any], payload: dict[str, Any], key: bytes) -> bytes:
    """An HS256 token signed by hand: PyJWT itself refuses to key HMAC with a public key."""
    signing_input = b64(orjson.dumps(header)) + b"." + b64(orjson.dumps(payload))
    return signing_input + b"." + b64(hmac.new(key, signing_input, hashlib.sha256).digest())


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n"
        f"  - {{id: key-team, name: team, sha256: {hash_key('a')}, models: [m1]}}\n"
        f"  - {{id: key-off, name: 'off', sha256: {hash_key('b')}, disabled: true}}\n"
        f"  - {{id: key-x, name: twin, sha256: {hash_key('c')}}}\n"
        f"  - {{id: key-y, name: twin, sha256: {hash_key('d')}}}\n"
    )
    return KeyRing.load(path)


def jwks_config(path: Path, **extra: Any) -> JwtConfig:
    return JwtConfig(enabled=True, issuer=ISSUER, audience=AUDIENCE, jwks_file=path, **extra)


@pytest.fixture
def rs_verifier(tmp_path: Path) -> TokenVerifier:
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks(jwk_of(PRIVATE, "k1", alg="RS256", use="sig")))
    return TokenVerifier.from_config(jwks_config(path), "test.yaml")


@pytest.fixture
def hs_verifier(monkeypatch: pytest.MonkeyPatch) -> TokenVerifier:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    config = JwtConfig(enabled=True, issuer=ISSUER, audience=[AUDIENCE], secret_env=SECRET_ENV)
    return TokenVerifier.from_config(config, "test.yaml")


def bearer(token: bytes) -> bytes:
    return b"Bearer " + token


async def refused(verifier: TokenVerifier, ring: KeyRing, token: bytes) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as caught:
        await verifier.authenticate(bearer(token), ring)
    error = caught.value
    assert error.status == 401
    assert set(error.payload()["error"]) == {"message", "type", "param", "code"}
    assert token.decode() not in error.message  # never echoed, nor any part of it
    assert token.decode().split(".")[1][:20] not in error.message
    assert error.headers["WWW-Authenticate"].startswith("Bearer")
    return error


# -- what a token looks like -----------------------------------------------------------------


def test_a_jwt_is_told_from_an_api_key_by_its_shape() -> None:
    assert looks_like_jwt(hs256(claims()))
    assert not looks_like_jwt(b"vg-demo-0123456789abcdef")
    assert not looks_like_jwt(b"eyJhbGciOi.only-two-parts")
    assert bearer_token(b"Bearer  abc ") == b"abc"
    assert bearer_token(b"Basic abc") is None and bearer_token(None) is None


async def test_a_secret_that_is_not_a_jwt_is_left_to_the_api_key_error(
    hs_verifier: TokenVerifier, ring: KeyRing
) -> None:
    assert await hs_verifier.authenticate(b"Bearer vg-not-a-key", ring) is None
    assert await hs_verifier.authenticate(None, ring) is None


# -- RS256 with a JWKS file --------------------------------------------------------------------


async def test_rs256_token_names_its_key_profile(rs_verifier: TokenVerifier, ring: KeyRing) -> None:
    caller = await rs_verifier.authenticate(bearer(rs256(claims())), ring)
    assert caller is not None
    assert (caller.id, caller.name, caller.models) == ("key-team", "team", frozenset({"m1"}))
    # By a name only one key has, too.
    by_name = await rs_verifier.authenticate(bearer(rs256(claims(vgate_key="team"))), ring)
    assert by_name is caller


async def test_rs256_failures_say_why(rs_verifier: TokenVerifier, ring: KeyRing) -> None:
    now = int(time.time())
    cases: list[tuple[bytes, str, str]] = [
        (rs256(claims(exp=now - 120)), "token_expired", "expired"),
        (rs256(claims(nbf=now + 600)), "invalid_token", "not valid yet"),
        (rs256(claims(iat=now + 600)), "invalid_token", "not valid yet"),
        (rs256(claims(aud="someone-else")), "invalid_token", "audience"),
        (rs256(claims(iss="https://evil.example")), "invalid_token", "issuer"),
        (rs256(claims(exp=None)), "invalid_token", "no 'exp' claim"),
        (rs256(claims(aud=None)), "invalid_token", "no 'aud' claim"),
        (rs256(claims(iss=None)), "invalid_token", "no 'iss' claim"),
        (rs256(claims(vgate_key=None)), "invalid_token", "no 'vgate_key' claim"),
        (rs256(claims(vgate_key="key-nobody")), "invalid_token", "no enabled key profile"),
        (rs256(claims(vgate_key="key-off")), "invalid_token", "no enabled key profile"),
        (rs256(claims(vgate_key="twin")), "invalid_token", "no enabled key profile"),
        (rs256(claims(vgate_key=["key-team"])), "invalid_token", "no enabled key profile"),
        (rs256(claims(), key=OTHER), "invalid_token", "signature does not verify"),
        (rs256(claims(), kid="k9"), "invalid_token", "does not know"),
        (rs256(claims(), algorithm="RS384"), "invalid_token", "algorithm"),
        (rs256(claims(), algorithm="PS256"), "invalid_token", "algorithm"),
    ]
    for token, code, reason in cases:
        error = await refused(rs_verifier, ring, token)
        assert (error.code, error.type) == (code, "invalid_request_error"), error.message
        assert reason in error.message, (reason, error.message)


async def test_clock_skew_is_allowed_up_to_the_leeway(
    rs_verifier: TokenVerifier, ring: KeyRing
) -> None:
    now = int(time.time())
    assert await rs_verifier.authenticate(bearer(rs256(claims(exp=now - 10))), ring)
    assert await rs_verifier.authenticate(bearer(rs256(claims(nbf=now + 10))), ring)
    await refused(rs_verifier, ring, rs256(claims(exp=now - 60)))


async def test_unsigned_and_algorithm_confusion_tokens_are_refused(
    rs_verifier: TokenVerifier, ring: KeyRing, tmp_path: Path
) -> None:
    unsigned = jwt.encode(claims(), None, algorithm="none", headers={"kid": "k1"}).encode()
    assert "algorithm" in (await refused(rs_verifier, ring, unsigned)).message
    # HS256 keyed with the public key's PEM: the classic forgery against RS256 verifiers.
    from cryptography.hazmat.primitives import serialization

    pem = PRIVATE.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = hs_signed({"alg": "HS256", "typ": "JWT", "kid": "k1"}, claims(), pem)
    assert "algorithm" in (await refused(rs_verifier, ring, forged)).message


async def test_malformed_and_oversized_tokens(rs_verifier: TokenVerifier, ring: KeyRing) -> None:
    assert "malformed" in (await refused(rs_verifier, ring, b"eyJhbGciOi.eyJ.x")).message
    huge = rs256(claims(padding="x" * 20_000))
    assert "longer than" in (await refused(rs_verifier, ring, huge)).message


async def test_a_token_without_kid_is_taken_only_where_the_set_has_one_key(
    tmp_path: Path, ring: KeyRing
) -> None:
    one = tmp_path / "one.json"
    one.write_bytes(jwks(jwk_of(PRIVATE, None)))
    verifier = TokenVerifier.from_config(jwks_config(one), "t")
    assert await verifier.authenticate(bearer(rs256(claims(), kid=None)), ring)
    two = tmp_path / "two.json"
    two.write_bytes(jwks(jwk_of(PRIVATE, "k1"), jwk_of(OTHER, "k2")))
    verifier = TokenVerifier.from_config(jwks_config(two), "t")
    assert "names no key" in (await refused(verifier, ring, rs256(claims(), kid=None))).message
    assert await verifier.authenticate(bearer(rs256(claims(), key=OTHER, kid="k2")), ring)


def test_a_jwks_keeps_only_public_signing_keys_for_the_allowed_algorithms() -> None:
    document = jwks(
        jwk_of(PRIVATE, "sig"),
        jwk_of(OTHER, "enc", use="enc"),
        {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
        jwk_of(OTHER, "ps", alg="PS256"),
        {"kty": "RSA", "kid": "broken"},
        "not a key",
    )
    assert set(parse_jwks(document, frozenset({"RS256"}))) == {"sig"}
    with pytest.raises(ValueError, match="no signing key"):
        parse_jwks(jwks({"kty": "oct", "k": "c2VjcmV0"}), frozenset({"RS256"}))
    with pytest.raises(ValueError, match="no 'keys' list"):
        parse_jwks(b"[]", frozenset({"RS256"}))


# -- HS256 with a secret from the environment --------------------------------------------------


async def test_hs256_token_from_an_environment_secret(
    hs_verifier: TokenVerifier, ring: KeyRing
) -> None:
    caller = await hs_verifier.authenticate(bearer(hs256(claims())), ring)
    assert caller is not None and caller.id == "key-team"
    wrong = await refused(hs_verifier, ring, hs256(claims(), secret="t" * 64))
    assert "signature does not verify" in wrong.message
    stronger = await refused(hs_verifier, ring, hs256(claims(), secret=SECRET, algorithm="HS512"))
    assert "algorithm" in stronger.message
    assert (await refused(hs_verifier, ring, hs256(claims(exp=1)))).code == "token_expired"
    rsa_signed = await refused(hs_verifier, ring, rs256(claims()))
    assert "algorithm" in rsa_signed.message


# -- the `jwt:` section, checked at start-up ---------------------------------------------------


def check(section: dict[str, Any], tmp_path: Path) -> ConfigError:
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys: []\n")
    path = tmp_path / "gateway.yaml"
    config = {
        "keys": {"file": str(keys)},
        "models": [
            {
                "name": "m",
                "backends": [{"name": "b", "provider": "vllm", "url": "http://127.0.0.1:9"}],
            }
        ],
        "jwt": section,
    }
    path.write_text(orjson.dumps(config).decode())
    with pytest.raises(ConfigError) as caught:
        loaded = load_config(path)
        TokenVerifier.from_config(loaded.jwt, loaded.source)
    return caught.value


def test_config_is_validated_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = {"enabled": True, "issuer": ISSUER, "audience": AUDIENCE}
    monkeypatch.delenv("VGATE_TEST_UNSET", raising=False)
    error = check({**base, "secret_env": "VGATE_TEST_UNSET"}, tmp_path)
    assert error.field == "jwt.secret_env" and "VGATE_TEST_UNSET is not set" in error.reason
    monkeypatch.setenv("VGATE_TEST_SHORT", "short")
    error = check({**base, "secret_env": "VGATE_TEST_SHORT", "algorithms": ["HS256"]}, tmp_path)
    assert error.field == "jwt.secret_env" and "at least 32" in error.reason
    error = check({**base, "jwks_file": str(tmp_path / "missing.json")}, tmp_path)
    assert error.field == "jwt.jwks_file" and "No such file" in error.reason
    (tmp_path / "empty.json").write_text('{"keys": []}')
    error = check({**base, "jwks_file": str(tmp_path / "empty.json")}, tmp_path)
    assert error.field == "jwt.jwks_file" and "no signing key" in error.reason
    for section, reason in [
        ({**base}, "needs a key source"),
        ({**base, "issuer": None, "jwks_url": "https://idp/jwks"}, "issuer"),
        ({**base, "audience": [], "jwks_url": "https://idp/jwks"}, "audience"),
        ({**base, "jwks_url": "file:///etc/passwd"}, "not an http"),
        ({**base, "jwks_url": "https://i/j", "secret_env": "X"}, "not ['jwks_url', 'secret_env']"),
        ({**base, "jwks_url": "https://i/j", "algorithms": ["none"]}, "is not one of"),
        ({**base, "jwks_url": "https://i/j", "algorithms": ["HS256"]}, "cannot be verified"),
        ({**base, "secret_env": "X", "algorithms": ["RS256"]}, "cannot be verified"),
        ({**base, "jwks_url": "https://i/j", "profile_claim": "exp"}, "time claim"),
        ({**base, "jwks_url": "https://i/j", "leeway_s": 3600}, "leeway_s"),
    ]:
        error = check(section, tmp_path)
        assert error.field.startswith("jwt"), (section, error)
        assert reason in str(error), (reason, str(error))


def test_jwt_is_off_by_default() -> None:
    assert (
        GatewayConfig(
            keys={"file": "k"},
            models=[  # type: ignore[arg-type]
                {
                    "name": "m",
                    "backends": [{"name": "b", "provider": "vllm", "url": "http://127.0.0.1:9"}],
                }
            ],
        ).jwt.enabled
        is False
    )


# -- a JWKS URL: cached, refreshed off the request path, bounded -------------------------------


class FakeIdP:
    """A JWKS endpoint whose answers, delay and failures a test sets (called in a thread)."""

    def __init__(self, document: bytes) -> None:
        self.document = document
        self.calls = 0
        self.delay_s = 0.0
        self.fail = False
        self.lock = threading.Lock()

    def __call__(self, url: str, timeout_s: float) -> bytes:
        with self.lock:
            self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise OSError("connection refused")
        return self.document


def remote(idp: FakeIdP, clock: list[float], **extra: Any) -> RemoteKeys:
    settings = {"refresh_s": 300.0, "min_refresh_s": 30.0, "timeout_s": 0.5, **extra}
    return RemoteKeys(
        "https://idp/jwks", frozenset({"RS256"}), fetch=idp, clock=lambda: clock[0], **settings
    )


async def test_remote_keys_are_fetched_once_and_an_unknown_kid_refetches_rarely() -> None:
    idp = FakeIdP(jwks(jwk_of(PRIVATE, "k1")))
    clock = [1000.0]
    keys = remote(idp, clock)
    await keys.start()
    assert idp.calls == 1 and set(keys.keys) == {"k1"}
    assert await keys.key("k1") is not None
    assert idp.calls == 1  # cached
    # A rotated-in key: one refetch finds it.
    clock[0] += 31
    idp.document = jwks(jwk_of(PRIVATE, "k1"), jwk_of(OTHER, "k2"))
    assert await keys.key("k2") is not None
    assert idp.calls == 2
    # An attacker's random kids cost no fetch within min_refresh_s.
    for n in range(20):
        assert await keys.key(f"random-{n}") is None
    assert idp.calls == 2
    # Stale keys are refreshed in the background, the request served from the cache.
    clock[0] += 301
    assert await keys.key("k1") is not None
    await asyncio.sleep(0)
    for _ in range(200):
        if keys.fetched_at == clock[0]:
            break
        await asyncio.sleep(0.01)
    assert idp.calls == 3
    await keys.aclose()


async def test_a_failing_idp_leaves_the_keys_in_hand() -> None:
    idp = FakeIdP(jwks(jwk_of(PRIVATE, "k1")))
    clock = [1000.0]
    keys = remote(idp, clock)
    await keys.start()
    idp.fail = True
    clock[0] += 400
    assert await keys.key("k1") is not None
    for _ in range(200):
        if idp.calls == 2 and keys._task is not None and keys._task.done():
            break
        await asyncio.sleep(0.01)
    assert idp.calls == 2 and set(keys.keys) == {"k1"}
    await keys.aclose()


async def test_a_stalled_idp_never_blocks_the_event_loop_and_a_request_waits_bounded() -> None:
    idp = FakeIdP(jwks(jwk_of(PRIVATE, "k1")))
    idp.delay_s = 3.0
    clock = [1000.0]
    keys = remote(idp, clock, timeout_s=0.3)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    running = asyncio.create_task(ticker())
    started = time.monotonic()
    assert await keys.key("k1") is None  # nothing fetched in time: the token is refused
    waited = time.monotonic() - started
    assert waited < 2.5  # bounded by timeout_s, not by the IdP's 3 s (generous under load)
    assert ticks >= 3  # the loop went on running while the fetch waited in its thread
    running.cancel()
    await keys.aclose()


async def test_a_verified_token_is_remembered_until_it_expires_bounded(
    monkeypatch: pytest.MonkeyPatch, ring: KeyRing
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    config = JwtConfig(
        enabled=True,
        issuer=ISSUER,
        audience=AUDIENCE,
        secret_env=SECRET_ENV,
        leeway_s=0,
        verified_cache_size=2,
    )
    verifier = TokenVerifier.from_config(config, "t")
    checks = 0
    verify = verifier.verify

    def counting(token: bytes, key: Any) -> dict[str, Any]:
        nonlocal checks
        checks += 1
        return verify(token, key)

    monkeypatch.setattr(verifier, "verify", counting)
    token = hs256(claims(exp=int(time.time()) + 2))
    for _ in range(5):
        assert await verifier.authenticate(bearer(token), ring) is not None
    assert checks == 1
    # Past its exp, the remembered token is checked again, and refused.
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            await verifier.authenticate(bearer(token), ring)
        except AuthenticationError as error:
            assert error.code == "token_expired"
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the token was still taken after its exp")
    # At most verified_cache_size tokens are kept.
    for n in range(5):
        await verifier.authenticate(bearer(hs256(claims(jti=f"t{n}"))), ring)
    assert len(verifier._verified) == 2


async def test_a_remembered_tokens_profile_is_looked_up_again(
    hs_verifier: TokenVerifier, tmp_path: Path
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - {{id: key-team, name: team, sha256: {hash_key('a')}}}\n")
    ring = KeyRing.load(path)
    token = bearer(hs256(claims()))
    assert await hs_verifier.authenticate(token, ring) is not None
    path.write_text(
        f"keys:\n  - {{id: key-team, name: team, sha256: {hash_key('a')}, disabled: true}}\n"
    )
    await ring.reload()
    with pytest.raises(AuthenticationError, match="no enabled key profile"):
        await hs_verifier.authenticate(token, ring)
