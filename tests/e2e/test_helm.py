"""deploy/helm/vgate rendered by Helm itself (helm-python-sdk's embedded Helm v4, through
deploy/helm/helmtool.py) and read as a cluster would: the gateway's probes, its shutdown
timing against the config it loads, the pods' security, the GPU workers, Redis and the keys
file wired where the config looks, and broken values refused with a message naming them."""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import load_config

REPO = Path(__file__).resolve().parent.parent.parent
CHART = REPO / "deploy" / "helm" / "vgate"
HELMTOOL = REPO / "deploy" / "helm" / "helmtool.py"
CHECK = REPO / "deploy" / "helm" / "check_rendered.py"
GPU = CHART / "values-gpu.yaml"
MONITORING = CHART / "ci" / "monitoring-values.yaml"
BIN = Path(sys.executable).parent

Docs = list[dict[str, Any]]


def _need(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{package} is not installed: pip install {package} (the test extra)")


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    _need("helm_python", "helm-python-sdk")
    _need("kubernetes_validate", "kubernetes-validate")


def _module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(*values: Path | str, tmp: Path | None = None) -> Docs:
    """`helm template` of the chart with these values files (or YAML texts, written to tmp)."""
    files = []
    for index, item in enumerate(values):
        if isinstance(item, str):
            assert tmp is not None
            path = tmp / f"values-{index}.yaml"
            path.write_text(item)
            item = path
        files += ["-f", str(item)]
    done = subprocess.run(
        [sys.executable, str(HELMTOOL), "template", str(CHART), *files],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def render_error(values: str, tmp: Path) -> str:
    path = tmp / "broken.yaml"
    path.write_text(values)
    done = subprocess.run(
        [sys.executable, str(HELMTOOL), "template", str(CHART), "-f", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 1, f"rendered broken values:\n{values}"
    return done.stderr


def one(docs: Docs, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def component(docs: Docs, kind: str, name: str) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d["kind"] == kind and d["metadata"]["labels"]["app.kubernetes.io/component"] == name
    ]


def gateway(docs: Docs) -> tuple[dict[str, Any], dict[str, Any]]:
    (deployment,) = component(docs, "Deployment", "gateway")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env") or []}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def laid_out(docs: Docs, root: Path) -> Path:
    """The gateway's mounts written under root as the pod sees them; the config's path."""
    check = _module(CHECK)
    deployment, container = gateway(docs)
    check.lay_out_volumes(docs, deployment, container, root, {})
    config: str = check.config_argument(container["args"])
    return root / config.lstrip("/")


def service_for(docs: Docs, url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rendered Service a backend URL names, and the Deployment behind it."""
    parts = urlsplit(url)
    service = one(docs, "Service", parts.hostname)
    assert parts.port in {p["port"] for p in service["spec"]["ports"]}, url
    behind = [
        d
        for d in docs
        if d["kind"] == "Deployment" and selects(service["spec"]["selector"], pod_labels(d))
    ]
    assert len(behind) == 1, (
        f"{url}: {len(behind)} Deployments behind {service['metadata']['name']}"
    )
    return service, behind[0]


@pytest.fixture(scope="module")
def default_docs() -> Docs:
    return render()


@pytest.fixture(scope="module")
def gpu_docs() -> Docs:
    return render(GPU)


def test_gateway_probes_ask_ready_and_health_on_the_served_port(
    default_docs: Docs, tmp_path: Path
) -> None:
    _, container = gateway(default_docs)
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    (port,) = container["ports"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"]
    config = load_config(laid_out(default_docs, tmp_path))
    assert config.server.port == port["containerPort"]
    assert config.server.host == "0.0.0.0"  # reachable from the kubelet and the Service
    service = one(default_docs, "Service", "vgate")
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert selects(service["spec"]["selector"], pod_labels(gateway(default_docs)[0]))


@pytest.mark.parametrize(
    ("pre_stop", "drain", "graceful", "margin"), [(2, 5, 10, 5), (3, 7.5, 20, 4.2), (0, 0, 1, 0)]
)
def test_grace_period_covers_the_drain_the_gateway_loads(
    pre_stop: int, drain: float, graceful: float, margin: float, tmp_path: Path
) -> None:
    docs = render(
        f"gateway:\n  shutdown: {{preStopSleepSeconds: {pre_stop}, drainDelaySeconds: {drain},"
        f" gracefulShutdownSeconds: {graceful}, marginSeconds: {margin}}}\n",
        tmp=tmp_path,
    )
    deployment, container = gateway(docs)
    spec = deployment["spec"]["template"]["spec"]
    # What the gateway will really do on SIGTERM: the config it loads, not the values.
    server = load_config(laid_out(docs, tmp_path)).server
    assert (server.drain_delay_s, server.graceful_shutdown_s) == (drain, graceful)
    hook = container.get("lifecycle", {}).get("preStop")
    slept = hook["sleep"]["seconds"] if hook else 0
    assert slept == pre_stop
    grace = spec["terminationGracePeriodSeconds"]
    assert isinstance(grace, int)
    assert grace == math.ceil(pre_stop + drain + graceful + margin)
    # SIGKILL comes after the preStop, the drain delay and the whole graceful shutdown.
    assert grace >= slept + server.drain_delay_s + server.graceful_shutdown_s


def test_default_shutdown_fits_kubernetes_default_grace(default_docs: Docs) -> None:
    deployment, container = gateway(default_docs)
    assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": 2}}
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 22


def _dockerfile_user(stage: str) -> int:
    text = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    body = re.split(r"(?m)^FROM ", text)
    (section,) = [s for s in body if re.match(rf"\S+ AS {stage}\b", s)]
    users = re.findall(r"(?m)^USER (\d+):\d+", section)
    if not users:  # a stage FROM another inherits its USER
        parent = re.match(r"(\S+) AS", section)
        assert parent is not None
        return _dockerfile_user(parent.group(1))
    return int(users[-1])


@pytest.mark.parametrize("values", ["default", "gpu"])
def test_every_pod_runs_non_root_read_only_without_capabilities(
    values: str, default_docs: Docs, gpu_docs: Docs
) -> None:
    docs = default_docs if values == "default" else gpu_docs
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == 4  # the gateway, two workers, Redis
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"] and container["resources"]["limits"]
    deployment, container = gateway(docs)
    assert deployment["spec"]["template"]["spec"]["securityContext"][
        "runAsUser"
    ] == _dockerfile_user("gateway")
    # Read-only root: the only writable place is an emptyDir at /tmp.
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    writable = [m for m in container["volumeMounts"] if not m.get("readOnly")]
    assert [(m["mountPath"], "emptyDir" in volumes[m["name"]]) for m in writable] == [
        ("/tmp", True)
    ]


def test_gpu_values_run_vllm_workers_with_a_gpu_each_behind_the_route(
    gpu_docs: Docs, tmp_path: Path
) -> None:
    config = load_config(laid_out(gpu_docs, tmp_path))
    (route,) = config.models
    assert route.name == "chat"
    assert len(route.backends) == 2
    claims = {d["metadata"]["name"] for d in gpu_docs if d["kind"] == "PersistentVolumeClaim"}
    for backend in route.backends:
        _, worker = service_for(gpu_docs, backend.url)
        pod = worker["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"].startswith("vllm/vllm-openai:")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        args = container["args"]
        # The name the gateway asks the worker for is the one vLLM serves.
        assert args[args.index("--served-model-name") + 1] == "chat"
        assert args[args.index("--port") + 1] == str(urlsplit(backend.url).port)
        assert container["ports"][0]["containerPort"] == urlsplit(backend.url).port
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        models = volumes[mounts["/models"]]
        assert models["persistentVolumeClaim"]["claimName"] in claims
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert container["startupProbe"]["httpGet"]["path"] == "/health"
    # The CPU demo's workers have no GPU and are the sims.
    for worker in component(render(), "Deployment", "worker-w1"):
        (container,) = worker["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "vgate-sim:0.1.0"
        assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_model_volume_can_be_a_host_folder(tmp_path: Path) -> None:
    docs = render(
        GPU,
        "workers:\n  vllm:\n    modelVolume:\n      type: hostPath\n"
        "      hostPath: {path: /srv/models}\n",
        tmp=tmp_path,
    )
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    for worker in component(docs, "Deployment", "worker-vllm-1"):
        volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
        assert volumes["models"]["hostPath"]["path"] == "/srv/models"


def test_sim_backends_name_the_workers_services(default_docs: Docs, tmp_path: Path) -> None:
    config = load_config(laid_out(default_docs, tmp_path))
    assert {route.name for route in config.models} == {"tiny-llama", "tiny-embed"}
    for route in config.models:
        for backend in route.backends:
            _, worker = service_for(default_docs, backend.url)
            (container,) = worker["spec"]["template"]["spec"]["containers"]
            assert route.name in container["args"]  # the sim serves the route's model
            assert container["ports"][0]["containerPort"] == urlsplit(backend.url).port


def test_redis_url_reaches_the_bundled_redis(default_docs: Docs, tmp_path: Path) -> None:
    _, container = gateway(default_docs)
    url = env_of(container)["VGATE_REDIS__URL"]["value"]
    assert url.startswith("redis://")
    _, redis = service_for(default_docs, url)
    (redis_container,) = redis["spec"]["template"]["spec"]["containers"]
    assert redis_container["image"].startswith("redis:")
    assert redis_container["ports"][0]["containerPort"] == urlsplit(url).port


def test_redis_external_url_secret_or_none(tmp_path: Path) -> None:
    docs = render(
        "redis:\n  mode: external\n  external: {url: 'rediss://r.example:6380/2'}\n", tmp=tmp_path
    )
    _, container = gateway(docs)
    assert env_of(container)["VGATE_REDIS__URL"]["value"] == "rediss://r.example:6380/2"
    assert not component(docs, "Deployment", "redis")

    docs = render(CHART / "ci" / "external-redis-values.yaml")
    _, container = gateway(docs)
    assert env_of(container)["VGATE_REDIS__URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "vgate-redis",
        "key": "redis-url",
    }

    docs = render("redis:\n  mode: none\n", tmp=tmp_path)
    _, container = gateway(docs)
    assert "VGATE_REDIS__URL" not in env_of(container)
    assert not component(docs, "Deployment", "redis")


def test_keys_secret_is_mounted_where_the_config_reads_the_keys_file(
    default_docs: Docs, tmp_path: Path
) -> None:
    deployment, container = gateway(default_docs)
    config_path = laid_out(default_docs, tmp_path)
    config = load_config(config_path)
    # The keys file the loaded config points at, as a path inside the pod.
    in_pod = "/" + str(config.keys.file.resolve().relative_to(tmp_path.resolve()))
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if "secret" in volumes[m["name"]]]
    secret_volume = volumes[mount["name"]]["secret"]
    (item,) = secret_volume["items"]
    assert in_pod == f"{mount['mountPath']}/{item['path']}"
    secret = one(default_docs, "Secret", secret_volume["secretName"])
    assert item["key"] in secret["data"]
    # What the Secret holds is the keys file the gateway loads: the demo key's hash.
    assert (
        "9a8904f919ef129b3b4e2c83799dac9edd235bdad01850bc636fd4403c1a231c"
        in config.keys.file.read_text()
    )

    docs = render(CHART / "ci" / "external-redis-values.yaml")
    assert not [d for d in docs if d["kind"] == "Secret"]
    deployment, _ = gateway(docs)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == "vgate-keys"


def test_autoscaler_and_disruption_budget_hold_the_gateway(
    default_docs: Docs, tmp_path: Path
) -> None:
    deployment, _ = gateway(default_docs)
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    hpa = one(default_docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = one(default_docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(deployment))
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # a drain can proceed
    workers = [d for d in default_docs if d["kind"] == "Deployment" and d is not deployment]
    assert not any(selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(w)) for w in workers)

    docs = render("gateway:\n  autoscaling: {enabled: false}\n  replicas: 3\n", tmp=tmp_path)
    assert gateway(docs)[0]["spec"]["replicas"] == 3
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]


@pytest.mark.parametrize(
    ("values", "rules"), [(None, "vgate-slos.yaml"), (GPU, "vgate-slos-gpu.yaml")]
)
def test_monitoring_objects_scrape_the_gateway_and_carry_its_slo_rules(
    values: Path | None, rules: str, tmp_path: Path
) -> None:
    docs = render(*([values] if values else []), MONITORING)
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service", "vgate")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    rule = one(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((CHART / "files" / rules).read_text())["groups"]
    # The rules are about the routes this values set deploys.
    routes = {route.name for route in load_config(laid_out(docs, tmp_path)).models}
    named = set(re.findall(r'model=~?"([^"]+)"', yaml.safe_dump(rule["spec"]["groups"])))
    assert named and named <= routes, (named, routes)
    # Off by default: a cluster without the Prometheus Operator installs the chart.
    plain = render(*([values] if values else []))
    assert not [d for d in plain if d["kind"] in {"ServiceMonitor", "PrometheusRule"}]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            "gateway:\n  config:\n    server: {drain_delay_s: 30}\n",
            "gateway.config.server.drain_delay_s: 30, but the chart sets it to 5 from "
            "gateway.shutdown.drainDelaySeconds",
        ),
        (
            "gateway:\n  config:\n    keys: {file: /elsewhere/keys.yaml}\n",
            "gateway.config.keys.file: /elsewhere/keys.yaml, but the chart sets it",
        ),
        (
            "gateway:\n  config:\n    redis: {url: 'redis://r:6379/0'}\n",
            "the Redis connection comes from the values' redis:",
        ),
        ("gateway:\n  shutdown: {drainDelaySeconds: -1}\n", "/gateway/shutdown/drainDelaySeconds"),
        ("gateway:\n  shutdown: {drainDelay: 5}\n", "drainDelay"),
        ("redis:\n  mode: external\n", "set redis.external.url or redis.external.existingSecret"),
        ("redis:\n  mode: clustered\n", "/redis/mode"),
        ("workers:\n  mode: tpu\n", "/workers/mode"),
        ("workers:\n  instances: [{name: W_1}]\n", "/workers/instances/0/name"),
        ("keys:\n  file: ''\n", "give keys.file"),
        (
            "metrics:\n  prometheusRule: {enabled: true, file: files/nope.yaml}\n",
            '"files/nope.yaml" is not a file of the chart',
        ),
    ],
)
def test_broken_values_fail_rendering_naming_the_value(
    values: str, message: str, tmp_path: Path
) -> None:
    assert message in render_error(values, tmp_path)


def test_an_invalid_manifest_fails_strict_validation(tmp_path: Path) -> None:
    """Values that Helm renders but Kubernetes would refuse: kubernetes-validate --strict
    says which field, as deploy/helm-lint.sh runs it."""
    rendered = tmp_path / "rendered.yaml"
    docs = render("gateway:\n  extraEnv: [{name: VGATE_X, valu: '1'}]\n", tmp=tmp_path)
    rendered.write_text(yaml.safe_dump_all(docs))
    subprocess.run(
        [sys.executable, str(CHECK), "split", str(rendered), str(tmp_path / "out")], check=True
    )
    done = subprocess.run(
        [
            str(BIN / "kubernetes-validate"),
            "--strict",
            "--quiet",
            str(tmp_path / "out" / "core.yaml"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode != 0
    assert "deployment/vgate" in done.stdout and "'valu'" in done.stdout, done.stdout


@pytest.mark.parametrize("values", [None, GPU])
def test_rendered_manifests_are_valid_and_the_config_checks(
    values: Path | None, tmp_path: Path
) -> None:
    docs = render(*([values] if values else []), MONITORING)
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(CHECK), "split", str(rendered), str(out)], check=True)
    done = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(out / "core.yaml")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert (done.returncode, done.stdout) == (0, "")
    done = subprocess.run(
        [sys.executable, str(CHECK), "check-config", str(rendered), str(BIN / "vgate")],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert ": ok (" in done.stdout


def test_helm_lint_strict_passes_and_fails_on_a_warning(tmp_path: Path) -> None:
    for values in ([], ["-f", str(GPU)]):
        done = subprocess.run(
            [sys.executable, str(HELMTOOL), "lint", str(CHART), "--strict", *values],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    # A chart whose only fault is a warning (a version that is not SemVer 2): plain lint
    # passes it, --strict (what deploy/helm-lint.sh runs) fails it, saying why.
    broken = tmp_path / "vgate"
    shutil.copytree(CHART, broken)
    chart_yaml = broken / "Chart.yaml"
    chart_yaml.write_text(chart_yaml.read_text().replace("version: 0.1.0", 'version: "0.1"'))
    outcomes = []
    for strict in ([], ["--strict"]):
        done = subprocess.run(
            [sys.executable, str(HELMTOOL), "lint", str(broken), *strict],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert "[WARNING] Chart.yaml: version '0.1' is not a valid SemVerV2" in done.stdout
        outcomes.append(done.returncode)
    assert outcomes == [0, 1]
