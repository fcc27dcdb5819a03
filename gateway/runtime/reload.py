"""Config hot reload: what a new config may change while serving, the adapters' lives
across reloads, and the triggers (the file changing on disk, SIGHUP).

What applies at once: `models` (routes, backends, aliases, fallbacks, strategies, timeouts,
retries, breakers, health checks, resumption), `guardrails`, `chaos.experiments` while
chaos is enabled, and `limits.redis_failure` (so an operator can make the limits fail
closed, or open, in the middle of an incident). The rest holds what was built once at
start-up (the listening socket, the connection limits, the admission queue, the Redis
client, the limit store, the tracer, the admin key, the keys file and its watcher, the
upstream answer buffer, the workers...):
a change there is reported (`restart_fields`) and the old value stays in force
(`effective`) until the process restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig
from gateway.edge.auth import file_signature
from gateway.router import Backend, Router
from policies.background import stop_task
from providers import Adapter

logger = logging.getLogger("vgate.config")

# Whole sections built once at start-up.
RESTART_SECTIONS = (
    "server",
    "redis",
    "limits",
    "tracing",
    "jwt",
    "admin",
    "keys",
    "upstream",
    "load_scrape",
    "workers",
    "metrics",
    "cache",
)


# Fields of those sections that apply at once all the same.
RELOADABLE_FIELDS: dict[str, frozenset[str]] = {"limits": frozenset({"redis_failure"})}


def restart_fields(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """The fields `new` changes that take effect only on a restart, as dotted paths."""
    changed = []
    for section in RESTART_SECTIONS:
        before, after = getattr(old, section), getattr(new, section)
        if before == after:
            continue
        if isinstance(before, tuple):  # workers: a list, named as a whole
            changed.append(section)
            continue
        was, now = before.model_dump(), after.model_dump()
        reloadable = RELOADABLE_FIELDS.get(section, frozenset())
        changed += [
            f"{section}.{name}"
            for name in was
            if was[name] != now.get(name) and name not in reloadable
        ]
    if old.chaos.enabled != new.chaos.enabled:
        changed.append("chaos.enabled")
    elif not old.chaos.enabled and old.chaos.experiments != new.chaos.experiments:
        changed.append("chaos.experiments")  # nothing runs while disabled: kept as it was
    return changed


def effective(old: GatewayConfig, new: GatewayConfig) -> GatewayConfig:
    """`new`, with what only a restart changes kept as `old` has it."""
    kept: dict[str, Any] = {section: getattr(old, section) for section in RESTART_SECTIONS}
    for section, names in RELOADABLE_FIELDS.items():
        update = {name: getattr(getattr(new, section), name) for name in names}
        kept[section] = kept[section].model_copy(update=update)
    if not old.chaos.enabled or not new.chaos.enabled:
        kept["chaos"] = old.chaos
    return new.model_copy(update=kept)


@dataclass(frozen=True, slots=True)
class ReloadReport:
    """What a reload that applied changed: the admin call's answer, and the log line's."""

    source: str
    trigger: str  # "admin", "SIGHUP" or "file"
    added: tuple[str, ...]  # backends with a new adapter
    removed: tuple[str, ...]  # backends whose adapter closes once their requests end
    kept: tuple[str, ...]  # backends whose adapter, breaker, health and load carry over
    restart_required: tuple[str, ...]  # changed fields that keep their old value
    chaos_experiments: bool  # whether the chaos experiments were replaced

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "config.reload",
            "source": self.source,
            "trigger": self.trigger,
            "applied": True,
            "backends": {
                "added": list(self.added),
                "removed": list(self.removed),
                "kept": list(self.kept),
            },
            "restart_required": list(self.restart_required),
            "chaos_experiments_replaced": self.chaos_experiments,
        }

    def summary(self) -> str:
        parts = [
            f"backends added {list(self.added)}, removed {list(self.removed)}, "
            f"kept {len(self.kept)}"
        ]
        if self.chaos_experiments:
            parts.append("chaos experiments replaced (those started at run time stopped)")
        if self.restart_required:
            parts.append(
                f"needing a restart, kept as they were: {', '.join(self.restart_required)}"
            )
        return "; ".join(parts)


class Adapters:
    """Every adapter started and not yet closed, each closed once: after a reload removed
    its backend, or at shutdown, in reverse order of start."""

    def __init__(self) -> None:
        self._open: list[Adapter] = []
        self._retiring: set[asyncio.Task[None]] = set()

    async def start(self, adapter: Adapter) -> None:
        await adapter.start()
        self._open.append(adapter)

    async def close(self, adapter: Adapter) -> None:
        for index, candidate in enumerate(self._open):
            if candidate is adapter:
                del self._open[index]
                await adapter.aclose()
                return

    def retire(self, backends: Iterable[Backend], old: Router, grace_s: float) -> None:
        """Close the adapters of `backends` once no request uses the router `old` they were
        in, or after `grace_s` at most. A request holds its router from start to end
        (`ProxyEndpoint`), so the old router outlives the last request that could still
        choose, or be on, one of these backends."""
        loop = asyncio.get_running_loop()
        unused = asyncio.Event()
        # The last reference may go in any thread (a cyclic collection): set it on the loop.
        weakref.finalize(old, _set_soon, loop, unused)
        task = loop.create_task(
            self._retire(list(backends), unused, grace_s), name="vgate-retire-backends"
        )
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, backends: list[Backend], unused: asyncio.Event, grace_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await unused.wait()
        busy = [backend.name for backend in backends if backend.in_flight]
        if busy:
            logger.warning(
                "closing removed backends %s after the %gs grace period with requests in flight",
                busy,
                grace_s,
            )
        for backend in backends:
            try:
                await self.close(backend.adapter)
            except Exception:
                logger.exception("closing the adapter of removed backend %s failed", backend.name)
        logger.info("removed backends closed: %s", ", ".join(b.name for b in backends))

    @property
    def retiring(self) -> int:
        return len(self._retiring)

    async def aclose(self) -> None:
        for task in list(self._retiring):
            await stop_task(task)
        while self._open:
            await self._open.pop().aclose()


def _set_soon(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(event.set)


Reload = Callable[[str], Awaitable[object]]  # the trigger's name in; raises nothing


@dataclass
class ConfigWatcher:
    """Reloads the config when its file changes on disk (polled every `interval_s`, 0: never)
    and when asked from a signal handler (`request`, for SIGHUP)."""

    path: Path | None  # None: the config was not read from a file
    interval_s: float
    reload: Reload
    _signature: tuple[int, int, int] | None = field(default=None, init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False)

    def loaded(self, signature: tuple[int, int, int] | None) -> None:
        """The file as it was when last read: a reload from any trigger, or the start."""
        self._signature = signature

    def signature(self) -> tuple[int, int, int] | None:
        return None if self.path is None else file_signature(self.path)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._signature is None:
            self._signature = self.signature()
        if self.path is not None and self.interval_s > 0:
            self._spawn(self._poll(), "vgate-config-watch")

    def request(self, trigger: str) -> None:
        """Reload soon, from any thread or a signal handler; ignored before start."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._spawn_reload, trigger)

    def _spawn_reload(self, trigger: str) -> None:
        if self._loop is not None:  # not closed meanwhile
            self._spawn(self.reload(trigger), "vgate-config-reload")

    def _spawn(self, work: Awaitable[Any], name: str) -> None:
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if self.signature() != self._signature:
                await self.reload("file")

    async def aclose(self) -> None:
        self._loop = None
        for task in list(self._tasks):
            await stop_task(task)
