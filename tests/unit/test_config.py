from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.config import ModelRoute, Timeouts, default_config_path, load_config
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
    assert config.warnings == ()


def test_defaults_fill_in(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), environ={})
    assert config.server.port == 8000
    assert config.models[0].timeouts.first_token_s == 30
    assert config.keys.file == tmp_path / "keys.yaml"  # relative to the config file
    assert config.models[0].retries.max_retries == 1  # one retry after the first attempt
    assert config.warnings == ()


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
            lambda r: r["models"][0].update(retries={"attempts": 2, "max_retries": 1}),
            "models[0].retries",
            "give max_retries or attempts (deprecated), not both",
        ),
        (
            lambda r: r["models"][0].update(retries={"attempts": 0}),
            "models[0].retries",
            "attempts (deprecated: use max_retries) must be a whole number from 1 to 10",
        ),
        (
            lambda r: r["models"][0].update(retries={"max_retries": 10}),
            "models[0].retries.max_retries",
            "less than or equal to 9",
        ),
        (
            lambda r: r["models"][0]["backends"][0].update(provider="openai", api_key_env=""),
            "models[0].backends[0].api_key_env",
            "at least 1 character",
        ),
        (lambda r: r.update(warnings=["hush"]), "warnings", "unknown field"),
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


def with_route(**route: object) -> dict[str, object]:
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    raw["models"][0].update(route)
    return raw


def test_max_retries_counts_the_retries_alone(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, with_route(retries={"max_retries": 0})), environ={})
    assert config.models[0].retries.max_retries == 0
    assert config.warnings == ()


def test_attempts_still_reads_with_a_warning_naming_file_field_and_replacement(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, with_route(retries={"attempts": 2}))
    config = load_config(path, environ={})
    assert config.models[0].retries.max_retries == 1  # attempts counted the first one too
    assert config.warnings == (
        f"{path}: models[0].retries.attempts: deprecated, use max_retries: 1"
        " (retries after the first attempt)",
    )


def test_attempts_from_the_environment_warns_too(tmp_path: Path) -> None:
    env = {"VGATE_MODELS__0__RETRIES__ATTEMPTS": "3"}
    config = load_config(write(tmp_path, MINIMAL), environ=env)
    assert config.models[0].retries.max_retries == 2
    assert [w.split(": ", 2)[1] for w in config.warnings] == ["models[0].retries.attempts"]
    assert "use max_retries: 2" in config.warnings[0]


def test_an_openai_backend_may_name_no_key(tmp_path: Path) -> None:
    backend = {"name": "local", "provider": "openai", "url": "http://127.0.0.1:1"}
    config = load_config(write(tmp_path, with_route(backends=[backend])), environ={})
    assert config.models[0].backends[0].api_key_env is None
    assert config.warnings == ()


def route(name: str, **timeouts: float) -> ModelRoute:
    return ModelRoute(name=name, timeouts=Timeouts(**{"first_token_s": 1, "idle_s": 1, **timeouts}))


def test_the_fallback_reserve() -> None:
    fallback = route("big", first_token_s=8)
    assert route("m", total_s=30).fallback_reserve(None) == 0  # no fallback, nothing kept
    assert route("m", total_s=30).fallback_reserve(fallback) == 8  # its first token's time
    assert route("m", total_s=10).fallback_reserve(fallback) == 5  # at most half of total_s
    explicit = route("m", total_s=30, fallback_reserve_s=12)
    assert explicit.fallback_reserve(fallback) == 12
    assert explicit.fallback_reserve(None) == 0


def two_routes(first: dict[str, float], fallback: dict[str, float]) -> dict[str, object]:
    backend = {"name": "big", "provider": "vllm", "url": "http://127.0.0.1:2"}
    raw = with_route(fallbacks=["big"], timeouts=first)
    raw["models"].append({"name": "big", "timeouts": fallback, "backends": [backend]})
    return raw


def test_a_fallback_given_its_first_token_time_raises_no_warning(tmp_path: Path) -> None:
    raw = two_routes({"first_token_s": 10, "total_s": 60}, {"first_token_s": 20})
    assert load_config(write(tmp_path, raw), environ={}).warnings == ()


