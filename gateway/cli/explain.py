"""`vgate route explain`: replay a request's routing decisions from its access-log line.

Every decision is logged with its inputs: the route's strategy and seed, the selector's
state before the pick, each candidate's weight, load, latency, usability and whether it was
already tried, the affinity key's hash and any pin. Replaying builds the route's selector
from the configuration, restores that state, and picks again from the logged inputs. The
same backend comes out unless the configuration changed since: that is how an incident's
routing is reproduced and understood.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import orjson

from gateway.config import GatewayConfig, ModelRoute
from policies.affinity import AffinityRing
from policies.selection import create_selector


@dataclass(frozen=True, slots=True)
class _Candidate:
    load: int
    latency_ewma_s: float
    weight: int


@dataclass(frozen=True, slots=True)
class Replay:
    route: str
    logged: str | None
    replayed: str | None
    reason: str
    problem: str | None = None  # why it could not be replayed faithfully

    @property
    def same(self) -> bool:
        return self.problem is None and self.logged == self.replayed


def find_entry(lines: Iterable[bytes | str], request_id: str | None) -> dict[str, Any] | None:
    """The access-log entry of `request_id` (the last entry with decisions when None).
    Lines that are not access-log JSON (other logs on the same stream) are skipped."""
    found = None
    for raw in lines:
        line = raw.encode() if isinstance(raw, str) else raw
        line = line.strip()
        if not line.startswith(b"{"):
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("decisions"), list):
            continue
        if not entry["decisions"]:
            continue
        if request_id is None or entry.get("request_id") == request_id:
            found = entry
    return found


def replay(config: GatewayConfig, decision: dict[str, Any]) -> Replay:
    name = decision["route"]
    logged = decision.get("choice")
    reason = decision.get("reason", "")
    route = next((r for r in config.models if r.name == name), None)
    if route is None:
        return Replay(name, logged, None, reason, f"no model route '{name}' in the config")
    problem = _changed(route, decision)
    if problem is not None:
        return Replay(name, logged, None, reason, problem)
    if decision.get("pin") is not None:
        return Replay(name, logged, decision["pin"], reason)
    candidates = [
        _Candidate(c["load"], c["latency_s"], c["weight"]) for c in decision["candidates"]
    ]
    usable = [bool(c["usable"]) for c in decision["candidates"]]
    eligible = usable
    if reason.endswith(", avoiding backends tried"):
        eligible = [
            ok and not c["tried"] for ok, c in zip(usable, decision["candidates"], strict=True)
        ]
    selector = create_selector(
        route.strategy,
        [backend.weight for backend in route.backends],
        route.seed,
        names=[backend.name for backend in route.backends],
        epsilon=route.affinity.epsilon,
    )
    selector.restore(decision["state"])
    point = decision.get("key_hash")
    if point is not None and isinstance(selector, AffinityRing):
        index = selector.pick_at(candidates, eligible, int(point))
    else:
        index = selector.pick(candidates, eligible)
    replayed = route.backends[index].name if index is not None else None
    return Replay(name, logged, replayed, reason)


def _changed(route: ModelRoute, decision: dict[str, Any]) -> str | None:
    logged = [(c["name"], c["weight"]) for c in decision["candidates"]]
    now = [(b.name, b.weight) for b in route.backends]
    if logged != now:
        return f"the route's backends or weights changed since: logged {logged}, now {now}"
    if decision.get("strategy") != route.strategy or decision.get("seed") != route.seed:
        return "the route's strategy or seed changed since"
    return None


def explain(
    config: GatewayConfig, lines: Iterable[bytes | str], request_id: str | None, out: TextIO
) -> int:
    entry = find_entry(lines, request_id)
    if entry is None:
        wanted = f"request {request_id}" if request_id else "any request"
        print(f"vgate: no access-log entry with routing decisions for {wanted}", file=sys.stderr)
        return 1
    print(
        f"request {entry.get('request_id')}: {entry.get('method')} {entry.get('path')} "
        f"model={entry.get('model')} status={entry.get('status')} "
        f"attempts={entry.get('attempts')}",
        file=out,
    )
    all_same = True
    for number, decision in enumerate(entry["decisions"], 1):
        try:
            all_same &= _explain_one(config, number, decision, out)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
            # A line edited, cut off or written by another version: say so, never a traceback.
            print(
                f"\ndecision {number}: malformed in the log, not replayed "
                f"({type(error).__name__}: {str(error)[:200]})",
                file=out,
            )
            all_same = False
    return 0 if all_same else 3


def _explain_one(config: GatewayConfig, number: int, decision: Any, out: TextIO) -> bool:
    result = replay(config, decision)
    print(f"\ndecision {number}: route {result.route}, {result.reason}", file=out)
    print(f"  selector state: {orjson.dumps(decision.get('state')).decode()}", file=out)
    if decision.get("key_hash") is not None:
        print(f"  affinity key hash: {decision['key_hash']}", file=out)
    if decision.get("pin") is not None:
        print(f"  pinned to: {decision['pin']}", file=out)
    _table(decision["candidates"], out)
    verdict = "same" if result.same else f"DIFFERENT ({result.problem or 'replayed'})"
    print(f"  logged: {result.logged}  replayed: {result.replayed}  -> {verdict}", file=out)
    return result.same


def _table(candidates: Sequence[dict[str, Any]], out: TextIO) -> None:
    print("  backend              weight  load  latency_ms  usable  tried", file=out)
    for c in candidates:
        print(
            f"  {c['name']:<20} {c['weight']:>6} {c['load']:>5} "
            f"{c['latency_s'] * 1000:>11.3f}  {'yes' if c['usable'] else 'no':>6}  "
            f"{'yes' if c['tried'] else 'no':>5}",
            file=out,
        )
