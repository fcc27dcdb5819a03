"""Config hot reload in process: a started `Gateway` over fake adapters (providers.fake),
its config file rewritten and reloaded.

What carries over (the `Backend` objects of unchanged backends, with their breaker, health,
requests in flight and adapter), what is new (adapters started and probed before traffic),
what goes (adapters closed once no request can reach them), and what is refused (the
config in force stays).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from chaos.inject import ChaosAdapter
from gateway.config import ChaosExperiment, ChaosFault, load_config
from gateway.errors import ConfigError
from gateway.router import Outcome
from gateway.runtime.gateway import Gateway
from providers.fake import Events, FakeAdapters, Pause, chat_events
from tests.router.conftest import CALL, chat, complete, stream
from tests.servers import KEYS_FILE

FAST = {"connect_s": 0.05, "first_token_s": 0.5, "idle_s": 0.5, "total_s": 5.0}
NO_BREAKER = {"consecutive_failures": 1000, "min_requests": 1000}


def vllm(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "provider": "vllm", "url": f"http://{name}.invalid:8000", **extra}


def config(*backends: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """Route m over `backends`; the health checker probes every minute (never, in a test)."""
    route = {
        "name": "m",
        "timeouts": FAST,
        "breaker": NO_BREAKER,
        "health": {"interval_s": 60},
        "backends": list(backends),
    }
    return {
        "keys": {"file": str(KEYS_FILE)},
        "server": {"config_reload_interval_s": 0},
        "load_scrape": {"enabled": False},
        "models": [route],
        **sections,
    }


class Setup:
    def __init__(self, path: Path, gateway: Gateway, fakes: FakeAdapters) -> None:
        self.path = path
        self.gateway = gateway
        self.fakes = fakes

    def write(self, raw: dict[str, Any]) -> None:
        self.path.write_text(yaml.safe_dump(raw))

    def reloads(self, outcome: str) -> float:
        value = self.gateway.metrics.config_reloads.labels(outcome)._value.get()
        return float(value)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Gateway] = []

    async def start(raw: dict[str, Any]) -> Setup:
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(raw))
        fakes = FakeAdapters()
        gateway = Gateway.from_config(load_config(path, environ={}), adapters=fakes)
        await gateway.start()
        started.append(gateway)
        return Setup(path, gateway, fakes)

    yield start
    for gateway in started:
        await gateway.aclose()


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Whether `condition` holds within `timeout_s`: what the gateway does in the
    background (closing an adapter, polling the file), looked at every 10 ms."""
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


async def closed(fake: Any) -> bool:
    return await eventually(lambda: bool(fake.closed))


async def test_unchanged_backends_keep_their_objects_and_state(setup: Any) -> None:
    s = await setup(config(vllm("a"), vllm("b")))
    a, b = s.gateway.router.backends
    assert a.breaker.apply_remote("open", time.time(), time.time())
    a.in_flight, a.latency_ewma_s, a.health.failures = 3, 0.25, 1

    s.write(config(vllm("a"), vllm("b", weight=5), vllm("c")))
    report = await s.gateway.reload("admin")

    kept, changed, new = s.gateway.router.backends
    assert kept is a  # the same object: breaker, health, load, in flight and adapter
    assert (kept.in_flight, kept.latency_ewma_s, kept.health.failures) == (3, 0.25, 1)
    assert kept.breaker.state == "open"
    assert kept.adapter is s.fakes["a"] and not s.fakes["a"].closed
    assert changed is not b and changed.weight == 5  # its config changed: a new backend
    assert new.name == "c" and s.fakes["c"].started and new.health.probed
    assert (report.added, report.removed, report.kept) == (("b", "c"), ("b",), ("a",))
    assert s.gateway.router.admission is not None
    assert s.reloads("applied") == 1


