"""Two builds of the gateway side by side: this tree against a git revision, under one load.

These machines' speed drifts by more than the changes worth measuring, even between two
phases of one run, so sequential before/after numbers mislead. Here both builds run at the
same time, pinned to the same core, each driven by its own identical load generator on the
other core: whatever slows the machine slows both, and their ratio is what a change did.

Per round, for each load (non-streaming chat at c=16 with wrk; streams of two lengths at c=16
with bench/streamload.py), both gateways' CPU time is read from /proc and divided by what each
completed. A stream event's cost is the difference between the long and the short streams'
CPU per stream over their difference in events, so a request's own cost is not counted as
events'. Medians over the rounds; prints a table, writes JSON (`--json`).

Run: `python bench/compare.py --base b779c82 --rounds 5 --duration 5`. `make bench` ends
with it (bench/run.py `--base`, `--no-compare`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/compare.py`
    sys.path.insert(0, str(REPO))

from bench.procs import BenchError, Processes, Server, free_port, pinned  # noqa: E402
from bench.run import (  # noqa: E402
    AUTH_HEADERS,
    CHAT_PATH,
    FAST_MODEL,
    NONSTREAM_BODY,
    STREAM_MAX_TOKENS,
    STREAM_MODEL,
    STREAM_SIM,
    Bench,
    Plan,
    chat_body,
    check_completion,
    check_stream,
    streamload_argv,
)
from bench.wrk import ensure_wrk  # noqa: E402

CONCURRENCY = 16
LONG_STREAM_MAX_TOKENS = 5 * STREAM_MAX_TOKENS
LOADS = ("non-stream", "stream-short", "stream-long")
STREAM_LOADS = LOADS[1:]
FLOOR = "pipe"  # bench/pipe.py, under the stream loads beside the two builds


class RevisionMissing(BenchError):
    """The revision to compare against is not in this clone."""


@dataclass(frozen=True)
class Build:
    label: str  # "base" or "head"
    source: Path | None  # None: this tree


def export_revision(revision: str, into: Path) -> str:
    """The tree of `revision` under `into`; returns the commit it resolved to."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if commit.returncode != 0:
        raise RevisionMissing(f"{revision!r} is not a commit of this clone")
    into.mkdir(parents=True)
    archive = subprocess.Popen(
        ["git", "-C", str(REPO), "archive", commit.stdout.strip()], stdout=subprocess.PIPE
    )
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise BenchError(f"git archive {revision} failed")
    return commit.stdout.strip()


def events_per_stream(url: str, body: bytes) -> int:
    """How many SSE events one stream of `body` through the gateway at `url` carries."""
    request = urllib.request.Request(url + CHAT_PATH, data=body, headers=AUTH_HEADERS)
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
    return sum(1 for line in text.split(b"\n") if line.startswith(b"data:"))