def test_a_reserve_short_of_the_fallbacks_first_token_is_a_warning(tmp_path: Path) -> None:
    # The route: three 10 s phases in a 30 s deadline, a fallback with the defaults.
    path = write(tmp_path, two_routes({"first_token_s": 10, "total_s": 30}, {}))
    (warning,) = load_config(path, environ={}).warnings
    assert warning.startswith(f"{path}: models[0].timeouts (route 'm'): ")
    assert "keeps 15 s of total_s (30 s; by default at most half) for its fallback 'big'" in (
        warning
    )
    assert "less than the fallback's first_token_s (30 s)" in warning
    assert "raise total_s to at least 60, or lower the fallback's first_token_s to 15" in warning


def test_an_explicit_reserve_short_of_the_fallbacks_first_token_is_a_warning(
    tmp_path: Path,
) -> None:
    raw = two_routes({"total_s": 60, "fallback_reserve_s": 5}, {"first_token_s": 20})
    (warning,) = load_config(write(tmp_path, raw), environ={}).warnings
    assert "keeps fallback_reserve_s: 5 of total_s (60 s) for its fallback 'big'" in warning
    assert "raise fallback_reserve_s to 20" in warning


def test_no_reserve_at_all_is_a_warning(tmp_path: Path) -> None:
    raw = two_routes({"total_s": 60, "fallback_reserve_s": 0}, {"first_token_s": 20})
    (warning,) = load_config(write(tmp_path, raw), environ={}).warnings
    assert "fallback_reserve_s is 0" in warning and "or set it to 20" in warning


def test_a_reserve_that_cuts_the_routes_own_first_token_short_is_a_warning(
    tmp_path: Path,
) -> None:
    raw = two_routes(
        {"first_token_s": 10, "total_s": 30, "fallback_reserve_s": 25}, {"first_token_s": 5}
    )
    (warning,) = load_config(write(tmp_path, raw), environ={}).warnings
    assert "own attempts must have their first token within 5 s" in warning
    assert "(total_s 30 less 25 kept for its fallback 'big')" in warning
    assert "lower first_token_s to 5 or raise total_s to 35" in warning


# -- chaos: ---------------------------------------------------------------------------------


def with_chaos(*experiments: dict[str, object], enabled: bool = True) -> dict[str, object]:
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    raw["chaos"] = {"enabled": enabled, "experiments": list(experiments)}
    return raw


def test_chaos_is_off_by_default(tmp_path: Path) -> None:
    chaos = load_config(write(tmp_path, MINIMAL), environ={}).chaos
    assert (chaos.enabled, chaos.experiments) == (False, ())


def test_a_chaos_experiment_loads_with_its_defaults(tmp_path: Path) -> None:
    raw = with_chaos(
        {"name": "slow-b", "fault": {"kind": "latency", "latency_ms": 200}, "backends": ["b"]},
        {"name": "busy", "fault": {"kind": "error", "status": 429, "retry_after_s": 2}},
    )
    config = load_config(write(tmp_path, raw), environ={"VGATE_CHAOS__EXPERIMENTS__1__RATE": "0.3"})
    slow, busy = config.chaos.experiments
    assert config.chaos.enabled
    assert (slow.name, slow.fault.kind, slow.fault.latency_ms, slow.backends) == (
        "slow-b",
        "latency",
        200,
        ("b",),
    )
    assert (slow.routes, slow.keys, slow.rate, slow.seed) == ((), (), 1.0, 0)
    assert (slow.start_after_s, slow.duration_s, slow.on_request) == (0, None, False)
    assert (busy.fault.status, busy.fault.retry_after_s, busy.rate) == (429, 2, 0.3)


def test_a_workers_backend_and_route_can_be_targeted(tmp_path: Path) -> None:
    raw = with_chaos(
        {"name": "x", "fault": {"kind": "refuse"}, "routes": ["tiny"], "backends": ["w"]}
    )
    raw["workers"] = [{"name": "w", "model": "tiny", "port": 9001}]
    (experiment,) = load_config(write(tmp_path, raw), environ={}).chaos.experiments
    assert experiment.backends == ("w",)