async def test_a_new_backend_takes_traffic_and_a_removed_one_closes_once_idle(
    setup: Any,
) -> None:
    s = await setup(config(vllm("a")))
    old = s.gateway.router
    paused = asyncio.Event()
    s.fakes["a"].add(Events([*chat_events("Hel")[:2], Pause(paused), *chat_events("lo")[1:]]))
    # A stream on a, open across the reload: it started on the old config.
    opened = await old.open_stream(old.plan(chat(stream=True), CALL), Outcome())
    del old

    s.write(config(vllm("b")))
    report = await s.gateway.reload("SIGHUP")
    assert (report.added, report.removed) == (("b",), ("a",))

    s.fakes["b"].add(Events(chat_events("from b")))
    done = await complete(s.gateway.router, chat(), Outcome())
    assert done.backend == "b"  # new requests: the new config
    assert not s.fakes["a"].closed  # a's stream is still being read

    paused.set()
    rest = b"".join([events async for events in opened.rest()])
    assert rest.endswith(b"data: [DONE]\n\n")  # finished on the old config, whole
    assert opened.backend.name == "a"
    opened.close()
    del opened
    assert await closed(s.fakes["a"])
    assert not s.fakes["b"].closed


async def test_a_request_started_before_the_swap_finishes_on_the_old_router(
    setup: Any,
) -> None:
    s = await setup(config(vllm("a")))
    router = s.gateway.router  # what the edge reads once, at a request's start
    s.fakes["a"].add(Events(chat_events("old")))
    s.write(config(vllm("b")))
    await s.gateway.reload("file")

    assert s.gateway.router is not router
    # Nothing is in flight on a, but a request holding the old router may still choose it.
    await asyncio.sleep(0.05)
    assert not s.fakes["a"].closed
    streamed = await stream(router, chat(stream=True), Outcome())
    assert (streamed.backend, streamed.text, streamed.done) == ("a", "old", True)
    del router
    assert await closed(s.fakes["a"])


async def test_an_invalid_config_is_refused_and_the_old_one_serves(setup: Any) -> None:
    s = await setup(config(vllm("a")))
    router = s.gateway.router
    s.write(config(vllm("a", weight=0)))

    with pytest.raises(ConfigError) as caught:
        await s.gateway.reload("admin")

    assert caught.value.field == "models[0].backends[0].weight"
    assert caught.value.source == str(s.path)
    assert s.gateway.router is router and s.gateway.config.models[0].backends[0].weight == 1
    assert (s.reloads("refused"), s.reloads("applied")) == (1, 0)
    # Valid as YAML and schema, impossible to build: refused too, nothing started.
    s.write(config(vllm("a"), vllm("b", adaptive_concurrency={"enabled": True, "min_limit": 300})))
    with pytest.raises(ConfigError, match="min_limit"):
        await s.gateway.reload("admin")
    assert s.gateway.router is router and not s.fakes["b"].started
    s.fakes["a"].add(Events(chat_events("still here")))
    assert (await complete(s.gateway.router, chat(), Outcome())).backend == "a"


async def test_fields_needing_a_restart_are_reported_and_keep_their_value(setup: Any) -> None:
    s = await setup(config(vllm("a")))
    s.write(
        config(
            vllm("a"),
            server={"port": 9999, "max_in_flight": 7, "config_reload_interval_s": 0},
            guardrails={"max_n": 2},
        )
    )
    report = await s.gateway.reload("admin")

    assert report.restart_required == ("server.port", "server.max_in_flight")
    assert s.gateway.config.server.port == 8000  # kept as it was
    assert s.gateway.guardrails.max_n == 2  # the rest applies


async def test_the_file_changing_and_sighup_reload(setup: Any) -> None:
    raw = config(vllm("a"))
    raw["server"]["config_reload_interval_s"] = 0.02
    s = await setup(raw)
    s.write({**raw, "guardrails": {"max_n": 3}})
    assert await eventually(lambda: s.reloads("applied") >= 1)
    assert s.gateway.guardrails.max_n == 3

    s.gateway.request_reload("SIGHUP")  # the file as it is: applied again, nothing changes
    assert await eventually(lambda: s.reloads("applied") >= 2)
    # An invalid file is refused once, not at every poll.
    s.path.write_text("models: [")
    assert await eventually(lambda: s.reloads("refused") >= 1)
    await asyncio.sleep(0.1)  # five polls more: none reads the same file again
    assert s.reloads("refused") == 1 and s.gateway.guardrails.max_n == 3


