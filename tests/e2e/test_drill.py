"""`vgate drill` against a real gateway in front of real simulated workers.

Short drills (a few seconds a phase): one that holds passes with its report written; the
same drill judged by an objective it cannot meet fails with exit status 1; rollbacks run
when the method fails and when the drill is interrupted (Ctrl-C); a wrong drill file is
refused before anything runs (exit status 2), naming the file, the field and the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.edge.auth import hash_key
from tests.servers import (
    DEMO_KEY,
    REPO,
    Gateway,
    Process,
    backend,
    gateway_config,
    poll_until,
    start_gateway,
    start_sim,
)

ADMIN = "vg-admin-0123456789abcdefghijklmnop"
ENV = {"VGATE_DRILL_KEY": DEMO_KEY, "VGATE_DRILL_ADMIN_KEY": ADMIN, "PYTHONUNBUFFERED": "1"}
SLOS = [
    {"name": "availability", "availability": 0.999},
    {"name": "latency", "latency": {"threshold_s": 1, "target": 0.99}},
]
# Answered in 20 ms or more: never within 5 ms, so this objective cannot hold.
TOO_STRICT = [{"name": "latency", "latency": {"threshold_s": 0.005, "target": 0.999}}]
FAST_LOAD = {"clients": 4, "mix": {"chat": 1, "stream": 1, "embed": 1}}


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("drill")


@pytest.fixture(scope="module")
def sims(logs: Path) -> Iterator[tuple[Process, Process]]:
    first, second = start_sim(logs, ttft_ms=20), start_sim(logs, ttft_ms=20)
    yield first, second
    first.stop()
    second.stop()


def config(sims: tuple[Process, Process], slos: list[dict[str, Any]]) -> dict[str, Any]:
    first, second = sims
    retries = {"max_retries": 2, "budget_ratio": 1.0, "backoff_initial_s": 0.001}
    models = [
        {
            "name": "tiny-llama",
            "aliases": ["default"],
            "retries": retries,
            "backends": [backend("b1", first.url, weight=3), backend("b2", second.url)],
        },
        {
            "name": "tiny-embed",
            "retries": retries,
            "backends": [backend("b1-embed", first.url), backend("b2-embed", second.url)],
        },
    ]
    raw = gateway_config(models, access_log=False)
    raw["admin"] = {"key_sha256": hash_key(ADMIN)}
    raw["chaos"] = {"enabled": True}
    raw["slos"] = slos
    return raw


@pytest.fixture(scope="module")
def gateway(logs: Path, sims: tuple[Process, Process]) -> Iterator[Gateway]:
    started = start_gateway(logs, config(sims, SLOS))
    yield started
    started.stop()


def served_config(gateway: Gateway, logs: Path) -> Path:
    return logs / f"gateway-{gateway.url.rsplit(':', 1)[1]}.yaml"  # as start_gateway wrote it


def action(label: str, func: str, module: str = "chaos.drill.actions", **arguments: Any) -> Any:
    provider = {"type": "python", "module": module, "func": func, "arguments": arguments}
    return {"type": "action", "name": label, "provider": provider}


def drill(
    folder: Path,
    method: list[Any],
    rollbacks: list[Any] = (),  # type: ignore[assignment]
    observe_s: float = 1.5,
    **extension: Any,
) -> Path:
    probe = {
        "type": "probe",
        "name": "slos-hold",
        "tolerance": True,
        "provider": {
            "type": "python",
            "module": "chaos.drill.probes",
            "func": "slos_hold",
            "arguments": {"observe_s": observe_s, "settle_s": 0.5},
        },
    }
    experiment = {
        "version": "1.0.0",
        "title": "a short drill",
        "description": "for the tests",
        "extensions": [{"name": "vgate", "load": FAST_LOAD, "warmup_s": 0.5, **extension}],
        "steady-state-hypothesis": {"title": "the SLOs hold", "probes": [probe]},
        "method": method,
        "rollbacks": list(rollbacks),
    }
    path = folder / f"drill-{len(list(folder.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


def vgate_drill(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "gateway.cli.main", "drill", *map(str, args)]


def run_drill(
    gateway: Gateway, config_file: Path, out: Path, *files: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        vgate_drill(*files, "--url", gateway.url, "--config", config_file, "--out", out),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **ENV},
        timeout=120,
    )


def experiments(gateway: Gateway) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    answer = httpx.get(gateway.url + "/admin/chaos", headers=headers, timeout=5)
    return list(answer.json()["data"])


def injected(gateway: Gateway, experiment: str) -> float:
    total = 0.0
    for line in httpx.get(gateway.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("vgate_chaos_injected_total{") and f'experiment="{experiment}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def faulty_backend(name: str, duration_s: float | None = 1.5) -> Any:
    """30% of b1's answers are 500s: the gateway's retries keep every client whole."""
    return action(
        f"start-{name}",
        "start_experiment",
        name=name,
        fault={"kind": "error", "status": 500},
        backends=["b1", "b1-embed"],
        rate=0.3,
        **({"duration_s": duration_s} if duration_s else {}),
    ) | {"pauses": {"after": 1.5}}


def test_a_drill_that_holds_passes_with_verdicts_per_phase_and_its_report(
    gateway: Gateway, logs: Path, tmp_path: Path
) -> None:
    file = drill(tmp_path, [faulty_backend("drill-ok")])
    result = run_drill(gateway, served_config(gateway, logs), tmp_path / "out", file)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / f"{file.stem}.json").read_text())
    assert report["passed"] is True
    assert report["status"] == "completed"
    assert [phase["name"] for phase in report["phases"]] == ["before", "during", "after"]
    judged = {(v["objective"], v["phase"]) for v in report["verdicts"]}
    for phase in ("before", "during", "after"):
        assert {("availability", phase), ("latency", phase), ("requests_lost", phase)} <= judged
    assert all(v["holds"] for v in report["verdicts"])
    assert injected(gateway, "drill-ok") > 0  # the fault was real, and the retries hid it
    assert (tmp_path / "out" / f"{file.stem}.md").is_file()
    assert (tmp_path / "out" / f"{file.stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert file.stem in result.stdout and "PASS" in result.stdout  # the verdict table


def test_a_drill_whose_slo_is_too_strict_fails_with_exit_status_1(
    gateway: Gateway, sims: tuple[Process, Process], logs: Path, tmp_path: Path
) -> None:
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(config(sims, TOO_STRICT)))
    file = drill(tmp_path, [faulty_backend("drill-strict")])
    result = run_drill(gateway, strict, tmp_path / "out", file)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / f"{file.stem}.json").read_text())
    assert report["passed"] is False
    latency = [v for v in report["verdicts"] if v["objective"] == "latency"]
    assert latency and not any(v["holds"] for v in latency)
    assert "FAIL" in result.stdout


def test_rollbacks_run_when_an_action_fails(gateway: Gateway, logs: Path, tmp_path: Path) -> None:
    file = drill(
        tmp_path,
        [
            faulty_backend("drill-failed", duration_s=None),  # lasts until stopped
            action("a-teapot", "expect_status", module="chaos.drill.probes", status=418),
        ],
        rollbacks=[action("stop-it", "stop_experiment", name="drill-failed")],
    )
    result = run_drill(gateway, served_config(gateway, logs), tmp_path / "out", file)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / f"{file.stem}.json").read_text())
    marks = {mark["label"]: mark for mark in report["marks"]}
    assert marks["a-teapot"]["ok"] is False
    assert marks["stop-it"]["kind"] == "rollback" and marks["stop-it"]["ok"] is True
    assert not [e for e in experiments(gateway) if e["name"] == "drill-failed"]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_drill_runs_its_rollbacks_and_reports_itself_interrupted(
    gateway: Gateway, logs: Path, tmp_path: Path, stop: signal.Signals
) -> None:
    start = faulty_backend("drill-interrupted", duration_s=None) | {"pauses": {"after": 120}}
    file = drill(
        tmp_path,
        [start],
        rollbacks=[action("stop-it", "stop_experiment", name="drill-interrupted")],
    )
    args = [*vgate_drill(file, "--url", gateway.url, "--config", served_config(gateway, logs))]
    process = subprocess.Popen(
        [*args, "--out", str(tmp_path / "out")],
        cwd=REPO,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        poll_until(lambda: [e for e in experiments(gateway) if e["name"] == "drill-interrupted"])
        process.send_signal(stop)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, output
    assert not [e for e in experiments(gateway) if e["name"] == "drill-interrupted"]
    report = json.loads((tmp_path / "out" / f"{file.stem}.json").read_text())
    assert report["status"] == "interrupted"
    assert report["passed"] is False


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_during_an_actions_call_skips_its_pause(
    gateway: Gateway, logs: Path, tmp_path: Path, stop: signal.Signals
) -> None:
    """Chaos Toolkit sleeps an activity's `pauses.after` in a `finally`, even when a signal
    cut the activity short: a Ctrl-C that landed during an action's call (here a 30 s
    sleep, as a slow HTTP call would be) waited out the whole 120 s pause. It goes on at
    once: rollbacks run, the report says interrupted."""
    started = faulty_backend("drill-cut-short", duration_s=None)
    slow = action("slow-call", "slow_call", module="tests.slow_action", seconds=30.0)
    slow |= {"pauses": {"after": 120}}
    file = drill(
        tmp_path,
        [started, slow],
        rollbacks=[action("stop-it", "stop_experiment", name="drill-cut-short")],
    )
    args = [*vgate_drill(file, "--url", gateway.url, "--config", served_config(gateway, logs))]
    process = subprocess.Popen(
        [*args, "--out", str(tmp_path / "out")],
        cwd=REPO,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        for line in process.stdout or ():
            lines.append(line)  # as it comes: the test waits for one of them

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        poll_until(lambda: any("Action: slow-call" in line for line in lines))
        process.send_signal(stop)
        process.wait(timeout=60)  # not the 30 s call, nor the 120 s pause after it
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(timeout=5)
    output = "".join(lines)
    assert process.returncode == 1, output
    assert "Pausing after activity for 120" not in output
    assert not [e for e in experiments(gateway) if e["name"] == "drill-cut-short"]
    report = json.loads((tmp_path / "out" / f"{file.stem}.json").read_text())
    assert report["status"] == "interrupted" and report["passed"] is False


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"waive": {"during": ["latency_p99"]}},
            "extensions[0].waive.during: 'latency_p99' is not an objective",
        ),
        ({"load": {"clients": 0}}, "extensions[0].load.clients: Input should be greater than"),
        ({"load": {"model": "gpt-9"}}, "extensions[0].load: 'gpt-9' is not a model"),
        (
            {"load": {"mix": {"chat": 0, "stream": 0, "embed": 0}}},
            "extensions[0].load.mix: every weight is 0",
        ),
        ({"steady-state-hypothesis": None}, "steady-state-hypothesis: give a probe of"),
        (
            {
                "method": [
                    {
                        "type": "action",
                        "name": "x",
                        "provider": {
                            "type": "python",
                            "module": "chaos.drill.actions",
                            "func": "no_such_action",
                        },
                    }
                ]
            },
            "not a valid Chaos Toolkit experiment",
        ),
        (  # a builtin, whose signature Chaos Toolkit cannot read: no traceback either
            {"method": [action("nap", "sleep", module="time", secs=1)]},
            "not a valid Chaos Toolkit experiment: ValueError",
        ),
    ],
)
def test_a_wrong_drill_file_is_refused_before_anything_runs(
    gateway: Gateway, logs: Path, tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    file = drill(tmp_path, [faulty_backend("never-started")])
    experiment = yaml.safe_load(file.read_text())
    for key, value in change.items():
        if key in ("waive", "load"):
            experiment["extensions"][0][key] = value
        elif value is None:
            del experiment[key]
        else:
            experiment[key] = value
    file.write_text(yaml.safe_dump(experiment))
    result = run_drill(gateway, served_config(gateway, logs), tmp_path / "out", file)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{file}: {expected}" in result.stderr
    assert not (tmp_path / "out").exists()
    assert injected(gateway, "never-started") == 0


@pytest.fixture
def doomed(logs: Path) -> Iterator[tuple[Process, Process, Gateway]]:
    """Two workers of this test's own behind a gateway of its own: the drill kills one."""
    first, second = start_sim(logs, ttft_ms=20), start_sim(logs, ttft_ms=20)
    started = start_gateway(logs, config((first, second), SLOS))
    yield first, second, started
    started.stop()
    first.stop()
    second.stop()


