"""JWT bearer tokens beside API keys, for clients that hold an identity provider's tokens.

Off unless `jwt.enabled`. A request's bearer secret is looked up as an API key first, as
always; only a secret that is not a known key and looks like a JWT (`eyJ`, two dots) comes
here, so the API-key path does no more work than before. A token is verified with PyJWT:

- its signature, against one key source: a JWKS file (read at start-up), a JWKS URL (fetched
  at start-up and every `jwks_refresh_s` in the background; a token signed with a key id
  not yet known fetches again, at most once per `jwks_min_refresh_s`, a request waiting at
  most `jwks_timeout_s`), or an HMAC secret from an environment variable;
- its algorithm, against the configured list (never `none`; HS and public-key algorithms
  never mixed: `gateway.config.JwtConfig`); a JWKS key is used only with its own algorithm;
- `exp` (required), `nbf` and `iat`, with `leeway_s` of clock skew; `iss` and `aud`;
- its `profile_claim`, naming the key (by id, or by a name only one key has) in the keys
  file whose models, limits and guardrails apply: a token's requests count as that key's.

A token that fails is 401 with OpenAI's body, saying why (expired, wrong audience...), and
never repeats the token or what it holds. The JWKS fetch runs in a thread (urllib, bounded
in time and size): the event loop never waits on the network, and at most one fetch runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import orjson
from jwt import PyJWK
from jwt.types import Options

from gateway.config import JWT_HMAC_ALGORITHMS, JwtConfig
from gateway.edge.auth import Caller, KeyRing
from gateway.errors import AuthenticationError, ConfigError
from gateway.wire.headers import bearer_token
from policies.background import stop_task

logger = logging.getLogger("vgate.jwt")

MAX_JWKS_BYTES = 1024 * 1024  # a key set larger than this is refused, not read
MAX_JWKS_KEYS = 100  # keys beyond these in a set are ignored
# RFC 7518 §3.2: an HMAC key at least as long as the hash's output.
_MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_CHALLENGE = {"WWW-Authenticate": 'Bearer error="invalid_token"'}

Keys = dict[str | None, PyJWK]  # by `kid` (None: a key without one)
Fetch = Callable[[str, float], bytes]


def looks_like_jwt(secret: bytes) -> bool:
    """A compact JWS: a base64url JSON header (`{"` encodes as `eyJ`) and three parts."""
    return secret.startswith(b"eyJ") and secret.count(b".") == 2


def _invalid(message: str, code: str = "invalid_token") -> AuthenticationError:
    return AuthenticationError(message, code=code, headers=dict(_CHALLENGE))


def _rejection(error: jwt.PyJWTError, claim: str) -> AuthenticationError:
    """Why a token failed, in words a client can act on, without anything from the token."""
    if isinstance(error, jwt.ExpiredSignatureError):
        return _invalid("The token has expired.", code="token_expired")
    if isinstance(error, jwt.ImmatureSignatureError):
        return _invalid("The token is not valid yet (its nbf or iat is in the future).")
    if isinstance(error, jwt.InvalidAudienceError):
        return _invalid("The token's audience (aud) is not this gateway.")
    if isinstance(error, jwt.InvalidIssuerError):
        return _invalid("The token's issuer (iss) is not the one this gateway trusts.")
    if isinstance(error, jwt.MissingRequiredClaimError):
        # error.claim is one of ours (exp, iss, aud, the profile claim), never the token's.
        named = error.claim if error.claim in ("exp", "iss", "aud", claim) else "a required"
        return _invalid(f"The token has no '{named}' claim.")
    if isinstance(error, jwt.InvalidSignatureError):
        return _invalid("The token's signature does not verify.")
    if isinstance(error, jwt.InvalidAlgorithmError):
        return _invalid("The token's signing algorithm (alg) is not allowed here.")
    if isinstance(error, jwt.DecodeError):
        return _invalid("The token is malformed.")
    return _invalid("The token is not valid.")


def parse_jwks(data: bytes, algorithms: frozenset[str]) -> Keys:
    """The signing keys of a JWK Set usable with `algorithms`; ValueError if it has none.

    Symmetric (`oct`) keys and keys not for signatures are skipped: a JWKS is public.
    """
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from None
    listed = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(listed, list):
        raise ValueError("not a JWK Set: no 'keys' list")
    keys: Keys = {}
    for item in listed[:MAX_JWKS_KEYS]:
        if not isinstance(item, dict) or item.get("kty") == "oct":
            continue
        if item.get("use", "sig") != "sig":
            continue
        try:
            key = PyJWK(item)
        except jwt.PyJWTError:
            continue  # a key type or curve this build cannot use
        kid = key.key_id
        if key.algorithm_name in algorithms and (kid is None or isinstance(kid, str)):
            keys[kid] = key
    if not keys:
        allowed = ", ".join(sorted(algorithms))
        raise ValueError(f"no signing key for the allowed algorithms ({allowed})")
    return keys


def fetch_jwks(url: str, timeout_s: float) -> bytes:
    """GET a JWKS document (in a worker thread): at most MAX_JWKS_BYTES, `timeout_s` per read."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        data: bytes = response.read(MAX_JWKS_BYTES + 1)
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
    return data


