"""The keys file's new fields, reloading it, and writing it (`vgate keys create`)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
import yaml

from gateway.edge.auth import NO_LIMITS, KeyLimits, KeyRing, hash_key, new_secret, read_keys_file
from gateway.edge.keyfile import KeyFileWatcher, add_key
from gateway.edge.record import RequestRecord
from gateway.edge.usage import KeyUsage
from gateway.errors import AuthenticationError, ConfigError
from policies.guardrails import KeyGuardrails

MODELS = {"tiny-llama": "tiny-llama", "default": "tiny-llama", "tiny-embed": "tiny-embed"}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def entry(key_id: str, secret: str, extra: str = "") -> str:
    return f"  - {{id: {key_id}, name: {key_id}, sha256: {hash_key(secret)}{extra}}}\n"


def test_new_fields_reach_the_caller(tmp_path: Path) -> None:
    path = write(
        tmp_path / "keys.yaml",
        "keys:\n"
        + entry(
            "a",
            "sa",
            ", models: [default, tiny-embed], limits: {rpm: 5, tokens_per_day: 100}, "
            "guardrails: {max_tokens: 7}",
        )
        + entry("b", "sb", ", models: tiny-embed")
        + entry("c", "sc"),
    )
    keys = KeyRing.load(path, models=MODELS, backends=set())
    a = keys.authenticate(b"Bearer sa")
    assert a.models == frozenset({"tiny-llama", "tiny-embed"})  # aliases resolved to routes
    assert a.limits == KeyLimits(rpm=5, tokens_per_day=100)
    assert a.guardrails == KeyGuardrails(max_tokens=7)
    assert keys.authenticate(b"Bearer sb").models == frozenset({"tiny-embed"})
    c = keys.authenticate(b"Bearer sc")
    assert (c.models, c.limits, c.guardrails) == (None, NO_LIMITS, None)
    # Without the config to resolve them, models are kept as written.
    assert KeyRing.load(path).authenticate(b"Bearer sa").models == {"default", "tiny-embed"}


@pytest.mark.parametrize(
    ("extra", "field", "reason"),
    [
        (", models: [nope]", "keys[a].models", "no model or alias is named 'nope'"),
        (", limits: {rpm: 0}", "keys[0].limits.rpm", "greater than or equal to 1"),
        (", limits: {rps: 3}", "keys[0].limits.rps", "unknown field"),
        (", guardrails: {max_tokens: -1}", "keys[0].guardrails.max_tokens", "greater than"),
        (", pin: w9", "keys[a].pin", "no backend is named 'w9'"),
    ],
)
def test_bad_entries_name_the_field(tmp_path: Path, extra: str, field: str, reason: str) -> None:
    path = write(tmp_path / "keys.yaml", "keys:\n" + entry("a", "sa", extra))
    with pytest.raises(ConfigError) as caught:
        KeyRing.load(path, models=MODELS, backends={"w1"})
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_one_secret_for_two_keys_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.yaml", "keys:\n" + entry("a", "s") + entry("b", "s"))
    with pytest.raises(ConfigError, match="one secret, two keys"):
        KeyRing.load(path)


def test_disabled_keys_say_so_and_are_listed(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.yaml", "keys:\n" + entry("a", "sa", ", disabled: true"))
    keys = KeyRing.load(path)
    with pytest.raises(AuthenticationError, match="disabled") as caught:
        keys.authenticate(b"Bearer sa")
    assert caught.value.status == 401
    assert keys.describe()[0]["disabled"] is True
    assert keys.counts() == {"keys": 1, "enabled": 0, "disabled": 1}


def test_descriptions_never_hold_a_hash(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.yaml", "keys:\n" + entry("a", "sa", ", pin: w1"))
    keys = KeyRing.load(path)
    described = keys.describe()
    assert "sha256" not in repr(described) and hash_key("sa") not in repr(described)
    assert described[0]["pin"] == ["w1"]
    assert keys.describe_key("a") == described[0]
    assert keys.describe_key("zz") is None


def test_new_secrets_are_prefixed_and_random() -> None:
    secrets = {new_secret() for _ in range(100)}
    assert len(secrets) == 100
    for secret in secrets:
        assert secret.startswith("vg-") and len(secret) == 35
        assert all(c.isalnum() or c in "-_" for c in secret)


async def test_reload_swaps_keys_and_keeps_them_on_an_invalid_file(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.yaml", "keys:\n" + entry("a", "sa"))
    keys = KeyRing.load(path, models=MODELS)
    seen: list[frozenset[str]] = []
    keys.on_reload = lambda ring: seen.append(ring.ids())
    assert not keys.changed_on_disk()
    write(path, "keys:\n" + entry("a", "sa") + entry("b", "sb", ", models: [tiny-embed]"))
    assert keys.changed_on_disk()
    assert await keys.reload() == {"keys": 2, "enabled": 2, "disabled": 0}
    assert keys.authenticate(b"Bearer sb").models == {"tiny-embed"}
    assert seen == [frozenset({"a", "b"})]
    write(path, "keys:\n" + entry("c", "sc", ", models: [gone]"))
    with pytest.raises(ConfigError, match="gone"):
        await keys.reload()
    assert keys.authenticate(b"Bearer sb").name == "b"  # the old keys, all of them
    with pytest.raises(AuthenticationError):
        keys.authenticate(b"Bearer sc")
    assert not keys.changed_on_disk()  # the invalid file is not retried until it changes


async def test_the_watcher_reloads_on_change_and_logs_an_invalid_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "keys.yaml", "keys:\n" + entry("a", "sa"))
    keys = KeyRing.load(path)
    watcher = KeyFileWatcher(keys, interval_s=0.01)
    await watcher.start()
    try:
        add_key(path, {"id": "b", "name": "b", "sha256": hash_key("sb")})
        for _ in range(200):
            await asyncio.sleep(0.01)
            if "b" in keys.ids():
                break
        assert keys.authenticate(b"Bearer sb").name == "b"
        write(path, "keys: [oops")
        for _ in range(200):
            await asyncio.sleep(0.01)
            if "invalid" in caplog.text:
                break
        assert "the 2 keys loaded before stay in force" in caplog.text
        assert keys.authenticate(b"Bearer sb").name == "b"
        await asyncio.sleep(0.05)
        assert caplog.text.count("is invalid") == 1  # once per change, not every poll
    finally:
        await watcher.aclose()


def test_usage_counts_per_key_and_day() -> None:
    now = [86_400.0 * 20_000 + 5]
    keys = KeyRing({}, entries=())
    usage = KeyUsage(keys, clock=lambda: now[0])
    record = RequestRecord("r", 0.0, "POST", "/v1/chat/completions")
    record.prompt_tokens, record.completion_tokens = 3, 4
    usage.observe("a", record)
    usage.observe("a", record)
    usage.observe("b", record)
    got = asyncio.run(usage.usage("a"))
    assert (got["requests_today"], got["tokens_today"]) == (2, 14)
    assert got["day"] == "2024-10-04"
    usage.retain({"a"})
    assert asyncio.run(usage.usage("b"))["requests_today"] == 0
    now[0] += 86_400
    assert asyncio.run(usage.usage("a"))["requests_today"] == 0


# -- the writer -------------------------------------------------------------------------------


def test_add_key_keeps_comments_and_entries(tmp_path: Path) -> None:
    original = (
        "# production keys: ask #platform before editing\n"
        "keys:\n"
        "  # the demo\n" + entry("a", "sa", ", limits: {rpm: 5}") + "  - id: b   # inline\n"
        "    name: b\n"
        f"    sha256: {hash_key('sb')}\n"
        "# trailing comment\n"
    )
    path = write(tmp_path / "keys.yaml", original)
    new = {"id": "c", "name": "team: c", "sha256": hash_key("sc"), "models": ["default"]}
    assert add_key(path, new) is True
    text = path.read_text()
    assert text.startswith(original)  # every byte that was there, still there
    assert [e.id for e in read_keys_file(path)] == ["a", "b", "c"]
    assert read_keys_file(path)[2].name == "team: c"


@pytest.mark.parametrize(
    "original",
    [
        "",
        "# empty for now\n",
        "keys: []  # none yet\n",
        "keys:\n",
        "keys: [{id: a, name: a, sha256: " + hash_key("sa") + "}]",  # flow style: rewritten
        "keys:\n- id: a\n  name: a\n  sha256: " + hash_key("sa"),  # no indent, no final newline
    ],
)
def test_add_key_to_any_layout_never_loses_an_entry(tmp_path: Path, original: str) -> None:
    path = write(tmp_path / "keys.yaml", original)
    before = [e.id for e in read_keys_file(path)]
    add_key(path, {"id": "new", "name": "new", "sha256": hash_key("new")})
    assert [e.id for e in read_keys_file(path)] == [*before, "new"]
    if "#" in original:
        assert "#" in path.read_text()


def test_add_key_creates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    add_key(path, {"id": "a", "name": "a", "sha256": hash_key("a")})
    assert yaml.safe_load(path.read_text()) == {
        "keys": [{"id": "a", "name": "a", "sha256": hash_key("a")}]
    }


def test_add_key_refuses_what_would_spoil_the_file(tmp_path: Path) -> None:
    original = "keys:\n" + entry("a", "sa")
    path = write(tmp_path / "keys.yaml", original)
    with pytest.raises(ConfigError, match="used twice"):
        add_key(path, {"id": "a", "name": "x", "sha256": hash_key("other")})
    bad = write(tmp_path / "bad.yaml", "keys: [oops")
    with pytest.raises(ConfigError, match="not valid YAML"):
        add_key(bad, {"id": "b", "name": "b", "sha256": hash_key("sb")})
    assert path.read_text() == original
    assert bad.read_text() == "keys: [oops"


def test_add_key_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = "keys:\n" + entry("a", "sa")
    path = write(tmp_path / "keys.yaml", original)
    os.chmod(path, 0o640)
    inode = path.stat().st_ino

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        add_key(path, {"id": "b", "name": "b", "sha256": hash_key("sb")})
    assert path.read_text() == original  # untouched...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.yaml"]  # ...and no debris
    monkeypatch.undo()
    add_key(path, {"id": "b", "name": "b", "sha256": hash_key("sb")})
    assert path.stat().st_ino != inode  # a new file renamed over the old one...
    assert path.stat().st_mode & 0o777 == 0o640  # ...with the old one's permissions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.yaml"]


def test_add_key_through_a_symlink_keeps_the_link(tmp_path: Path) -> None:
    real = write(tmp_path / "real.yaml", "keys:\n" + entry("a", "sa"))
    link = tmp_path / "keys.yaml"
    link.symlink_to(real)
    add_key(link, {"id": "b", "name": "b", "sha256": hash_key("sb")})
    assert link.is_symlink()
    assert [e.id for e in read_keys_file(real)] == ["a", "b"]


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.yaml", "keys:\n")
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(5):
                key_id = f"k{n}-{i}"
                add_key(path, {"id": key_id, "name": key_id, "sha256": hash_key(key_id)})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(read_keys_file(path)) == 30


def test_the_admin_key_comes_from_the_config_or_a_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway.config import AdminConfig
    from gateway.edge.admin import admin_key_hash

    assert admin_key_hash(AdminConfig(), "gw.yaml") is None
    assert admin_key_hash(AdminConfig(key_sha256=hash_key("a")), "gw.yaml") == hash_key("a")
    config = AdminConfig(key_sha256_env="VGATE_TEST_ADMIN")
    monkeypatch.delenv("VGATE_TEST_ADMIN", raising=False)
    with pytest.raises(ConfigError) as caught:
        admin_key_hash(config, "gw.yaml")
    assert str(caught.value) == (
        "gw.yaml: admin.key_sha256_env: environment variable VGATE_TEST_ADMIN is not set"
    )
    monkeypatch.setenv("VGATE_TEST_ADMIN", "the-secret-itself")
    with pytest.raises(ConfigError, match="not a SHA-256 hex digest"):
        admin_key_hash(config, "gw.yaml")
    monkeypatch.setenv("VGATE_TEST_ADMIN", hash_key("b").upper())
    assert admin_key_hash(config, "gw.yaml") == hash_key("b")