def test_a_drill_that_kills_a_worker_passes_with_the_other_taking_the_load(
    doomed: tuple[Process, Process, Gateway],
    logs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """b1 (three quarters of the chat traffic) is SIGKILLed under load: retries and stream
    resumption move its requests to b2, and nothing is lost or failed in any phase. The
    port comes from the environment, as a drill's configuration gives it: a string."""
    first, second, gateway = doomed
    monkeypatch.setenv("VGATE_DRILL_WORKER_PORT", first.url.rsplit(":", 1)[1])
    kill = action("kill-b1", "kill_worker", port="${worker_port}") | {"pauses": {"after": 1.5}}
    file = drill(tmp_path, [kill])
    experiment = yaml.safe_load(file.read_text())
    experiment["configuration"] = {"worker_port": {"type": "env", "key": "VGATE_DRILL_WORKER_PORT"}}
    file.write_text(yaml.safe_dump(experiment, sort_keys=False))

    result = run_drill(gateway, served_config(gateway, logs), tmp_path / "out", file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert first.popen.wait(5) == -signal.SIGKILL  # the worker was really killed
    assert second.popen.poll() is None
    report = json.loads((tmp_path / "out" / f"{file.stem}.json").read_text())
    assert report["passed"] is True
    assert all(v["holds"] for v in report["verdicts"])
    killed_at = next(mark["at"] for mark in report["marks"] if mark["label"] == "kill-b1")
    ended_before = [r for r in report["requests"] if r["started"] + r["duration_s"] < killed_at]
    before = {r["backend"] for r in ended_before} - {None}
    assert {"b1", "b2"} <= before  # both served before the kill
    after = [r for r in report["requests"] if r["started"] > killed_at + 0.5]
    assert len(after) > 20  # the load ran on
    assert {r["outcome"] for r in after} == {"ok"}
    assert {r["backend"] for r in after} <= {"b2", "b2-embed"}  # the other took it all