async def test_an_unhealthy_new_backend_is_known_so_before_traffic(setup: Any) -> None:
    s = await setup(config(vllm("a")))
    s.fakes["b"].healthy = False
    s.write(config(vllm("a"), vllm("b")))
    await s.gateway.reload("admin")

    backend = s.gateway.router.backends[1]
    assert backend.name == "b" and not backend.health.healthy
    assert 'vgate_backend_healthy{backend="b"} 0.0' in s.gateway.metrics.render().decode()
    ready, models = s.gateway.readiness()
    assert ready and models == {"m": {"live": ["a"], "down": ["b"]}}


async def test_chaos_experiments_are_replaced_and_new_backends_wrapped(setup: Any) -> None:
    def chaos(*names: str) -> dict[str, Any]:
        return {
            "enabled": True,
            "experiments": [
                {"name": name, "fault": {"kind": "refuse"}, "backends": ["a"], "on_request": True}
                for name in names
            ],
        }

    s = await setup(config(vllm("a"), chaos=chaos("first")))
    a = s.gateway.router.backends[0]
    s.gateway.chaos.start(ChaosExperiment(name="adhoc", fault=ChaosFault(kind="refuse")))
    s.write(config(vllm("a"), vllm("b"), chaos=chaos("second")))
    report = await s.gateway.reload("admin")

    # The config's experiments replace those running, the one started at run time too.
    assert report.chaos_experiments
    assert [e["name"] for e in s.gateway.chaos.experiments()] == ["second"]
    kept, new = s.gateway.router.backends
    assert isinstance(kept.adapter, ChaosAdapter) and isinstance(new.adapter, ChaosAdapter)
    assert kept is a  # its wrapped adapter kept: the same Chaos acts on it

    # Unchanged experiments: nothing restarts; chaos switched off needs a restart.
    s.write(config(vllm("a"), vllm("b"), chaos={**chaos("second"), "enabled": False}))
    report = await s.gateway.reload("admin")
    assert not report.chaos_experiments and report.restart_required == ("chaos.enabled",)
    assert s.gateway.chaos.enabled


async def test_a_new_adapter_that_cannot_start_refuses_the_reload(setup: Any) -> None:
    s = await setup(config(vllm("a")))
    router = s.gateway.router

    async def cannot_start() -> None:
        raise OSError("c: cannot start")

    s.fakes["c"].start = cannot_start  # type: ignore[method-assign]
    s.write(config(vllm("a"), vllm("b"), vllm("c")))
    with pytest.raises(OSError, match="c: cannot start"):
        await s.gateway.reload("admin")

    assert s.gateway.router is router and s.reloads("refused") == 1
    assert s.fakes["b"].started and s.fakes["b"].closed  # started before c: closed again
    assert not s.fakes["a"].closed


async def test_a_reload_lets_the_keys_file_name_the_new_models(setup: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(KEYS_FILE.read_text())
    s = await setup(config(vllm("a"), keys={"file": str(keys)}))
    limited = "keys:\n  - {id: k2, name: k2, sha256: " + "a" * 64 + ", models: [m2]}\n"
    keys.write_text(KEYS_FILE.read_text().replace("keys:\n", limited, 1))
    with pytest.raises(ConfigError, match="m2"):
        await s.gateway.keys.reload()  # no model m2 yet
    added = config(vllm("a"), keys={"file": str(keys)})
    added["models"].append({**added["models"][0], "name": "m2", "backends": [vllm("b")]})
    s.write(added)
    await s.gateway.reload("admin")
    # The model the reload added may be named now, without a restart.
    keys.write_text(KEYS_FILE.read_text().replace("keys:\n", limited + "  \n", 1))
    counts = await s.gateway.keys.reload()
    assert counts["keys"] == 2 and "k2" in s.gateway.keys.ids()


async def test_the_limits_failure_mode_applies_at_once(setup: Any) -> None:
    # Redis is never reached here (nothing listens there): only the mode is looked at.
    redis = {"url": "redis://127.0.0.1:1", "socket_timeout_s": 0.05}
    s = await setup(config(vllm("a"), redis=redis, limits={"redis_failure": "open"}))
    assert s.gateway.limits.mode == "open"
    s.write(config(vllm("a"), redis=redis, limits={"redis_failure": "closed", "lease_s": 60}))
    report = await s.gateway.reload("admin")

    assert report.restart_required == ("limits.lease_s",)
    assert s.gateway.limits.mode == "closed"
    assert s.gateway.config.limits.redis_failure == "closed"
    assert s.gateway.config.limits.lease_s == 600  # kept until a restart
