from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.config import default_config_path, load_config
from gateway.errors import ConfigError

MINIMAL = {
    "keys": {"file": "keys.yaml"},
    "models": [
        {"name": "m", "backends": [{"name": "b", "provider": "vllm", "url": "http://127.0.0.1:1"}]}
    ],
}


def write(tmp_path: Path, raw: object) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_embedded_default_loads() -> None:
    config = load_config(None, environ={})
    assert config.source == str(default_config_path())
    assert [route.name for route in config.models] == ["tiny-llama", "tiny-embed"]
    assert config.models[0].aliases == ("default",)
    assert config.keys.file.is_file()


def test_defaults_fill_in(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), environ={})
    assert config.server.port == 8000
    assert config.models[0].timeouts.first_token_s == 30
    assert config.keys.file == tmp_path / "keys.yaml"  # relative to the config file


def test_environment_overrides_are_typed(tmp_path: Path) -> None:
    env = {
        "VGATE_SERVER__PORT": "9100",
        "VGATE_SERVER__ACCESS_LOG": "false",
        "VGATE_MODELS__0__BACKENDS__0__URL": "http://10.0.0.1:8000/",
        "UNRELATED": "x",
    }
    config = load_config(write(tmp_path, MINIMAL), environ=env)
    assert config.server.port == 9100
    assert config.server.access_log is False
    assert config.models[0].backends[0].url == "http://10.0.0.1:8000"


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [
        (
            lambda r: r["models"][0]["backends"][0].update(weight=0),
            "models[0].backends[0].weight",
            "greater than or equal to 1",
        ),
        (
            lambda r: r["models"][0]["backends"][0].update(url="ftp://x"),
            "models[0].backends[0].url",
            "not an http",
        ),
        (lambda r: r["models"][0].update(colour="red"), "models[0].colour", "unknown field"),
        (lambda r: r.pop("keys"), "keys", "required field is missing"),
        (
            lambda r: r["models"][0]["backends"][0].update(provider="tgi"),
            "models[0].backends[0].provider",
            "'vllm' or 'openai'",
        ),
        (
            lambda r: r["models"][0].update(timeouts={"first_token_s": 500}),
            "models[0].timeouts",
            "first_token_s (500.0) exceeds total_s",
        ),
        (lambda r: r["models"].append(r["models"][0]), "models", "used twice"),
        (
            lambda r: r["models"][0]["backends"][0].update(provider="openai"),
            "models[0].backends[0]",
            "api_key_env",
        ),
    ],
)
def test_errors_name_file_field_and_reason(tmp_path: Path, mutate, field: str, reason: str) -> None:
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    mutate(raw)
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.source == str(path)
    assert caught.value.field == field
    assert reason in caught.value.reason
    assert str(path) in str(caught.value)


def test_bad_env_override_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL), environ={"VGATE_MODELS__5__NAME": "x"})
    assert caught.value.field == "VGATE_MODELS__5__NAME"


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, environ={})