def pick(keys: Keys, kid: str | None) -> PyJWK | None:
    """The key a token names; a token without a `kid` only where the set has one key."""
    if kid is not None:
        return keys.get(kid)
    return next(iter(keys.values())) if len(keys) == 1 else None


class RemoteKeys:
    """A JWKS URL's keys, cached, refreshed off the request path, one fetch at a time."""

    def __init__(
        self,
        url: str,
        algorithms: frozenset[str],
        *,
        refresh_s: float,
        min_refresh_s: float,
        timeout_s: float,
        fetch: Fetch = fetch_jwks,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.algorithms = algorithms
        self.refresh_s = refresh_s
        self.min_refresh_s = min_refresh_s
        self.timeout_s = timeout_s
        self.fetch = fetch
        self.clock = clock
        self.keys: Keys = {}
        self.fetched_at: float | None = None
        self.on_change: Callable[[], None] | None = None  # the key set fetched differs
        self._document = b""
        self._attempted_at = -math.inf
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """The first fetch, before serving; a failure is logged, and tried again later."""
        await self._wait(self._refresh())

    async def aclose(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def key(self, kid: str | None) -> PyJWK | None:
        now = self.clock()
        if self.fetched_at is None or now - self.fetched_at >= self.refresh_s:
            self._refresh()  # in the background: the keys in hand serve meanwhile
        found = pick(self.keys, kid)
        if found is None:
            # A key rotated in since the last fetch, or keys never fetched: wait for one
            # fetch, which an unknown kid can cause at most once per min_refresh_s.
            await self._wait(self._refresh())
            found = pick(self.keys, kid)
        return found

    def _refresh(self) -> asyncio.Task[None] | None:
        """The fetch running, or a new one unless the last began under min_refresh_s ago."""
        if self._task is not None and not self._task.done():
            return self._task
        now = self.clock()
        if now - self._attempted_at < self.min_refresh_s:
            return None
        self._attempted_at = now
        self._task = asyncio.get_running_loop().create_task(self._fetch())
        return self._task

    async def _wait(self, task: asyncio.Task[None] | None) -> None:
        if task is None:
            return
        # shield: a request that stops waiting leaves the fetch to finish for the next.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), self.timeout_s)

    async def _fetch(self) -> None:
        try:
            document, keys = await asyncio.wait_for(
                asyncio.to_thread(self._fetch_and_parse), self.timeout_s + 1
            )
        except Exception as exc:  # any failure: the keys in hand stay, and it is logged
            logger.warning(
                "jwt: fetching the JWKS from %s failed (%s: %s); %d keys stay in use",
                self.url,
                type(exc).__name__,
                str(exc)[:200],
                len(self.keys),
            )
            return
        changed = document != self._document
        self._document = document
        self.keys = keys
        self.fetched_at = self.clock()
        if changed and self.on_change is not None:
            self.on_change()

    def _fetch_and_parse(self) -> tuple[bytes, Keys]:
        document = self.fetch(self.url, self.timeout_s)
        return document, parse_jwks(document, self.algorithms)


class StaticKeys:
    """A JWKS file's keys, read once at start-up."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def key(self, kid: str | None) -> PyJWK | None:
        return pick(self.keys, kid)


class TokenVerifier:
    """Verifies a bearer JWT and finds the key profile it names."""

    def __init__(
        self,
        config: JwtConfig,
        *,
        secret: bytes | None = None,
        keys: RemoteKeys | StaticKeys | None = None,
    ) -> None:
        if (secret is None) == (keys is None):
            raise ValueError("a TokenVerifier needs either an HMAC secret or a key source")
        self.config = config
        self.secret = secret
        self.keys = keys
        self.algorithms = list(config.allowed_algorithms)
        self.claim = config.profile_claim
        self.max_token_bytes = config.max_token_bytes
        self._options: Options = {"require": ["exp", "iss", "aud", self.claim]}
        # Tokens already verified (a client sends one for many requests): the token's
        # bytes -> its exp and profile. An RS256 check costs ~100 µs; a hit, a dict lookup.
        # Bounded (the oldest entry goes first); emptied when a JWKS URL's keys change.
        self._verified: dict[bytes, tuple[float, str]] = {}
        self._cache_size = config.verified_cache_size
        if isinstance(keys, RemoteKeys):
            keys.on_change = self._verified.clear

    @classmethod
    def from_config(
        cls, config: JwtConfig, source: str, *, fetch: Fetch = fetch_jwks
    ) -> TokenVerifier:
        """Build from `jwt:`; a missing secret or an unusable JWKS file is a ConfigError."""
        algorithms = frozenset(config.allowed_algorithms)
        if config.secret_env is not None:
            value = os.environ.get(config.secret_env, "")
            if not value:
                raise ConfigError(
                    source, "jwt.secret_env", f"environment variable {config.secret_env} is not set"
                )
            secret = value.encode()
            needed = max(_MIN_SECRET_BYTES[name] for name in algorithms & JWT_HMAC_ALGORITHMS)
            if len(secret) < needed:
                raise ConfigError(
                    source,
                    "jwt.secret_env",
                    f"the secret in {config.secret_env} has {len(secret)} bytes; "
                    f"{', '.join(sorted(algorithms))} needs at least {needed}",
                )
            return cls(config, secret=secret)
        if config.jwks_file is not None:
            return cls(
                config, keys=StaticKeys(_read_jwks_file(config.jwks_file, algorithms, source))
            )
        assert config.jwks_url is not None  # JwtConfig: one key source when enabled
        return cls(
            config,
            keys=RemoteKeys(
                config.jwks_url,
                algorithms,
                refresh_s=config.jwks_refresh_s,
                min_refresh_s=config.jwks_min_refresh_s,
                timeout_s=config.jwks_timeout_s,
                fetch=fetch,
            ),
        )

    async def start(self) -> None:
        if self.keys is not None:
            await self.keys.start()

    async def aclose(self) -> None:
        if self.keys is not None:
            await self.keys.aclose()

    async def authenticate(self, authorization: bytes | None, ring: KeyRing) -> Caller | None:
        """The caller a valid token names; None when the secret is not a JWT at all (the
        API key's own error stands); AuthenticationError (401) for a token that fails."""
        token = bearer_token(authorization)
        if token is None or not looks_like_jwt(token):
            return None
        hit = self._verified.get(token)
        if hit is not None and hit[0] > time.time() - self.config.leeway_s:
            profile: object = hit[1]  # its profile is looked up again: the keys may change
        else:
            if hit is not None:
                del self._verified[token]  # expired since
            if len(token) > self.max_token_bytes:
                raise _invalid(
                    f"The token is longer than this gateway accepts ({self.max_token_bytes} bytes)."
                )
            claims = self.verify(token, await self._key_for(token))
            profile = claims.get(self.claim)
            if isinstance(profile, str) and self._cache_size:
                if len(self._verified) >= self._cache_size:
                    del self._verified[next(iter(self._verified))]
                self._verified[token] = (float(claims["exp"]), profile)
        caller = ring.profile(profile) if isinstance(profile, str) else None
        if caller is None:
            raise _invalid(f"The token's '{self.claim}' claim names no enabled key profile.")
        return caller

    def verify(self, token: bytes, key: bytes | PyJWK) -> dict[str, Any]:
        """The token's claims once its signature, algorithm, times, iss and aud check out."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=self.algorithms,
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=self.config.leeway_s,
                options=self._options,
            )
        except jwt.PyJWTError as error:
            raise _rejection(error, self.claim) from None
        return claims

    async def _key_for(self, token: bytes) -> bytes | PyJWK:
        if self.secret is not None:
            return self.secret
        assert self.keys is not None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid("The token is malformed.") from None
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _invalid("The token is malformed: its kid is not a string.")
        key = await self.keys.key(kid)
        if key is None:
            if kid is None:
                raise _invalid("The token names no key (kid), and the key set holds several.")
            raise _invalid("The token is signed with a key (kid) this gateway does not know.")
        return key


def _read_jwks_file(path: Path, algorithms: frozenset[str], source: str) -> Keys:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_JWKS_BYTES + 1)
    except OSError as exc:
        raise ConfigError(source, "jwt.jwks_file", f"{path}: {exc.strerror}") from None
    if len(data) > MAX_JWKS_BYTES:
        raise ConfigError(source, "jwt.jwks_file", f"{path}: larger than {MAX_JWKS_BYTES} bytes")
    try:
        return parse_jwks(data, algorithms)
    except ValueError as exc:
        raise ConfigError(source, "jwt.jwks_file", f"{path}: {exc}") from None


async def token_caller(
    keys: KeyRing,
    tokens: TokenVerifier | None,
    authorization: bytes | None,
    refused: AuthenticationError,
) -> Caller:
    """Where the API-key lookup `refused` an `Authorization` header: the caller a JWT in it
    names, or `refused` raised again. Called only then, so the API-key path pays nothing
    (not even a coroutine)."""
    caller = None
    if tokens is not None:
        caller = await tokens.authenticate(authorization, keys)
    if caller is None:
        raise refused
    return caller
