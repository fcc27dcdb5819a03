"""API keys: who is calling, and what the key allows.

Keys are pre-issued and stored only as SHA-256 hashes, in a YAML keys file (written by
`vgate keys create`, see `gateway.edge.keyfile`). A request's key is hashed and the digest looked
up in a dict: the secret is never compared byte by byte and never kept in memory.

Why the lookup is constant-time with respect to the secret: the only comparison made is of
SHA-256 digests (the dict's hash of the digest string, then string equality with the entry
found in that bucket, if any). How long that takes depends on the presented secret's digest,
never on how many leading characters of the secret are right. A timing attacker learns at
most how far their own guess's digest agrees with a stored one, which they could compute
themselves, and SHA-256's preimage resistance makes a digest prefix worthless for building a
secret. `hmac.compare_digest` on the entry found would compare the digest with itself.

The key ring can be replaced while the gateway runs (`KeyRing.reload`): the file is read and
validated off the event loop, then the new keys take over in one reference assignment, so a
request sees either the old set or the new one, never a mix. An invalid file changes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.config import field_path, read_yaml
from gateway.errors import AuthenticationError, ConfigError
from gateway.wire.headers import bearer_token
from policies.guardrails import KeyGuardrails
from policies.limits import NO_LIMITS, KeyLimits

KEY_PREFIX = "vg-"


@dataclass(frozen=True, slots=True)
class Caller:
    """The identity behind a key: `name` is what logs and metrics attribute usage to."""

    id: str
    name: str
    tier: Literal["interactive", "batch"] = "interactive"
    pins: tuple[str, ...] = ()  # backends this key's requests go to, on routes that have them
    may_pin: bool = False  # may force a backend for one request with X-VGate-Pin
    may_chaos: bool = False  # may ask for a chaos experiment with X-VGate-Chaos
    # The model routes (by route name; aliases resolved when the ring knows the config) this
    # key may use; None: every one.
    models: frozenset[str] | None = None
    limits: KeyLimits = NO_LIMITS
    guardrails: KeyGuardrails | None = None  # None: only the global guardrails apply
    cache: bool = True  # False: the response cache never reads, keeps or shares its answers


class _Limits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    tokens_per_day: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)


class _Guardrails(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    max_tokens: int | None = Field(None, ge=1)
    max_input_bytes: int | None = Field(None, ge=1)
    max_n: int | None = Field(None, ge=1)  # choices per request; overrides guardrails.max_n


class _KeyEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    name: str = Field(min_length=1, max_length=128)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tier: Literal["interactive", "batch"] = "interactive"  # batch waits behind interactive
    disabled: bool = False
    pin: tuple[str, ...] = ()  # backend names; a route with one of them always uses it
    may_pin: bool = False  # the right to send X-VGate-Pin
    may_chaos: bool = False  # the right to send X-VGate-Chaos (an on_request experiment)
    # false: this key's requests bypass the response cache (never read, kept or shared), a
    # tenant whose answers must not be stored even where its routes cache.
    cache: bool = True
    models: tuple[str, ...] = ()  # model names or aliases this key may use; empty: all
    limits: _Limits = _Limits()
    guardrails: _Guardrails = _Guardrails()

    @field_validator("pin", "models", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    def describe(self) -> dict[str, Any]:
        """What may be shown about this key: everything but its hash."""
        return {
            "id": self.id,
            "name": self.name,
            "tier": self.tier,
            "models": list(self.models) or None,
            "limits": self.limits.model_dump(),
            "guardrails": self.guardrails.model_dump(),
            "pin": list(self.pin) or None,
            "may_pin": self.may_pin,
            "may_chaos": self.may_chaos,
            "cache": self.cache,
            "disabled": self.disabled,
        }


class _KeysFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    keys: tuple[_KeyEntry, ...] = ()


def hash_key(secret: str | bytes) -> str:
    if isinstance(secret, str):
        secret = secret.encode()
    return hashlib.sha256(secret).hexdigest()


def new_secret() -> str:
    """A new API key: `vg-` and 32 URL-safe characters (192 bits) from `secrets`."""
    return KEY_PREFIX + secrets.token_urlsafe(24)


def parse_keys(raw: object, source: str) -> tuple[_KeyEntry, ...]:
    """Validate a keys file's parsed YAML: its schema, unique ids and unique hashes."""
    if raw is None:
        raw = {}
    if isinstance(raw, dict) and "keys" in raw and raw["keys"] is None:
        raw = {**raw, "keys": ()}  # `keys:` with nothing under it yet
    try:
        parsed = _KeysFile.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        reason = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
        raise ConfigError(source, field_path(error["loc"]), reason) from None
    ids: set[str] = set()
    hashes: dict[str, str] = {}
    for index, entry in enumerate(parsed.keys):
        if entry.id in ids:
            raise ConfigError(source, f"keys[{index}].id", f"id {entry.id!r} is used twice")
        ids.add(entry.id)
        if entry.sha256 in hashes:
            raise ConfigError(
                source,
                f"keys[{entry.id}].sha256",
                f"the same hash as keys[{hashes[entry.sha256]}]: one secret, two keys",
            )
        hashes[entry.sha256] = entry.id
    return parsed.keys


