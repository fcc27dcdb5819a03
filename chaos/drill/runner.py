"""Run one drill file: Chaos Toolkit's runner, the vgate session, the load, the verdicts.

A drill file is a Chaos Toolkit experiment (JSON or YAML) with a vgate extension::

    extensions:
      - name: vgate
        load: {clients: 8, mix: {chat: 2, stream: 2, embed: 1}}   # chaos.drill.load.LoadSpec
        warmup_s: 2          # load before the first phase, not judged
        waive: {during: [latency_p99]}   # objectives not judged in a phase

Chaos Toolkit (chaostoolkit-lib) does what the format means: it validates the file, runs
the steady-state hypothesis before and after the method, the method's actions, probes and
pauses, and the rollbacks, which vgate asks it to run always: after a failure and on
Ctrl-C or SIGTERM too, so a drill never leaves a fault behind.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chaoslib.exceptions import ChaosException
from chaoslib.experiment import ensure_experiment_is_valid
from chaoslib.loader import load_experiment
from chaoslib.run import Runner
from chaoslib.types import Strategy
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chaos.drill.judge import objective_names
from chaos.drill.load import Load, LoadSpec, LoadTarget
from chaos.drill.results import DrillResult, PhaseName
from chaos.drill.session import DrillSession, GatewayTarget
from gateway.config import GatewayConfig, field_path
from gateway.errors import ConfigError

logger = logging.getLogger("vgate.drill")

# Rollbacks run whatever happened: Chaos Toolkit's default skips them after a failure or
# an interruption, which would leave a backend down or a config swapped.
SETTINGS: dict[str, Any] = {"runtime": {"rollbacks": {"strategy": "always"}}}
STEADY_STATE_PROBE = ("chaos.drill.probes", "slos_hold")
PROGRESS_EVERY_S = 5.0


class DrillExtension(BaseModel):
    """The `vgate` entry of a drill file's `extensions`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    load: LoadSpec = LoadSpec()
    warmup_s: float = Field(2.0, ge=0, le=600)
    waive: dict[PhaseName, tuple[str, ...]] = {}


@dataclass(frozen=True, slots=True)
class Drill:
    path: Path
    experiment: dict[str, Any]
    extension: DrillExtension

    @property
    def name(self) -> str:
        return self.path.name.split(".")[0]

    @property
    def title(self) -> str:
        return str(self.experiment.get("title", self.name))


def load_drill(path: Path, config: GatewayConfig, *, clients: int | None = None) -> Drill:
    """The drill file at `path`, checked against the gateway's config; ConfigError naming
    the file, the field and the reason if anything is wrong with it. `clients` replaces
    the file's own number of load clients (one catalogue, scaled to each stack)."""
    source = str(path)
    if not path.is_file():
        raise ConfigError(source, "", "no such file")
    try:
        experiment = dict(load_experiment(str(path)))
        ensure_experiment_is_valid(experiment)
    except ChaosException as error:
        raise ConfigError(source, "", f"not a valid Chaos Toolkit experiment: {error}") from None
    except (ValueError, TypeError) as error:  # a provider Chaos Toolkit cannot inspect
        raise ConfigError(
            source, "", f"not a valid Chaos Toolkit experiment: {type(error).__name__}: {error}"
        ) from None
    entries = experiment.get("extensions") or []
    found = [
        (index, entry)
        for index, entry in enumerate(entries)
        if isinstance(entry, dict) and entry.get("name") == "vgate"
    ]
    if len(found) != 1:
        raise ConfigError(source, "extensions", "give one extension named 'vgate' (its load)")
    index, raw = found[0]
    if clients is not None:
        raw = {**raw, "load": {**(raw.get("load") or {}), "clients": clients}}
    try:
        extension = DrillExtension.model_validate(raw)
        extension.load.check()
    except ValidationError as error:
        first = error.errors()[0]
        where = f"extensions[{index}].{field_path(first['loc'])}"
        raise ConfigError(source, where, first["msg"]) from None
    except ValueError as error:
        raise ConfigError(source, f"extensions[{index}].load.mix", str(error)) from None
    known = objective_names(config.slos)
    for phase, names in extension.waive.items():
        for name in names:
            if name not in known:
                raise ConfigError(
                    source,
                    f"extensions[{index}].waive.{phase}",
                    f"{name!r} is not an objective (the config's SLOs and requests_lost: "
                    f"{', '.join(sorted(known))})",
                )
    routes = _routes(config)
    for model in (extension.load.model, extension.load.embed_model):
        if model not in routes:
            raise ConfigError(
                source, f"extensions[{index}].load", f"{model!r} is not a model of {config.source}"
            )
    if not _has_steady_state_probe(experiment):
        module, func = STEADY_STATE_PROBE
        raise ConfigError(
            source,
            "steady-state-hypothesis",
            f"give a probe of {module}.{func}: it observes the before and after phases",
        )
    return Drill(path, experiment, extension)