class Comparison:
    def __init__(self, bench: Bench, builds: Sequence[Build]) -> None:
        self.bench = bench
        self.builds = builds
        self.gateways: dict[str, Server] = {}
        self.pipe: Server | None = None  # the floor: bench/pipe.py to the stream worker
        self.rounds: list[dict[str, dict[str, float]]] = []

    def start(self) -> None:
        bench = self.bench
        fast = bench.start_sim("sim-fast", FAST_MODEL, {})
        stream = bench.start_sim("sim-stream", STREAM_MODEL, STREAM_SIM)
        for build in self.builds:
            source = (build.label, build.source) if build.source is not None else None
            gateway, _ = bench.start_gateway(fast, stream, source=source)
            check_completion(gateway.name, gateway.url, AUTH_HEADERS)
            check_stream(gateway.name, gateway.url, AUTH_HEADERS)
            self.gateways[build.label] = gateway
        port = free_port()
        argv = [
            sys.executable,
            str(REPO / "bench" / "pipe.py"),
            "--port",
            str(port),
            "--upstream",
            stream.url.removeprefix("http://"),
        ]
        self.pipe = bench.procs.server(FLOOR, pinned(bench.gateway_core, argv), port=port)
        check_stream(FLOOR, self.pipe.url, AUTH_HEADERS)

    def servers(self, name: str) -> dict[str, Server]:
        """Who takes load `name`: both builds, and under the stream loads the byte pipe."""
        if name in STREAM_LOADS and self.pipe is not None:
            return {**self.gateways, FLOOR: self.pipe}
        return self.gateways

    def _stream_load(self, url: str, body: bytes) -> Callable[[], int]:
        plan = self.bench.plan
        argv = streamload_argv(url, body, AUTH_HEADERS, CONCURRENCY, plan.duration_s, 0)

        def run() -> int:
            done = self.bench.procs.run(
                pinned(self.bench.load_core, argv), timeout_s=plan.duration_s + 60, cwd=REPO
            )
            if done.returncode != 0:
                raise BenchError(f"streamload failed: {done.stderr.decode()[-2000:]}")
            data: dict[str, Any] = json.loads(done.stdout)
            if data["errors"]:
                raise BenchError(f"streams failed: {data['errors']}")
            return int(data["requests_total"])

        return run

    def _wrk_load(self, url: str) -> Callable[[], int]:
        plan = self.bench.plan

        def run() -> int:
            result = self.bench.wrk.run(
                url + CHAT_PATH,
                NONSTREAM_BODY,
                AUTH_HEADERS,
                concurrency=CONCURRENCY,
                duration_s=plan.duration_s,
            )
            if result.error_count:
                raise BenchError(f"wrk saw errors {result.errors}")
            return result.requests

        return run

    def load(self, name: str, url: str) -> Callable[[], int]:
        if name == "non-stream":
            return self._wrk_load(url)
        tokens = STREAM_MAX_TOKENS if name == "stream-short" else LONG_STREAM_MAX_TOKENS
        return self._stream_load(url, chat_body(STREAM_MODEL, stream=True, max_tokens=tokens))

    def paired(self, name: str) -> dict[str, float]:
        """Both gateways (and for streams the pipe) under the same load at once: CPU µs per
        completed request each."""
        servers = self.servers(name)
        labels = list(servers)
        loads = [self.load(name, servers[label].url) for label in labels]
        before = {label: servers[label].cpu_seconds() for label in labels}
        with ThreadPoolExecutor(len(loads)) as pool:
            done = list(pool.map(lambda run: run(), loads))
        spent = {label: servers[label].cpu_seconds() - before[label] for label in labels}
        return {
            label: spent[label] / max(count, 1) * 1e6
            for label, count in zip(labels, done, strict=True)
        }

    def run(self, rounds: int) -> None:
        for number in range(1, rounds + 1):
            row = {name: self.paired(name) for name in LOADS}
            self.rounds.append(row)
            print(
                f"  round {number}: "
                + "  ".join(
                    f"{name} " + " / ".join(f"{cpu:,.0f}" for cpu in row[name].values())
                    for name in LOADS
                ),
                file=sys.stderr,
                flush=True,
            )

    def summary(self, events: dict[str, int]) -> dict[str, Any]:
        def median(name: str, label: str) -> float:
            return statistics.median(r[name][label] for r in self.rounds)

        def marginal(label: str) -> float:
            """CPU per event of what `label` ran: the long streams' over the short ones'."""
            extra_events = events["stream-long"] - events["stream-short"]
            return (median("stream-long", label) - median("stream-short", label)) / extra_events

        medians = {name: {b.label: median(name, b.label) for b in self.builds} for name in LOADS}
        per_event = {b.label: marginal(b.label) for b in self.builds}
        ratios = {
            name: statistics.median(r[name]["head"] / r[name]["base"] for r in self.rounds)
            for name in LOADS
        }
        ratios["stream-event"] = per_event["head"] / per_event["base"]
        summary: dict[str, Any] = {
            "cpu_us_per_request": medians,
            "cpu_us_per_stream_event": per_event,
            "events_per_stream": events,
            "head_over_base": ratios,
        }
        if all(FLOOR in r[name] for r in self.rounds for name in STREAM_LOADS):
            pipe = marginal(FLOOR)
            summary["floor"] = {
                "cpu_us_per_request": {name: median(name, FLOOR) for name in STREAM_LOADS},
                "cpu_us_per_stream_event": pipe,
                "over_floor": {b.label: per_event[b.label] / pipe for b in self.builds},
            }
        return summary