def read_keys_file(path: Path) -> tuple[_KeyEntry, ...]:
    return parse_keys(read_yaml(path, what="keys file"), str(path))


class _KeySet:
    """One consistent generation of the keys file: swapped whole, never edited."""

    __slots__ = ("by_hash", "by_id", "by_profile", "disabled", "entries")

    def __init__(self, by_hash: dict[str, Caller], entries: tuple[_KeyEntry, ...] = ()) -> None:
        self.by_hash = by_hash
        self.entries = entries
        self.by_id = {entry.id: entry for entry in entries}
        self.disabled = frozenset(entry.sha256 for entry in entries if entry.disabled)
        self.by_profile = _profiles(by_hash.values())


def _profiles(callers: Iterable[Caller]) -> dict[str, Caller]:
    """The enabled keys by id, and by name where no other key has that name or id: what a
    JWT's profile claim may name (`gateway.edge.jwt_auth`)."""
    by_id = {caller.id: caller for caller in callers}
    names: dict[str, list[Caller]] = {}
    for caller in by_id.values():
        names.setdefault(caller.name, []).append(caller)
    by_name = {
        name: same[0] for name, same in names.items() if len(same) == 1 and name not in by_id
    }
    return {**by_name, **by_id}


class KeyRing:
    """The keys in force. `authenticate` is the hot path; the rest is for reloads and admin.

    `backends` and `models` (every model name and alias → its route's name) let the ring
    check what keys refer to; given them, each key's `models` are resolved to route names,
    so the proxy's check is one set membership test.
    """

    __slots__ = ("_backends", "_keys", "_lock", "_models", "_stat", "on_reload", "path", "source")

    def __init__(
        self,
        callers_by_hash: dict[str, Caller],
        source: str = "<memory>",
        *,
        entries: tuple[_KeyEntry, ...] = (),
        path: Path | None = None,
        backends: Collection[str] | None = None,
        models: Mapping[str, str] | None = None,
    ) -> None:
        self._keys = _KeySet(callers_by_hash, entries)
        self.source = source
        self.path = path
        self._backends = backends
        self._models = models
        self._lock: asyncio.Lock | None = None
        self._stat: tuple[int, int, int] | None = None
        self.on_reload: Callable[[KeyRing], None] | None = None

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        backends: Collection[str] | None = None,
        models: Mapping[str, str] | None = None,
    ) -> KeyRing:
        """Read and validate a keys file (against the config's backends and models, if given)."""
        stat = file_signature(path)
        entries = read_keys_file(path)
        by_hash = _callers(entries, str(path), backends, models)
        ring = cls(by_hash, str(path), entries=entries, path=path, backends=backends, models=models)
        ring._stat = stat
        return ring

    # -- the hot path ---------------------------------------------------------------------

    def authenticate(self, authorization: bytes | None) -> Caller:
        """Resolve an `Authorization: Bearer <key>` header value to its caller."""
        if authorization is None:
            raise AuthenticationError(
                "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        secret = bearer_token(authorization)
        if secret is None:
            raise AuthenticationError(
                "Malformed Authorization header: expected 'Bearer <key>'.", code="invalid_api_key"
            )
        keys = self._keys  # one generation for the whole lookup
        digest = hashlib.sha256(secret).hexdigest()
        caller = keys.by_hash.get(digest)
        if caller is None:
            if digest in keys.disabled:
                raise AuthenticationError("This API key has been disabled.", code="invalid_api_key")
            raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")
        return caller

    def profile(self, name: str) -> Caller | None:
        """The enabled key a JWT's profile claim names, by id (or by a name only it has)."""
        return self._keys.by_profile.get(name)

    # -- reloads and administration ---------------------------------------------------------

    def ids(self) -> frozenset[str]:
        return frozenset(self._keys.by_id)

    def describe(self) -> list[dict[str, Any]]:
        """Every key, disabled ones too, without secrets or hashes."""
        return [entry.describe() for entry in self._keys.entries]

    def describe_key(self, key_id: str) -> dict[str, Any] | None:
        entry = self._keys.by_id.get(key_id)
        return None if entry is None else entry.describe()

    def limits_of(self, key_id: str) -> KeyLimits | None:
        entry = self._keys.by_id.get(key_id)
        return None if entry is None else _limits(entry)

    def counts(self) -> dict[str, int]:
        entries = self._keys.entries
        disabled = sum(1 for entry in entries if entry.disabled)
        return {"keys": len(entries), "enabled": len(entries) - disabled, "disabled": disabled}

    def adopt(self, other: KeyRing) -> None:
        """Put `other`'s keys in force, and check later reloads against what it was checked
        against: a config reload added or removed the models and backends keys may name."""
        self._backends, self._models = other._backends, other._models
        self._keys, self._stat = other._keys, other._stat
        if self.on_reload is not None:
            self.on_reload(self)

    def changed_on_disk(self) -> bool:
        """Whether the file differs (mtime, size or inode) from the one loaded last."""
        if self.path is None:
            return False
        return file_signature(self.path) != self._stat

    async def reload(self) -> dict[str, int]:
        """Read the keys file again and, if it is valid, put its keys in force at once.

        Raises `ConfigError` for an invalid file, leaving the keys in force as they were.
        """
        if self.path is None:
            raise ConfigError(self.source, "", "these keys were not loaded from a file")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            path = self.path
            stat, keys = await asyncio.to_thread(self._read, path)
            self._stat = stat  # tried: an invalid file is not reread until it changes again
            if isinstance(keys, ConfigError):
                raise keys
            self._keys = keys
        if self.on_reload is not None:
            self.on_reload(self)
        return self.counts()

    def _read(self, path: Path) -> tuple[tuple[int, int, int] | None, _KeySet | ConfigError]:
        """Off the event loop: the file's signature and its validated keys (or why not)."""
        for _ in range(5):
            before = file_signature(path)
            try:
                entries = read_keys_file(path)
                keys = _KeySet(
                    _callers(entries, self.source, self._backends, self._models), entries
                )
            except ConfigError as error:
                result: _KeySet | ConfigError = error
            else:
                result = keys
            # A file being written while it was read is read again once it has settled.
            if file_signature(path) == before:
                return before, result
        return None, ConfigError(self.source, "", "the file kept changing while it was read")


def file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def _limits(entry: _KeyEntry) -> KeyLimits:
    limits = entry.limits
    if limits == _Limits():
        return NO_LIMITS
    return KeyLimits(limits.rpm, limits.tpm, limits.tokens_per_day, limits.max_concurrent)


def _callers(
    entries: tuple[_KeyEntry, ...],
    source: str,
    backends: Collection[str] | None,
    models: Mapping[str, str] | None,
) -> dict[str, Caller]:
    by_hash: dict[str, Caller] = {}
    for entry in entries:
        if backends is not None:
            _check_pins(entry.id, entry.pin, backends, source)
        allowed: frozenset[str] | None = None
        if entry.models:
            if models is None:
                allowed = frozenset(entry.models)
            else:
                for name in entry.models:
                    if name not in models:
                        known = ", ".join(sorted(models))
                        raise ConfigError(
                            source,
                            f"keys[{entry.id}].models",
                            f"no model or alias is named {name!r} (models: {known})",
                        )
                allowed = frozenset(models[name] for name in entry.models)
        rails = entry.guardrails
        if entry.disabled:
            continue
        by_hash[entry.sha256] = Caller(
            id=entry.id,
            name=entry.name,
            tier=entry.tier,
            pins=entry.pin,
            may_pin=entry.may_pin,
            may_chaos=entry.may_chaos,
            cache=entry.cache,
            models=allowed,
            limits=_limits(entry),
            guardrails=None
            if rails.max_tokens is None and rails.max_input_bytes is None and rails.max_n is None
            else KeyGuardrails(rails.max_tokens, rails.max_input_bytes, rails.max_n),
        )
    return by_hash


def _check_pins(key_id: str, pins: tuple[str, ...], backends: Collection[str], source: str) -> None:
    for name in pins:
        if name not in backends:
            raise ConfigError(
                source,
                f"keys[{key_id}].pin",
                f"no backend is named {name!r} (backends: {', '.join(sorted(backends))})",
            )
