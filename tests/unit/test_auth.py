from __future__ import annotations

from pathlib import Path

import pytest

from gateway.auth import KeyRing, hash_key
from gateway.config import ConfigError
from gateway.errors import AuthenticationError
from tests.servers import DEMO_KEY, KEYS_FILE


def test_demo_key_resolves_to_its_caller() -> None:
    keys = KeyRing.load(KEYS_FILE)
    caller = keys.authenticate(f"Bearer {DEMO_KEY}".encode())
    assert (caller.id, caller.name) == ("key-demo", "demo")
    assert keys.authenticate(f"bearer  {DEMO_KEY}".encode()).name == "demo"


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_api_key"),
        (b"Basic abc", "invalid_api_key"),
        (b"Bearer ", "invalid_api_key"),
        (b"Bearer vg-wrong", "invalid_api_key"),
        (f"Bearer {DEMO_KEY}x".encode(), "invalid_api_key"),
    ],
)
def test_bad_keys_are_401(header: bytes | None, code: str) -> None:
    with pytest.raises(AuthenticationError) as caught:
        KeyRing.load(KEYS_FILE).authenticate(header)
    assert caught.value.status == 401
    assert caught.value.code == code


def test_disabled_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n  - {{id: a, name: a, sha256: {hash_key('on')}}}\n"
        f"  - {{id: b, name: b, sha256: {hash_key('off')}, disabled: true}}\n"
    )
    keys = KeyRing.load(path)
    assert keys.authenticate(b"Bearer on").name == "a"
    with pytest.raises(AuthenticationError):
        keys.authenticate(b"Bearer off")


def test_keys_file_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - {id: a, name: a, sha256: not-a-hash}\n")
    with pytest.raises(ConfigError) as caught:
        KeyRing.load(path)
    assert caught.value.field == "keys[0].sha256"
    path.write_text(
        f"keys:\n  - {{id: a, name: a, sha256: {hash_key('x')}}}\n"
        f"  - {{id: a, name: b, sha256: {hash_key('y')}}}\n"
    )
    with pytest.raises(ConfigError, match="used twice"):
        KeyRing.load(path)