def run_drill(
    drill: Drill,
    target: GatewayTarget,
    config: GatewayConfig,
    progress: Callable[[DrillSession], None] | None = None,
) -> DrillResult:
    """Runs the drill under its load and judges it. Never raises for what the gateway did:
    that is in the result."""
    extension = drill.extension
    session = DrillSession(
        target=target,
        slos=config.slos,
        waived={phase: frozenset(names) for phase, names in extension.waive.items()},
        drill_dir=drill.path.parent,
    )
    routes = _routes(config)
    load = Load(LoadTarget(target.url, target.key), extension.load, session.now, routes.get)
    session.load = load
    experiment = copy.deepcopy(drill.experiment)
    experiment.setdefault("configuration", {})["vgate_session"] = session
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    done = threading.Event()
    reporter = threading.Thread(
        target=_report_progress,
        args=(session, progress, done),
        name="vgate-drill-progress",
        daemon=True,
    )
    status = "interrupted"
    load.start()
    reporter.start()
    try:
        done.wait(extension.warmup_s)
        with Runner(Strategy.DEFAULT) as runner:
            runner.register_event_handler(session)
            journal = runner.run(experiment, settings=copy.deepcopy(SETTINGS))
        status = str(journal.get("status"))
        if status == "completed" and journal.get("deviated"):
            status = "deviated"
    finally:
        done.set()
        load.stop()
        reporter.join()
    return DrillResult(
        name=drill.name,
        title=drill.title,
        file=str(drill.path),
        started_at=started_at,
        duration_s=session.now(),
        status=status,
        phases=session.all_phases(),
        marks=list(session.marks),
        requests=load.snapshot(),
        verdicts=session.verdicts(),
    )


def _report_progress(
    session: DrillSession,
    progress: Callable[[DrillSession], None] | None,
    done: threading.Event,
) -> None:
    if progress is None:
        return
    while not done.wait(PROGRESS_EVERY_S):
        progress(session)


def _routes(config: GatewayConfig) -> dict[str, str]:
    """Every model name a request may carry (route names and aliases), to its route."""
    routes: dict[str, str] = {}
    for route in config.models:
        routes[route.name] = route.name
        routes.update((alias, route.name) for alias in route.aliases)
    return routes


def _has_steady_state_probe(experiment: dict[str, Any]) -> bool:
    hypothesis = experiment.get("steady-state-hypothesis") or {}
    module, func = STEADY_STATE_PROBE
    for probe in hypothesis.get("probes") or ():
        provider = probe.get("provider") or {} if isinstance(probe, dict) else {}
        if provider.get("module") == module and provider.get("func") == func:
            return True
    return False


def run_drills(
    drills: Sequence[Drill],
    target: GatewayTarget,
    config: GatewayConfig,
    progress: Callable[[DrillSession], None] | None = None,
) -> list[DrillResult]:
    return [run_drill(drill, target, config, progress) for drill in drills]
