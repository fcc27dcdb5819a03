from __future__ import annotations

from pathlib import Path

import pytest

from gateway.edge.auth import KeyRing, hash_key
from gateway.edge.proxy import client_fault
from gateway.errors import (
    AuthenticationError,
    ConfigError,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    NoLiveBackend,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
)
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


def test_profiles_are_enabled_keys_by_id_or_by_a_name_only_one_has(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(
        "keys:\n"
        f"  - {{id: k1, name: solo, sha256: {hash_key('1')}}}\n"
        f"  - {{id: k2, name: twin, sha256: {hash_key('2')}}}\n"
        f"  - {{id: k3, name: twin, sha256: {hash_key('3')}}}\n"
        f"  - {{id: k4, name: gone, sha256: {hash_key('4')}, disabled: true}}\n"
        # A name that is another key's id names that key, never this one.
        f"  - {{id: k5, name: k1, sha256: {hash_key('5')}}}\n"
    )
    keys = KeyRing.load(path)
    assert keys.profile("k1") is keys.authenticate(b"Bearer 1")
    assert keys.profile("solo") is keys.authenticate(b"Bearer 1")
    assert keys.profile("k2") is keys.authenticate(b"Bearer 2")
    assert keys.profile("twin") is None
    assert keys.profile("k4") is None and keys.profile("gone") is None
    assert keys.profile("nobody") is None


def test_may_chaos_is_a_right_a_key_must_be_given(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(
        "keys:\n"
        f"  - {{id: drill, name: drill, sha256: {hash_key('d')}, may_chaos: true}}\n"
        f"  - {{id: plain, name: plain, sha256: {hash_key('p')}}}\n"
    )
    keys = KeyRing.load(path)
    assert keys.authenticate(b"Bearer d").may_chaos is True
    assert keys.authenticate(b"Bearer p").may_chaos is False  # off unless given
    assert keys.authenticate(b"Bearer d").may_pin is False  # one right does not imply another
    described = {key["id"]: key["may_chaos"] for key in keys.describe()}
    assert described == {"drill": True, "plain": False}
    path.write_text(f"keys:\n  - {{id: x, name: x, sha256: {hash_key('x')}, may_chaos: maybe}}\n")
    with pytest.raises(ConfigError) as caught:
        KeyRing.load(path)
    assert caught.value.field == "keys[0].may_chaos"


@pytest.mark.parametrize(
    ("error", "charged"),
    [
        (UpstreamRejected(400, {"error": {"message": "too long"}}, {}), True),
        (UpstreamRejected(422, {"error": {"message": "bad"}}, {}), True),
        (ModelNotFound("no such model"), True),
        (InvalidRequest("bad field"), True),
        (UpstreamRejected(429, {"error": {"message": "busy"}}, {}), False),
        (UpstreamRejected(408, {"error": {"message": "slow"}}, {}), False),
        (UpstreamError("reset"), False),
        (NoLiveBackend("none"), False),
        (UpstreamTimeout("late"), False),
        (GatewayError("bug"), False),
    ],
)
def test_only_a_clients_own_errors_are_charged(error: GatewayError, charged: bool) -> None:
    assert client_fault(error) is charged


def test_a_key_may_opt_out_of_the_response_cache(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(
        "keys:\n"
        f"  - {{id: private, name: private, sha256: {hash_key('q')}, cache: false}}\n"
        f"  - {{id: plain, name: plain, sha256: {hash_key('p')}}}\n"
    )
    keys = KeyRing.load(path)
    assert keys.authenticate(b"Bearer q").cache is False
    assert keys.authenticate(b"Bearer p").cache is True  # the cache's own settings decide
    assert {key["id"]: key["cache"] for key in keys.describe()} == {"private": False, "plain": True}
