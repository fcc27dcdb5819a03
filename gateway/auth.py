"""API keys: who is calling.

Keys are pre-issued and stored only as SHA-256 hashes. A request's key is hashed and
looked up, so the secret is never compared byte by byte and never kept in memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.config import ConfigError, field_path
from gateway.errors import AuthenticationError


@dataclass(frozen=True, slots=True)
class Caller:
    """The identity behind a key: `name` is what logs and metrics attribute usage to."""

    id: str
    name: str
    tier: Literal["interactive", "batch"] = "interactive"
    pins: tuple[str, ...] = ()  # backends this key's requests go to, on routes that have them
    may_pin: bool = False  # may force a backend for one request with X-VGate-Pin


class _KeyEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tier: Literal["interactive", "batch"] = "interactive"  # batch waits behind interactive
    disabled: bool = False
    pin: tuple[str, ...] = ()  # backend names; a route with one of them always uses it
    may_pin: bool = False  # the right to send X-VGate-Pin

    @field_validator("pin", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value


class _KeysFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    keys: tuple[_KeyEntry, ...] = ()


def hash_key(secret: str | bytes) -> str:
    if isinstance(secret, str):
        secret = secret.encode()
    return hashlib.sha256(secret).hexdigest()


class KeyRing:
    __slots__ = ("_by_hash", "source")

    def __init__(self, callers_by_hash: dict[str, Caller], source: str = "<memory>") -> None:
        self._by_hash = callers_by_hash
        self.source = source

    def check_pins(self, backends: Collection[str]) -> None:
        """Fail at start-up on a key pinned to a backend the config does not have."""
        for caller in self._by_hash.values():
            for name in caller.pins:
                if name not in backends:
                    raise ConfigError(
                        self.source,
                        f"keys[{caller.id}].pin",
                        f"no backend is named {name!r} (backends: {', '.join(sorted(backends))})",
                    )

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        source = str(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(source, "", f"cannot read keys file: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(source, "", f"not valid YAML: {exc}") from None
        try:
            parsed = _KeysFile.model_validate(raw)
        except ValidationError as exc:
            error = exc.errors()[0]
            reason = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
            raise ConfigError(source, field_path(error["loc"]), reason) from None
        by_hash: dict[str, Caller] = {}
        ids: set[str] = set()
        for index, entry in enumerate(parsed.keys):
            if entry.id in ids:
                raise ConfigError(source, f"keys[{index}].id", f"id {entry.id!r} is used twice")
            ids.add(entry.id)
            if not entry.disabled:
                by_hash[entry.sha256] = Caller(
                    id=entry.id,
                    name=entry.name,
                    tier=entry.tier,
                    pins=entry.pin,
                    may_pin=entry.may_pin,
                )
        return cls(by_hash, source)

    def authenticate(self, authorization: bytes | None) -> Caller:
        """Resolve an `Authorization: Bearer <key>` header value to its caller."""
        if authorization is None:
            raise AuthenticationError(
                "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        scheme, _, secret = authorization.partition(b" ")
        secret = secret.strip()
        if scheme.lower() != b"bearer" or not secret:
            raise AuthenticationError(
                "Malformed Authorization header: expected 'Bearer <key>'.", code="invalid_api_key"
            )
        caller = self._by_hash.get(hashlib.sha256(secret).hexdigest())
        if caller is None:
            raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")
        return caller