def render(summary: dict[str, Any], base: str) -> str:
    medians = summary["cpu_us_per_request"]
    ratios = summary["head_over_base"]
    lines = [
        f"gateway CPU, this tree (head) against {base} (base), side by side, c={CONCURRENCY}",
        f"{'load':<34}{'base µs':>10}{'head µs':>10}{'head/base':>11}",
    ]
    events = summary["events_per_stream"]
    for name in LOADS:
        what = name if name == "non-stream" else f"{name} ({events[name]} events)"
        lines.append(
            f"{what + ', per request':<34}{medians[name]['base']:>10,.0f}"
            f"{medians[name]['head']:>10,.0f}{ratios[name]:>11.3f}"
        )
    per_event = summary["cpu_us_per_stream_event"]
    lines.append(
        f"{'a stream event (marginal)':<34}{per_event['base']:>10,.1f}"
        f"{per_event['head']:>10,.1f}{ratios['stream-event']:>11.3f}"
    )
    floor = summary.get("floor")
    if floor is not None:
        over = floor["over_floor"]
        lines.append(
            f"a stream event through a byte pipe on uvloop (bench/pipe.py, beside them): "
            f"{floor['cpu_us_per_stream_event']:,.1f} µs; base {over['base']:.2f}x, "
            f"head {over['head']:.2f}x that floor"
        )
    return "\n".join(lines)


def compare(
    base: str, *, rounds: int, duration_s: float, procs: Processes, workdir: Path
) -> dict[str, Any]:
    commit = export_revision(base, workdir / "base")
    plan = Plan(duration_s=duration_s, warmup_s=0.0, concurrencies=(CONCURRENCY,), transports=False)
    bench = Bench(plan, procs, ensure_wrk(), workdir)
    builds = [Build("base", workdir / "base"), Build("head", None)]
    comparison = Comparison(bench, builds)
    print(f"bench compare: this tree against {base} ({commit[:12]})", file=sys.stderr, flush=True)
    comparison.start()
    head = comparison.gateways["head"].url
    bodies = {
        name: chat_body(
            STREAM_MODEL,
            stream=True,
            max_tokens=STREAM_MAX_TOKENS if name == "stream-short" else LONG_STREAM_MAX_TOKENS,
        )
        for name in STREAM_LOADS
    }
    events = {name: events_per_stream(head, body) for name, body in bodies.items()}
    assert comparison.pipe is not None
    piped = {name: events_per_stream(comparison.pipe.url, body) for name, body in bodies.items()}
    if piped != events:  # the same worker's streams: the pipe forwards them as they are
        raise BenchError(f"streams through the pipe carry {piped} events, the gateway's {events}")
    # One unrecorded round: both processes warm (imports, code paths, connection pools).
    comparison.paired("non-stream")
    comparison.run(rounds)
    for server in (*comparison.gateways.values(), comparison.pipe):
        procs.stop(server.popen)
    summary = comparison.summary(events)
    return {
        "base": base,
        "base_commit": commit,
        "rounds": rounds,
        "duration_s": duration_s,
        "concurrency": CONCURRENCY,
        "per_round": comparison.rounds,
        **summary,
        "warnings": bench.warnings,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load per round")
    parser.add_argument("--json", type=Path, help="write the result here too")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vgate-compare-") as tmp:
        procs = Processes(Path(tmp))
        try:
            result = compare(
                args.base,
                rounds=args.rounds,
                duration_s=args.duration,
                procs=procs,
                workdir=Path(tmp),
            )
        except BenchError as exc:
            print(f"bench compare: {exc}", file=sys.stderr)
            return 2
        finally:
            procs.stop_all()
    print(render(result, args.base))
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
