"""`vgate slo dashboards`: the committed dashboards are the generator's, every query is PromQL
that the real promtool parses and that reads only what the gateway exports (or the SLO rules
record), the latency panels link exemplars to Jaeger through the provisioned data sources."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import dashboards
from gateway.cli.main import main
from gateway.cli.slo import rule_groups
from gateway.config import CacheConfig, default_config_path, load_config
from gateway.edge.metrics import GatewayMetrics
from gateway.edge.record import RequestRecord
from gateway.router.outcome import AttemptRecord
from policies.cache import memory_cache
from policies.load import LoadReport, UpstreamLoad
from tests.prometheus import installed

REPO = Path(__file__).resolve().parent.parent.parent
GRAFANA = REPO / "deploy" / "grafana"
# The config the committed dashboards are generated from: the embedded default's routes with
# an slos: section (the embedded default has none, and so no SLO dashboard).
SOURCE = REPO / "config" / "examples" / "slos.yaml"


@pytest.fixture(scope="session")
def promtool() -> str:
    return installed("promtool")


def generated() -> dict[str, dict[str, Any]]:
    return dashboards.dashboards(load_config(SOURCE, environ={}))


def all_queries() -> list[tuple[str, str]]:
    return [
        (f"{name}: {where}", expr)
        for name, board in generated().items()
        for where, expr in dashboards.queries(board)
    ]


def test_the_committed_dashboards_are_what_the_generator_writes(tmp_path: Path) -> None:
    assert main(["slo", "dashboards", "--config", str(SOURCE), "--out", str(tmp_path)]) == 0
    written = sorted(path.name for path in tmp_path.iterdir())
    committed = sorted(path.name for path in (GRAFANA / "dashboards").iterdir())
    assert written == committed == ["vgate-gateway.json", "vgate-slos.json"]
    for name in written:
        assert (tmp_path / name).read_text() == (GRAFANA / "dashboards" / name).read_text(), (
            f"deploy/grafana/dashboards/{name} is stale: run `vgate slo dashboards --config "
            "config/examples/slos.yaml --out deploy/grafana/dashboards`"
        )


def test_a_config_without_slos_gets_the_gateway_dashboard_alone(tmp_path: Path) -> None:
    assert main(["slo", "dashboards", "--out", str(tmp_path)]) == 0
    assert [path.name for path in tmp_path.iterdir()] == ["vgate-gateway.json"]
    default = dashboards.dashboards(load_config(default_config_path(), environ={}))
    assert default["vgate-gateway.json"] == generated()["vgate-gateway.json"]


def test_each_objective_has_its_sli_budget_burn_rates_and_alerts() -> None:
    board = generated()["vgate-slos.json"]
    rows = [panel["title"] for panel in board["panels"] if panel["type"] == "row"]
    assert rows == [
        "availability: availability 99.5% over 28 days",
        "chat_ttft: 99% within 2.5 s (time to first token) over 28 days",
        "embed_latency: 99% within 1 s (request duration) over 7 days",
    ]
    titles = [panel["title"] for panel in board["panels"] if panel["type"] != "row"]
    assert titles[:4] == [
        "SLI over 28 days",
        "Error budget left",
        "Burn rate (1: the budget lasts the window exactly)",
        "Alerts pending or firing",
    ]
    exprs = [expr for _, expr in dashboards.queries(board)]
    assert any('vgate:slo_errors:ratio_rate1h{slo="chat_ttft"}' in expr for expr in exprs)
    assert any('ALERTS{slo="embed_latency"}' in expr for expr in exprs)


def test_panels_are_well_formed_and_read_the_provisioned_data_sources() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/vgate.yaml").read_text())
    sources = {source["uid"]: source for source in provisioned["datasources"]}
    assert set(sources) == {dashboards.PROMETHEUS_UID, dashboards.JAEGER_UID}
    assert sources[dashboards.JAEGER_UID]["type"] == "jaeger"
    # Exemplars' trace_id (the label gateway/edge/metrics.py writes) opens Jaeger.
    assert sources[dashboards.PROMETHEUS_UID]["jsonData"]["exemplarTraceIdDestinations"] == [
        {"name": "trace_id", "datasourceUid": dashboards.JAEGER_UID}
    ]
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/vgate.yaml").read_text())
    assert provider["providers"][0]["type"] == "file"
    for name, board in generated().items():
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), name
        assert board["uid"] in (dashboards.GATEWAY_UID, dashboards.SLOS_UID)
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == dashboards.PROMETHEUS_UID
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
            refs = [target["refId"] for target in panel["targets"]]
            assert len(refs) == len(set(refs)) and all(refs), panel["title"]
            for target in panel["targets"]:
                latency = re.search(
                    r"histogram_quantile\(.*vgate_(request_latency|ttft)_seconds_bucket",
                    target["expr"],
                )
                # Every latency panel's quantiles link their exemplars to traces; others ask none.
                assert bool(target.get("exemplar")) == bool(latency), (name, panel["title"])


def test_every_query_is_promql_that_promtool_parses(tmp_path: Path, promtool: str) -> None:
    queries = all_queries()
    assert len(queries) > 40
    for where, expr in queries:
        assert not dashboards.unresolved(expr), where
    # promtool parses PromQL in rule files: each query as a recording rule.
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"dashboard:query:{index}", "expr": dashboards.concrete(expr)}
                    for index, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(queries)} rules found" in done.stdout


def exported_names() -> set[str]:
    """Every sample name the gateway's /metrics can show, once each kind of thing happened."""
    metrics = GatewayMetrics(["m"], ["b"], legacy_names=False)
    record = RequestRecord("r", 100.0, "POST", "/v1/chat/completions")
    record.endpoint, record.model, record.backend, record.status = "chat", "m", "b", 429
    record.ttft_s, record.completion_tokens, record.prompt_tokens = 0.1, 5, 3
    record.response_started, record.upstream_s = 100.2, 0.1
    record.caller, record.error = "k", "rate_limit_exceeded"
    record.tried = [AttemptRecord("m", "b", 100.0)]
    metrics.observe(record, 100.5)
    record.attempts, record.tried = 0, []
    metrics.observe(record, 100.5)
    metrics.retries.labels("m").inc()
    metrics.fallbacks.labels("m", "m").inc()
    metrics.chaos_injected("x", "error")
    cache = memory_cache(CacheConfig(enabled=True))  # the memory backend: with its size
    for result in ("hit", "miss", "coalesced"):
        cache.count(result, "m")
    cache.bypass("not_deterministic")
    metrics.watch_cache(cache)
    queue = UpstreamLoad()  # what the backend's vLLM last reported (load_scrape)
    queue.update(LoadReport(running=1, waiting=2, at=0.0), own_in_flight=0)
    metrics.watch_upstream_queues([("b", queue)])
    names = {
        line.split("{")[0].split(" ")[0]
        for line in metrics.render().decode().splitlines()
        if line and not line.startswith("#")
    }
    # Read at scrape time from components a unit test does not build: named as metrics.py's
    # collectors name them.
    names |= {
        "vgate_shed_total",
        "vgate_admission_in_flight",
        "vgate_admission_waiting",
        "vgate_connections_open",
        "vgate_backend_concurrency_limit",
    }
    return names


def test_queries_read_only_exported_names_and_recorded_rules() -> None:
    exported = exported_names()
    recorded = {
        rule["record"]
        for group in rule_groups(load_config(SOURCE, environ={}).slos)["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    source = (REPO / "gateway" / "edge" / "metrics.py").read_text()
    for name in ("vgate_shed", "vgate_admission_in_flight", "vgate_connections_open"):
        assert f'"{name}"' in source  # the collectors' names above are still metrics.py's
    for where, expr in all_queries():
        for name in re.findall(r"\b(vgate[_:][a-z_:0-9]+|ALERTS)\b", expr):
            assert name in exported or name in recorded or name == "ALERTS", (where, name)


def test_the_dashboards_need_no_legacy_name() -> None:
    text = json.dumps(generated())
    for old in ("vgate_request_duration_seconds", "vgate_time_to_first_token_seconds"):
        assert old not in text
    assert "vgate_tokens_total" not in text