def fault(**fields: object) -> dict[str, object]:
    return {"name": "x", "fault": fields}


@pytest.mark.parametrize(
    ("experiment", "field", "reason"),
    [
        (fault(kind="error"), "chaos.experiments[0].fault", "status: an 'error' fault needs"),
        (
            fault(kind="error", status=200),
            "chaos.experiments[0].fault.status",
            "greater than or equal to 400",
        ),
        (fault(kind="latency"), "chaos.experiments[0].fault", "needs latency_ms or jitter_ms"),
        (fault(kind="slow_tokens"), "chaos.experiments[0].fault", "needs a delay above 0"),
        (
            fault(kind="latency", latency_ms=5, after_events=2),
            "chaos.experiments[0].fault",
            "after_events: a 'latency' fault does not use it (it uses jitter_ms, latency_ms)",
        ),
        (fault(kind="cut", status=500), "chaos.experiments[0].fault", "status: a 'cut' fault"),
        (
            fault(kind="cut", after_events=-1),
            "chaos.experiments[0].fault.after_events",
            "greater than or equal to 0",
        ),
        (fault(kind="flood"), "chaos.experiments[0].fault.kind", "'latency'"),
        (fault(kind="hang", latency_ms="inf"), "chaos.experiments[0].fault.latency_ms", "finite"),
        (
            {"name": "has space", "fault": {"kind": "hang"}},
            "chaos.experiments[0].name",
            "should match pattern",
        ),
        (
            {"name": "x", "fault": {"kind": "hang"}, "rate": 1.5},
            "chaos.experiments[0].rate",
            "less than or equal to 1",
        ),
        (
            {"name": "x", "fault": {"kind": "hang"}, "duration_s": 0},
            "chaos.experiments[0].duration_s",
            "greater than 0",
        ),
        (
            {"name": "x", "fault": {"kind": "hang"}, "routes": ["nope"]},
            "chaos.experiments[0].routes",
            "'nope' is not a model route",
        ),
        (
            {"name": "x", "fault": {"kind": "hang"}, "backends": ["nope"]},
            "chaos.experiments[0].backends",
            "'nope' is not a backend",
        ),
        (
            {"name": "x", "fault": {"kind": "hang"}, "colour": "red"},
            "chaos.experiments[0].colour",
            "unknown field",
        ),
    ],
)
def test_chaos_errors_name_the_experiment_and_field(
    tmp_path: Path, experiment: dict[str, object], field: str, reason: str
) -> None:
    path = write(tmp_path, with_chaos(experiment))
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_a_routes_alias_is_not_a_chaos_target(tmp_path: Path) -> None:
    raw = with_chaos({"name": "x", "fault": {"kind": "hang"}, "routes": ["short"]})
    raw["models"][0]["aliases"] = ["short"]
    with pytest.raises(ConfigError, match="'short' is an alias; name its route 'm'"):
        load_config(write(tmp_path, raw), environ={})


def test_a_backend_outside_the_experiments_routes_is_an_error(tmp_path: Path) -> None:
    raw = with_chaos({"name": "x", "fault": {"kind": "hang"}, "routes": ["m"], "backends": ["c"]})
    other = {"name": "c", "provider": "vllm", "url": "http://127.0.0.1:3"}
    raw["models"].append({"name": "n", "backends": [other]})
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, raw), environ={})
    assert caught.value.field == "chaos.experiments[0].backends"
    assert "'c' is a backend of route 'n'" in caught.value.reason


def test_chaos_experiment_names_are_unique_and_at_most_32(tmp_path: Path) -> None:
    twice = with_chaos(fault(kind="hang"), fault(kind="reset"))
    with pytest.raises(ConfigError, match="experiment name 'x' is used twice"):
        load_config(write(tmp_path, twice), environ={})
    many = with_chaos(*({"name": f"e{i}", "fault": {"kind": "hang"}} for i in range(33)))
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, many), environ={})
    assert caught.value.field == "chaos.experiments" and "at most 32" in caught.value.reason
