"""`make bench`: the gateway against a simulated vLLM worker, direct and through, in one run.

Starts two simulated workers (`vgate sim`: an instant one for non-streaming load, a paced one
for streams) and one gateway process (`vgate serve`, auth, access log and metrics on), then
measures each load twice, straight to the worker and through the gateway, with the same load
generator, settings and run:

- non-streaming chat at 1, 16 and 64 concurrent clients with wrk;
- streaming chat at 1, 16 and 64 concurrent clients with bench/streamload.py (time to first
  token, which wrk cannot see);
- the gateway's CPU time per request, from /proc/<pid>/stat around each phase;
- the response cache on (memory, then Redis: a redis-server of the run's own): a hit's p50
  with one client, and hits against proxied requests (req/s, CPU) at c=16, same gateway;
- optionally (on by default, off with --quick) bare proxies, one per upstream HTTP client, to
  show what the choice of client costs (README, "Why a lean upstream client").

The gateway is pinned to core 0; the workers and the load generators to core 1. Prints a
table and PASS/FAIL per target, writes JSON to bench/results/<UTC time>.json and latest.json.
Exit status: 0 when the run completed (whatever the targets say; 1 with --strict when a target
failed), 2 when the run itself failed (errors under load, a server that did not start).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/run.py`
    sys.path.insert(0, str(REPO))

from bench import transports, workers  # noqa: E402
from bench.procs import BenchError, Processes, Server, cores, free_port, pinned  # noqa: E402
from bench.wrk import Wrk, WrkResult, ensure_wrk  # noqa: E402

T = TypeVar("T")

RESULTS_DIR = REPO / "bench" / "results"
PYDEPS_DIR = REPO / "bench" / ".cache" / "pydeps"
KEYS_FILE = REPO / "config" / "keys.yaml"
DEMO_KEY = "vg-demo-0123456789abcdef"
DEMO_KEY_ENTRY = {
    "id": "key-demo",
    "name": "demo",
    "sha256": "9a8904f919ef129b3b4e2c83799dac9edd235bdad01850bc636fd4403c1a231c",
}
# Every per-key limit, far above what the bench sends: each request is checked and charged
# against all four, and none is refused.
BENCH_LIMITS = {
    "rpm": 100_000_000,
    "tpm": 1_000_000_000,
    "tokens_per_day": 10**14,
    "max_concurrent": 100_000,
}
# The limits rows: the demo key limited in process, then through a redis-server of the run's
# with the request path's pipelined client (the default), then with redis-py's.
LIMITS_ROWS = ("limits-local", "limits-redis", "limits-redis-py")
CHAT_PATH = "/v1/chat/completions"

GATEWAY_CORE = 0
LOAD_CORE = 1  # the workers and the load generators

FAST_MODEL = "tiny-llama"  # instant worker: the gateway's cost, not the worker's, dominates
STREAM_MODEL = "tiny-llama-stream"  # paced worker: streams shaped like a small fast model's
# Streams: 10 ms to the first token (a short prompt's prefill), then 200 tokens/s per sequence
# (a small model on a fast GPU) in chunks of 2 tokens (vLLM groups tokens under load): 32
# tokens last about 165 ms, 19 events. Short, so that a phase sees hundreds of streams, and
# light enough that core 1 (worker + load client) stays below saturation even at 64 streams,
# so the direct baseline's TTFT is the worker's, not a queue on the load side.
STREAM_SIM = {"ttft-ms": 10, "tokens-per-s": 200, "tokens-per-chunk": 2}
NONSTREAM_MAX_TOKENS = 16
STREAM_MAX_TOKENS = 32

# Issue 15's per-event and non-streaming targets are ratios against the build the issue
# was measured on (the main of 2026-12-07 16:30), run side by side with this one at the end
# of `make bench` (bench/compare.py): `--base` names another revision, `--no-compare` skips.
BASELINE_REVISION = "b779c82"
TARGET_STREAM_EVENT_RATIO = 0.55
TARGET_NON_STREAM_RATIO = 0.75
COMPARE_ROUNDS = 5
TARGET_RPS = 3000.0
TARGET_RPS_CONCURRENCY = 16
TARGET_ADDED_TTFT_MS = 1.0
TARGET_TTFT_CONCURRENCY = 16
# Per-key limits through Redis against the same limits in process, non-streaming req/s at
# TARGET_RPS_CONCURRENCY (issue 15).
TARGET_REDIS_LIMITS_RATIO = 0.8
# server.workers: 2 workers against 1, same load (issue 15).
TARGET_WORKERS_CPU_RATIO = 1.1
TARGET_WORKER_SHARE = (0.4, 0.6)
# The response cache: a hit's end-to-end p50 with one client, and its CPU against a proxied
# request's at the target concurrency (issue 16).
CACHE_BACKENDS = ("memory", "redis")
TARGET_CACHE_HIT_P50_MS = 1.0
CACHE_LATENCY_CONCURRENCY = 1
CACHE_CPU_CONCURRENCY = TARGET_RPS_CONCURRENCY

PACKAGES = (
    "vgate",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "aiohttp",
    "httpx",
    "httpx-aiohttp",
    "pyreqwest",
    "orjson",
    "prometheus-client",
    "pydantic",
)


def chat_body(
    model: str, *, stream: bool, max_tokens: int, temperature: float | None = None
) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Write one short sentence about benchmarks."}],
        "max_tokens": max_tokens,
    }
    if temperature is not None:
        body["temperature"] = temperature
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()


NONSTREAM_BODY = chat_body(FAST_MODEL, stream=False, max_tokens=NONSTREAM_MAX_TOKENS)
# The same request asked deterministically: cacheable (NONSTREAM_BODY, with no temperature, is
# not, so through a gateway with the cache on it is proxied: a bypass). Fixed, so every
# request after the first is a hit.
HIT_BODY = chat_body(FAST_MODEL, stream=False, max_tokens=NONSTREAM_MAX_TOKENS, temperature=0)
STREAM_BODY = chat_body(STREAM_MODEL, stream=True, max_tokens=STREAM_MAX_TOKENS)
JSON_HEADERS = {"Content-Type": "application/json"}
AUTH_HEADERS = {**JSON_HEADERS, "Authorization": f"Bearer {DEMO_KEY}"}


@dataclass(frozen=True)
class Plan:
    duration_s: float
    warmup_s: float
    concurrencies: tuple[int, ...]
    transports: bool
    transport_concurrency: int = 16
    non_stream: str | None = None  # the routes' `non_stream` mode; None: the config default


# ------------------------------------------------------------------------------------------
# CPU accounting around a phase


def _system_busy_s() -> tuple[float, float]:
    """(process time, interrupt time) of all CPUs since boot, from /proc/stat.

    Interrupt time (mostly the loopback network's softirqs) is kept apart: the kernel does
    that work for this run's own sockets but charges it to no process.
    """
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + steal) / ticks, (irq + softirq) / ticks


def _own_and_children_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the finished load generators
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Accounting:
    """CPU seconds spent during one phase, by whom. `other_s`: processes not of this run."""

    wall_s: float
    servers_s: dict[str, float]
    load_s: float
    interrupts_s: float
    other_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 3),
            "cpu_s": {name: round(v, 3) for name, v in self.servers_s.items()},
            "load_generator_cpu_s": round(self.load_s, 3),
            "interrupts_cpu_s": round(self.interrupts_s, 3),
            "other_processes_cpu_s": round(self.other_s, 3),
        }


def accounted(servers: Sequence[Server], run: Callable[[], T]) -> tuple[T, Accounting]:
    before = {s.name: s.cpu_seconds() for s in servers}
    (busy, irq), own, wall = _system_busy_s(), _own_and_children_s(), time.monotonic()
    result = run()
    wall = time.monotonic() - wall
    own = _own_and_children_s() - own
    busy_after, irq_after = _system_busy_s()
    spent = {s.name: s.cpu_seconds() - before[s.name] for s in servers}
    other = max(0.0, busy_after - busy - own - sum(spent.values()))
    return result, Accounting(wall, spent, own, irq_after - irq, other)


# ------------------------------------------------------------------------------------------
# One-off requests: preflight checks and scrapes


def http(
    url: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=body, headers=dict(headers or {}), method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def cache_outcome(url: str, body: bytes, headers: Mapping[str, str]) -> str | None:
    """The X-VGate-Cache header (hit, miss, coalesced, bypass) of one request; None without."""
    request = urllib.request.Request(url + CHAT_PATH, data=body, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=10.0) as response:
            response.read()
            outcome: str | None = response.headers.get("X-VGate-Cache")
            return outcome
    except urllib.error.HTTPError as exc:
        raise BenchError(f"a cacheable request got {exc.code}: {exc.read()[:300]!r}") from None


def streamload_argv(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
) -> list[str]:
    """bench/streamload.py streaming `body` to the gateway or sim at `url`."""
    argv = [
        sys.executable,
        "-m",
        "bench.streamload",
        "--url",
        url + CHAT_PATH,
        "--body",
        body.decode(),
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration_s),
        "--warmup",
        str(warmup_s),
    ]
    for name, value in headers.items():
        if name.lower() != "content-type":  # streamload sends its own
            argv += ["--header", f"{name}: {value}"]
    return argv


def check_completion(label: str, url: str, headers: Mapping[str, str]) -> None:
    status, body = http(url + CHAT_PATH, NONSTREAM_BODY, headers)
    if status != 200 or b'"choices"' not in body:
        raise BenchError(f"{label}: a non-streaming request got {status}: {body[:300]!r}")


def check_stream(label: str, url: str, headers: Mapping[str, str]) -> None:
    status, body = http(url + CHAT_PATH, STREAM_BODY, headers)
    if status != 200 or not body.rstrip().endswith(b"data: [DONE]") or b'"content"' not in body:
        raise BenchError(f"{label}: a streaming request got {status}: {body[:300]!r}")


def scrape_counter(url: str, name: str) -> float | None:
    """Sum of one counter over its label sets in a Prometheus text page; None if absent."""
    status, body = http(url + "/metrics")
    if status != 200:
        return None
    total, found = 0.0, False
    for line in body.decode(errors="replace").splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


def settled_cache_hits(url: str, timeout_s: float = 3.0) -> float:
    """vgate_cache_hits_total once it stops moving: requests still in flight when wrk
    stopped (a Redis round trip each) are counted with their own phase, not the next."""
    deadline = time.monotonic() + timeout_s
    last = scrape_counter(url, "vgate_cache_hits_total") or 0.0
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = scrape_counter(url, "vgate_cache_hits_total") or 0.0
        if now == last:
            break
        last = now
    return last


# ------------------------------------------------------------------------------------------
# The run


@dataclass
class Phase:
    mode: str  # "non-stream" | "stream" | "transport"
    target: str  # "direct" | "gateway" | a transport client
    concurrency: int
    requests: int
    requests_total: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    cpu_us_per_request: float | None = None
    cpu_core_share: float | None = None
    server_timing_gateway_p50_ms: float | None = None
    accounting: Accounting | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("accounting", "raw")}
        out["accounting"] = self.accounting.to_json() if self.accounting else None
        out["raw"] = self.raw
        return out


class Bench:
    def __init__(self, plan: Plan, procs: Processes, wrk_binary: str, workdir: Path) -> None:
        self.plan = plan
        self.procs = procs
        self.workdir = workdir
        pin = cores() >= 2
        self.gateway_core = GATEWAY_CORE if pin else None
        self.load_core = LOAD_CORE if pin else None
        self.wrk = Wrk(wrk_binary, procs, workdir, self.load_core)
        self.phases: list[Phase] = []
        self.warnings: list[str] = []
        self.checks: dict[str, Any] = {}
        self.transport_rows: list[dict[str, Any]] = []
        self.worker_rows: list[dict[str, Any]] = []
        if not pin:
            self.warnings.append("fewer than 2 cores: nothing pinned; numbers are not comparable")

    # -- processes ---------------------------------------------------------------------------

    def start_sim(self, name: str, model: str, options: Mapping[str, object]) -> Server:
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "gateway.cli.main",
            "sim",
            "--port",
            str(port),
            "--model",
            model,
            "--max-num-seqs",
            "1024",
        ]
        for key, value in options.items():
            argv += [f"--{key}", str(value)]
        return self.procs.server(name, pinned(self.load_core, argv), port=port)

    def start_gateway(
        self,
        fast: Server,
        stream: Server,
        *,
        policies: bool = True,
        non_stream: str | None = None,
        traces_to: str | None = None,
        cache: str | None = None,
        redis: Server | None = None,
        limits: str | None = None,
        source: tuple[str, Path] | None = None,
    ) -> tuple[Server, Path]:
        """The gateway with its default policies on (retries, breakers, health checks, stream
        resumption's transcript, vLLM load scraping, decision logging), or with every policy
        that can be switched off switched off: the difference is what the router adds.
        `non_stream` sets the routes' mode (default: the plan's, else the config's);
        `traces_to`, an OTLP/HTTP endpoint, turns tracing on with every request sampled;
        `cache`, a backend, turns the response cache on (`redis`: shared through `redis`);
        `limits` (a row's name) gives the demo key every per-key limit, far above the load
        (each request checks all four and charges them: in process, or through `redis`);
        `source` (a label, a source tree) runs another build of the gateway (bench/compare.py)."""
        name = "gateway" if policies else "gateway-bare"
        if source is not None:
            name += f"-{source[0]}"
        if non_stream is not None:
            name += f"-{non_stream}"
        if traces_to is not None:
            name += "-traced"
        if cache is not None:
            name += f"-cache-{cache}"
        if limits is not None:
            name += f"-{limits}"
        port = free_port()
        config = self.workdir / f"{name}.yaml"
        route_extra: dict[str, Any] = {}
        backend_extra: dict[str, Any] = {}
        top_extra: dict[str, Any] = {}
        if not policies:
            route_extra = {
                "retries": {"attempts": 1},
                "health": {"enabled": False},
                "resume": {"enabled": False},
            }
            backend_extra = {"scrape_metrics": False}
            top_extra = {"load_scrape": {"enabled": False}}

        mode = non_stream or self.plan.non_stream
        if mode is not None:
            route_extra["non_stream"] = mode
        if traces_to is not None:
            top_extra["tracing"] = {"enabled": True, "endpoint": traces_to, "sample_ratio": 1.0}
        if cache is not None:
            top_extra["cache"] = {"enabled": True, "backend": cache}
        if redis is not None:
            top_extra["redis"] = {"url": redis.url, "key_prefix": "vgate-bench"}
            if limits == "limits-redis-py":
                top_extra["redis"]["request_client"] = "redis-py"
        keys_file = KEYS_FILE
        if limits is not None:
            keys_file = self.workdir / f"{name}.keys.yaml"
            keys_file.write_text(json.dumps({"keys": [{**DEMO_KEY_ENTRY, "limits": BENCH_LIMITS}]}))

        def route(model: str, backend: str, url: str) -> dict[str, Any]:
            return {
                "name": model,
                **route_extra,
                "backends": [{"name": backend, "provider": "vllm", "url": url, **backend_extra}],
            }

        # JSON is YAML: no YAML writer needed here.
        config.write_text(
            json.dumps(
                {
                    # No drain delay: bench/procs.py stops a server within 5 s.
                    "server": {
                        "host": "127.0.0.1",
                        "port": port,
                        "access_log": True,
                        "drain_delay_s": 0,
                    },
                    "keys": {"file": str(keys_file)},
                    "models": [
                        route(FAST_MODEL, "sim-fast", fast.url),
                        route(STREAM_MODEL, "sim-stream", stream.url),
                    ],
                    **top_extra,
                },
                indent=2,
            )
        )
        access_log = self.workdir / f"{name}.access.jsonl"
        argv = [sys.executable, "-m", "gateway.cli.main", "serve", "--config", str(config)]
        # `python -m` puts the working directory first on sys.path: another build's tree
        # is imported by running there.
        gateway = self.procs.server(
            name,
            pinned(self.gateway_core, argv),
            port=port,
            stdout_path=access_log,
            cwd=source[1] if source is not None else None,
        )
        return gateway, access_log

    # -- phases ------------------------------------------------------------------------------

    def _wrk(
        self,
        label: str,
        url: str,
        headers: Mapping[str, str],
        concurrency: int,
        duration_s: float,
        server: Server | None,
        body: bytes = NONSTREAM_BODY,
    ) -> WrkResult:
        result = self.wrk.run(
            url + CHAT_PATH, body, headers, concurrency=concurrency, duration_s=duration_s
        )
        if result.error_count:
            status, answer = http(url + CHAT_PATH, body, headers)
            tail = f"\n{server.name} log:\n{server.log_tail()}" if server else ""
            raise BenchError(
                f"{label}: wrk saw errors {result.errors} in {result.requests} requests "
                f"(a request now gets {status}: {answer[:200]!r}){tail}"
            )
        if result.requests == 0:
            raise BenchError(f"{label}: wrk completed no requests")
        return result

    def wrk_phase(
        self,
        mode: str,
        target: str,
        server: Server,
        url: str,
        headers: Mapping[str, str],
        concurrency: int,
        observed: Sequence[Server],
        measured: Server | None,
        body: bytes = NONSTREAM_BODY,
    ) -> Phase:
        label = f"{mode} c={concurrency} {target}"
        warm = self._wrk(
            label + " (warm-up)", url, headers, concurrency, self.plan.warmup_s, server, body
        )
        result, acct = accounted(
            observed,
            lambda: self._wrk(label, url, headers, concurrency, self.plan.duration_s, server, body),
        )
        phase = Phase(
            mode,
            target,
            concurrency,
            result.requests,
            result.requests,
            result.rps,
            result.p50_ms,
            result.p99_ms,
            accounting=acct,
            raw={**result.to_json(), "warmup_requests": warm.requests},
        )
        if measured is not None:
            self._cpu(phase, measured, acct, result.requests)
        return phase

    def stream_phase(
        self,
        target: str,
        server: Server,
        url: str,
        headers: Mapping[str, str],
        concurrency: int,
        observed: Sequence[Server],
        measured: Server | None,
    ) -> Phase:
        label = f"stream c={concurrency} {target}"
        argv = streamload_argv(
            url, STREAM_BODY, headers, concurrency, self.plan.duration_s, self.plan.warmup_s
        )
        timeout = self.plan.duration_s + self.plan.warmup_s + 60
        done, acct = accounted(
            observed,
            lambda: self.procs.run(pinned(self.load_core, argv), timeout_s=timeout, cwd=REPO),
        )
        if done.returncode != 0:
            raise BenchError(f"{label}: streamload failed: {done.stderr.decode()[-2000:]}")
        data: dict[str, Any] = json.loads(done.stdout)
        if data["errors"]:
            tail = f"\n{server.name} log:\n{server.log_tail()}"
            raise BenchError(
                f"{label}: errors {data['errors']} in {data['requests_total']} streams{tail}"
            )
        if data["requests"] == 0:
            raise BenchError(f"{label}: no stream completed")
        phase = Phase(
            "stream",
            target,
            concurrency,
            data["requests"],
            data["requests_total"],
            data["rps"],
            data["total_p50_ms"],
            data["total_p99_ms"],
            ttft_p50_ms=data["ttft_p50_ms"],
            ttft_p99_ms=data["ttft_p99_ms"],
            server_timing_gateway_p50_ms=data["server_timing_gateway_p50_ms"],
            accounting=acct,
            raw=data,
        )
        if measured is not None:
            # The warm-up streams ran inside the same process: count them too.
            self._cpu(phase, measured, acct, data["requests_total"])
        return phase

    def _cpu(self, phase: Phase, server: Server, acct: Accounting, requests: int) -> None:
        spent = acct.servers_s[server.name]
        phase.cpu_us_per_request = round(spent / max(requests, 1) * 1e6, 1)
        phase.cpu_core_share = round(spent / acct.wall_s, 3) if acct.wall_s > 0 else None

    def note(self, phase: Phase) -> None:
        self.phases.append(phase)
        acct = phase.accounting
        line = (
            f"  {phase.mode:<10} c={phase.concurrency:<3} {phase.target:<14} "
            f"{phase.rps:>9,.0f} req/s  p50 {_f(phase.p50_ms)} ms  p99 {_f(phase.p99_ms)} ms"
        )
        if phase.ttft_p50_ms is not None:
            line += f"  ttft p50 {_f(phase.ttft_p50_ms)} ms"
        if phase.cpu_us_per_request is not None:
            line += f"  cpu {phase.cpu_us_per_request:,.0f} us/req"
        print(line, file=sys.stderr, flush=True)
        if acct is not None and acct.wall_s > 0:
            load_side = (
                sum(v for k, v in acct.servers_s.items() if k.startswith(("sim", "redis")))
                + acct.load_s
            ) / acct.wall_s
            if load_side > 0.9 and (phase.target != "direct" or phase.mode == "stream"):
                self.warnings.append(
                    f"{phase.mode} c={phase.concurrency} {phase.target}: core {self.load_core} "
                    f"(worker + load generator) was {load_side:.0%} busy: the load side, not "
                    "the gateway, may bound this phase"
                )
            other = acct.other_s / acct.wall_s
            if other > 0.15:
                self.warnings.append(
                    f"{phase.mode} c={phase.concurrency} {phase.target}: other processes on "
                    f"this machine used {other:.0%} of a core during the phase; its numbers "
                    "are disturbed"
                )

    # -- the whole run -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        plan = self.plan
        started = datetime.now(UTC)
        (busy, _), wall = _system_busy_s(), time.monotonic()
        time.sleep(1.0)
        busy_cores = (_system_busy_s()[0] - busy) / (time.monotonic() - wall)
        self.checks["cores_busy_before_run"] = round(busy_cores, 2)
        if busy_cores > 0.2:
            self.warnings.append(
                f"the machine was already busy before the run ({busy_cores:.1f} "
                "cores in use by other processes): numbers may be disturbed"
            )
        print("bench: starting workers and the gateway", file=sys.stderr, flush=True)
        fast = self.start_sim("sim-fast", FAST_MODEL, {})
        stream = self.start_sim("sim-stream", STREAM_MODEL, STREAM_SIM)
        gateway, access_log = self.start_gateway(fast, stream)

        check_completion("direct", fast.url, JSON_HEADERS)
        check_stream("direct", stream.url, JSON_HEADERS)
        check_completion("gateway", gateway.url, AUTH_HEADERS)
        check_stream("gateway", gateway.url, AUTH_HEADERS)
        status, _ = http(gateway.url + CHAT_PATH, NONSTREAM_BODY, JSON_HEADERS)
        if status != 401:
            raise BenchError(
                f"the gateway answered {status} to a request without a key: "
                "auth must be on for the benchmark"
            )
        self.checks["auth_rejects_missing_key"] = True

        observed = [gateway, fast, stream]
        print(
            f"bench: {plan.duration_s:g} s per phase, warm-up {plan.warmup_s:g} s",
            file=sys.stderr,
            flush=True,
        )
        for c in plan.concurrencies:
            self.note(
                self.wrk_phase(
                    "non-stream", "direct", fast, fast.url, JSON_HEADERS, c, observed, None
                )
            )
            self.note(
                self.wrk_phase(
                    "non-stream",
                    "gateway",
                    gateway,
                    gateway.url,
                    AUTH_HEADERS,
                    c,
                    observed,
                    gateway,
                )
            )
        for c in plan.concurrencies:
            self.note(
                self.stream_phase("direct", stream, stream.url, JSON_HEADERS, c, observed, None)
            )
            self.note(
                self.stream_phase(
                    "gateway", gateway, gateway.url, AUTH_HEADERS, c, observed, gateway
                )
            )

        self.check_observability(gateway, access_log)
        self.procs.stop(gateway.popen)

        # The router's own cost: the same load with the switchable policies off.
        bare, _ = self.start_gateway(fast, stream, policies=False)
        check_completion("gateway-bare", bare.url, AUTH_HEADERS)
        c = TARGET_RPS_CONCURRENCY
        observed_bare = [bare, fast, stream]
        self.note(
            self.wrk_phase(
                "non-stream", "policies-off", bare, bare.url, AUTH_HEADERS, c, observed_bare, bare
            )
        )
        self.note(
            self.stream_phase("policies-off", bare, bare.url, AUTH_HEADERS, c, observed_bare, bare)
        )
        self.procs.stop(bare.popen)

        # Non-streaming answers are assembled from a stream by default (stall protection);
        # the same load with the old whole exchange shows what that costs.
        if plan.non_stream is None:
            whole, _ = self.start_gateway(fast, stream, non_stream="passthrough")
            check_completion("gateway-passthrough", whole.url, AUTH_HEADERS)
            observed_whole = [whole, fast, stream]
            self.note(
                self.wrk_phase(
                    "non-stream",
                    "passthrough",
                    whole,
                    whole.url,
                    AUTH_HEADERS,
                    c,
                    observed_whole,
                    whole,
                )
            )
            self.procs.stop(whole.popen)
        self.run_traced(fast, stream)
        self.run_limited(fast, stream)
        self.run_cached(fast, stream)
        self.procs.stop(stream.popen)
        print("bench: server.workers 1 and 2", file=sys.stderr, flush=True)
        self.worker_rows = workers.run(
            self.procs,
            self.wrk.binary,
            self.workdir,
            duration_s=plan.duration_s,
            warmup_s=plan.warmup_s,
            concurrency=TARGET_RPS_CONCURRENCY,
        )
        if plan.transports:
            self.run_transports(fast)
        self.procs.stop(fast.popen)

        return {
            "schema": 1,
            "started_at": started.isoformat(timespec="seconds"),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "plan": plan.__dict__,
            "machine": machine_info(self.wrk.binary),
            "setup": {
                "gateway_core": self.gateway_core,
                "load_core": self.load_core,
                "gateway": "one `vgate serve` process; auth (demo key), JSON access log to a "
                "file, /metrics on",
                "sim_fast": {
                    "model": FAST_MODEL,
                    "ttft_ms": 0,
                    "tokens_per_s": 0,
                    "max_tokens": NONSTREAM_MAX_TOKENS,
                },
                "sim_stream": {
                    "model": STREAM_MODEL,
                    **STREAM_SIM,
                    "max_tokens": STREAM_MAX_TOKENS,
                },
                "load": {"non-stream": "wrk -t1 (Lua POST)", "stream": "bench/streamload.py"},
                "cache": "the gateway with `cache: {enabled: true, backend: B}` (redis: a "
                "redis-server of the run's own on the load core); proxied: the non-streaming "
                "request (no temperature: not cacheable); hit: the same with temperature 0",
            },
            "rows": self.rows(),
            "router_cost": self.router_cost(),
            "non_stream_modes": self.non_stream_modes(),
            "tracing_cost": self.tracing_cost(),
            "limits": self.limits_rows(),
            "cache": self.cache_rows(),
            "targets": self.targets(),
            "transports": self.transport_rows,
            "workers": self.worker_rows,
            "checks": self.checks,
            "warnings": self.warnings,
            "phases": [p.to_json() for p in self.phases],
        }

    def check_observability(self, gateway: Server, access_log: Path) -> None:
        """The access log and the metrics were on and saw the load: else the run is invalid."""
        served = sum(p.requests_total for p in self.phases if p.target == "gateway")
        deadline = time.monotonic() + 5
        lines = 0
        while time.monotonic() < deadline:
            with access_log.open("rb") as log:
                lines = sum(1 for _ in log)
            if lines >= served:
                break
            time.sleep(0.1)
        self.checks["access_log_lines"] = lines
        self.checks["gateway_requests_counted_by_load"] = served
        if lines < served:
            raise BenchError(
                f"the access log has {lines} lines for {served} requests: "
                "it must stay on for the benchmark"
            )
        counted = scrape_counter(gateway.url, "vgate_requests_total")
        self.checks["metrics_vgate_requests_total"] = counted
        if counted is None:
            self.warnings.append("vgate_requests_total not found in the gateway's /metrics")
        elif counted < served:
            raise BenchError(f"/metrics counted {counted:.0f} requests for {served}")

    def run_traced(self, fast: Server, stream: Server) -> None:
        """The same loads with tracing on and every request sampled (each exports a span per
        request and one per upstream attempt) to a receiver that keeps nothing."""
        port = free_port()
        argv = [sys.executable, "-m", "bench.otlpsink", "--port", str(port)]
        sink = self.procs.server(
            "otlp-sink", pinned(self.load_core, argv), port=port, ready_path="/count"
        )
        traced, _ = self.start_gateway(fast, stream, traces_to=f"{sink.url}/v1/traces")
        check_completion("gateway-traced", traced.url, AUTH_HEADERS)
        c = TARGET_RPS_CONCURRENCY
        observed = [traced, fast, stream, sink]
        self.note(
            self.wrk_phase(
                "non-stream", "traced", traced, traced.url, AUTH_HEADERS, c, observed, traced
            )
        )
        self.note(
            self.stream_phase("traced", traced, traced.url, AUTH_HEADERS, c, observed, traced)
        )
        self.procs.stop(traced.popen)  # its exporter flushes what is queued on the way out
        with urllib.request.urlopen(sink.url + "/count", timeout=5) as answer:
            received = json.loads(answer.read())
        self.checks["traced_exports_received"] = received
        if not received["exports"]:
            self.warnings.append("tracing on: the receiver got no spans; the traced rows are void")
        self.procs.stop(sink.popen)

    def tracing_cost(self) -> list[dict[str, Any]]:
        """Gateway CPU per request with tracing off (the default) and on at a 100% sample."""
        c = TARGET_RPS_CONCURRENCY
        out = []
        for mode in ("non-stream", "stream"):
            off, on = self.find(mode, "gateway", c), self.find(mode, "traced", c)
            if off is None or on is None:
                continue
            out.append(
                {
                    "mode": mode,
                    "concurrency": c,
                    "off_rps": off.rps,
                    "on_rps": on.rps,
                    "off_cpu_us_per_request": off.cpu_us_per_request,
                    "on_cpu_us_per_request": on.cpu_us_per_request,
                    "tracing_cpu_us_per_request": _diff(
                        on.cpu_us_per_request, off.cpu_us_per_request
                    ),
                    "off_ttft_p50_ms": off.ttft_p50_ms,
                    "on_ttft_p50_ms": on.ttft_p50_ms,
                }
            )
        return out

    # -- per-key limits -----------------------------------------------------------------------

    def run_limited(self, fast: Server, stream: Server) -> None:
        """The demo key with every limit (none refusing): in process, then shared through a
        redis-server of the run's own (on the load core, like the workers), at c=16: what
        checking and charging a key's limits costs, and what Redis adds to it."""
        c = TARGET_RPS_CONCURRENCY
        for target in LIMITS_ROWS:
            redis = None
            if target != "limits-local":
                redis = self.procs.redis(target, self.load_core)
                if redis is None:
                    self.warnings.append("redis-server is not installed: no limits-redis rows")
                    continue
            gateway, _ = self.start_gateway(fast, stream, limits=target, redis=redis)
            check_completion(gateway.name, gateway.url, AUTH_HEADERS)
            observed = [gateway, fast, stream, *([redis] if redis else [])]
            self.note(
                self.wrk_phase(
                    "non-stream", target, gateway, gateway.url, AUTH_HEADERS, c, observed, gateway
                )
            )
            self.note(
                self.stream_phase(target, gateway, gateway.url, AUTH_HEADERS, c, observed, gateway)
            )
            self.procs.stop(gateway.popen)
            if redis is not None:
                self.procs.stop(redis.popen)

    def limits_rows(self) -> list[dict[str, Any]]:
        """Per mode at c=16: no limits, limits in process, limits through Redis (with the
        pipelined client, and with redis-py's)."""
        c = TARGET_RPS_CONCURRENCY
        out = []
        for mode in ("non-stream", "stream"):
            none = self.find(mode, "gateway", c)
            local, shared, redis_py = (self.find(mode, target, c) for target in LIMITS_ROWS)
            if none is None or local is None or shared is None:
                continue
            out.append(
                {
                    "mode": mode,
                    "concurrency": c,
                    "none_rps": none.rps,
                    "local_rps": local.rps,
                    "redis_rps": shared.rps,
                    "redis_over_local_rps": _ratio(shared.rps, local.rps),
                    "redis_over_none_rps": _ratio(shared.rps, none.rps),
                    "none_cpu_us_per_request": none.cpu_us_per_request,
                    "local_cpu_us_per_request": local.cpu_us_per_request,
                    "redis_cpu_us_per_request": shared.cpu_us_per_request,
                    "redis_p50_ms": shared.p50_ms,
                    "local_p50_ms": local.p50_ms,
                    "redis_ttft_p50_ms": shared.ttft_p50_ms,
                    "local_ttft_p50_ms": local.ttft_p50_ms,
                    "redis_py_rps": redis_py.rps if redis_py else None,
                    "redis_py_over_local_rps": _ratio(redis_py.rps, local.rps)
                    if redis_py
                    else None,
                    "redis_py_cpu_us_per_request": redis_py.cpu_us_per_request
                    if redis_py
                    else None,
                }
            )
        return out

    # -- the response cache ------------------------------------------------------------------

    def run_cached(self, fast: Server, stream: Server) -> None:
        """The response cache on, each backend in turn, at c=16 and with one client: the
        proxied load (NONSTREAM_BODY asks for no temperature, so it is not cacheable and goes
        upstream) and then the same request asked deterministically (HIT_BODY, temperature 0),
        every one a hit after the first, through the same gateway process."""
        for backend in CACHE_BACKENDS:
            redis = None
            if backend == "redis":
                # On the load side's core, like the workers: what is measured is the gateway.
                redis = self.procs.redis("redis", self.load_core)
                if redis is None:
                    self.warnings.append(
                        "redis-server is not installed: no cache rows for the redis backend"
                    )
                    continue
            gateway, _ = self.start_gateway(fast, stream, cache=backend, redis=redis)
            check_completion(gateway.name, gateway.url, AUTH_HEADERS)
            self.prime_cache(gateway)
            observed = [gateway, fast, stream, *([redis] if redis else [])]
            for c in (CACHE_CPU_CONCURRENCY, CACHE_LATENCY_CONCURRENCY):
                for kind, body in (("proxied", NONSTREAM_BODY), ("hit", HIT_BODY)):
                    self.note(self.cache_phase(backend, kind, body, gateway, c, observed))
            self.procs.stop(gateway.popen)
            if redis is not None:
                self.procs.stop(redis.popen)

    def prime_cache(self, gateway: Server) -> None:
        """The first deterministic request is a miss that stores its answer: ask it again
        (bounded) until it is a hit, as the load will be; the proxied request must not be."""
        outcomes: list[str | None] = []
        deadline = time.monotonic() + 5
        while not outcomes or outcomes[-1] != "hit":
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{gateway.name}: a repeated deterministic request never became a cache "
                    f"hit (X-VGate-Cache: {outcomes[-5:]})"
                )
            outcomes.append(cache_outcome(gateway.url, HIT_BODY, AUTH_HEADERS))
            if outcomes[-1] != "hit":
                time.sleep(0.05)
        proxied = cache_outcome(gateway.url, NONSTREAM_BODY, AUTH_HEADERS)
        self.checks[f"{gateway.name}_x_vgate_cache"] = {"hit_body": outcomes, "proxied": proxied}
        if proxied == "hit":
            raise BenchError(f"{gateway.name}: the proxied request was answered from the cache")

    def cache_phase(
        self,
        backend: str,
        kind: str,
        body: bytes,
        gateway: Server,
        concurrency: int,
        observed: Sequence[Server],
    ) -> Phase:
        """One wrk phase through a cache-on gateway; /metrics' vgate_cache_hits_total around
        it (warm-up included) says whether its requests really were hits, or none were."""
        before = settled_cache_hits(gateway.url)
        phase = self.wrk_phase(
            "non-stream",
            f"cache-{backend}-{kind}",
            gateway,
            gateway.url,
            AUTH_HEADERS,
            concurrency,
            observed,
            gateway,
            body,
        )
        hits = settled_cache_hits(gateway.url) - before
        served = phase.requests + int(phase.raw["warmup_requests"])
        phase.raw["cache_hits_counted"] = hits
        label = f"cache {backend} {kind} c={concurrency}"
        if kind == "hit" and hits == 0:
            raise BenchError(f"{label}: /metrics counted no cache hit in {served} requests")
        if kind == "hit" and hits < served:
            self.warnings.append(
                f"{label}: /metrics counted {hits:.0f} cache hits for {served} requests: the "
                "rest were not hits (a store lookup slower than redis_timeout_s is a bypass)"
            )
        if kind == "proxied" and hits > 0:
            self.warnings.append(f"{label}: {hits:.0f} of the proxied requests were cache hits")
        return phase

    def cache_rows(self) -> list[dict[str, Any]]:
        """Per backend and concurrency: hits against proxied requests, same gateway, same run."""
        out = []
        for backend in CACHE_BACKENDS:
            for c in (CACHE_CPU_CONCURRENCY, CACHE_LATENCY_CONCURRENCY):
                proxied = self.find("non-stream", f"cache-{backend}-proxied", c)
                hit = self.find("non-stream", f"cache-{backend}-hit", c)
                if proxied is None or hit is None:
                    continue
                out.append(
                    {
                        "backend": backend,
                        "concurrency": c,
                        "proxied_rps": proxied.rps,
                        "hit_rps": hit.rps,
                        "proxied_p50_ms": proxied.p50_ms,
                        "proxied_p99_ms": proxied.p99_ms,
                        "hit_p50_ms": hit.p50_ms,
                        "hit_p99_ms": hit.p99_ms,
                        "proxied_cpu_us_per_request": proxied.cpu_us_per_request,
                        "hit_cpu_us_per_request": hit.cpu_us_per_request,
                        "hit_cpu_core_share": hit.cpu_core_share,
                        "hit_requests": hit.requests + int(hit.raw["warmup_requests"]),
                        "cache_hits_counted": hit.raw["cache_hits_counted"],
                    }
                )
        return out

    # -- transports --------------------------------------------------------------------------

    def run_transports(self, fast: Server) -> None:
        c = self.plan.transport_concurrency
        print(f"bench: upstream clients, bare proxies, c={c}", file=sys.stderr, flush=True)
        for client in transports.CLIENTS:
            env = {"PYTHONPATH": os.pathsep.join([str(PYDEPS_DIR), str(REPO)])}
            if not self.transport_available(client, env):
                self.transport_rows.append(
                    {
                        "client": client,
                        "label": transports.LABELS[client],
                        "skipped": "the package could not be installed",
                    }
                )
                print(f"  {client}: skipped (not installable)", file=sys.stderr)
                continue
            port = free_port()
            argv = [
                sys.executable,
                "-m",
                "bench.transports",
                "--client",
                client,
                "--port",
                str(port),
                "--upstream",
                fast.url,
            ]
            proxy = self.procs.server(
                f"proxy-{client}", pinned(self.gateway_core, argv), port=port, env=env
            )
            try:
                check_completion(f"proxy {client}", proxy.url, JSON_HEADERS)
                phase = self.wrk_phase(
                    "transport", client, proxy, proxy.url, JSON_HEADERS, c, [proxy, fast], proxy
                )
            finally:
                self.procs.stop(proxy.popen)
            self.note(phase)
            self.transport_rows.append(
                {
                    "client": client,
                    "label": transports.LABELS[client],
                    "concurrency": c,
                    "rps": phase.rps,
                    "p50_ms": phase.p50_ms,
                    "p99_ms": phase.p99_ms,
                    "cpu_us_per_request": phase.cpu_us_per_request,
                    "cpu_core_share": phase.cpu_core_share,
                }
            )

    def transport_available(self, client: str, env: Mapping[str, str]) -> bool:
        test = [sys.executable, "-c", f"import {transports.IMPORTS[client]}"]
        if self.procs.run(test, timeout_s=60, env=env).returncode == 0:
            return True
        if client not in transports.OPTIONAL:
            return False
        package = transports.OPTIONAL[client][1]
        # Beside the project's venv, not in it: a folder on the proxy's PYTHONPATH only.
        print(f"  installing {package} into bench/.cache/pydeps", file=sys.stderr)
        install = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(PYDEPS_DIR),
            package,
        ]
        with contextlib.suppress(BenchError):
            self.procs.run(install, timeout_s=180)
        return self.procs.run(test, timeout_s=60, env=env).returncode == 0

    # -- report ------------------------------------------------------------------------------

    def find(self, mode: str, target: str, c: int) -> Phase | None:
        for phase in self.phases:
            if (phase.mode, phase.target, phase.concurrency) == (mode, target, c):
                return phase
        return None

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for mode in ("non-stream", "stream"):
            for c in self.plan.concurrencies:
                direct, gw = self.find(mode, "direct", c), self.find(mode, "gateway", c)
                if direct is None or gw is None:
                    continue
                rows.append(
                    {
                        "mode": mode,
                        "concurrency": c,
                        "direct_rps": direct.rps,
                        "gateway_rps": gw.rps,
                        "direct_p50_ms": direct.p50_ms,
                        "direct_p99_ms": direct.p99_ms,
                        "gateway_p50_ms": gw.p50_ms,
                        "gateway_p99_ms": gw.p99_ms,
                        "added_p50_ms": _diff(gw.p50_ms, direct.p50_ms),
                        "added_p99_ms": _diff(gw.p99_ms, direct.p99_ms),
                        "direct_ttft_p50_ms": direct.ttft_p50_ms,
                        "gateway_ttft_p50_ms": gw.ttft_p50_ms,
                        "added_ttft_p50_ms": _diff(gw.ttft_p50_ms, direct.ttft_p50_ms),
                        "gateway_cpu_us_per_request": gw.cpu_us_per_request,
                        "gateway_cpu_core_share": gw.cpu_core_share,
                        "server_timing_gateway_p50_ms": gw.server_timing_gateway_p50_ms,
                    }
                )
        return rows

    def router_cost(self) -> list[dict[str, Any]]:
        """Gateway CPU per request with every policy on against the switchable ones off."""
        out = []
        c = TARGET_RPS_CONCURRENCY
        for mode in ("non-stream", "stream"):
            on, off = self.find(mode, "gateway", c), self.find(mode, "policies-off", c)
            if on is None or off is None:
                continue
            out.append(
                {
                    "mode": mode,
                    "concurrency": c,
                    "policies_on_rps": on.rps,
                    "policies_off_rps": off.rps,
                    "policies_on_cpu_us_per_request": on.cpu_us_per_request,
                    "policies_off_cpu_us_per_request": off.cpu_us_per_request,
                    "router_policies_cpu_us_per_request": _diff(
                        on.cpu_us_per_request, off.cpu_us_per_request
                    ),
                    "policies_on_ttft_p50_ms": on.ttft_p50_ms,
                    "policies_off_ttft_p50_ms": off.ttft_p50_ms,
                }
            )
        return out

    def non_stream_modes(self) -> list[dict[str, Any]]:
        """Non-streaming through the gateway: assembled from a stream (the default) and
        passed through whole, at the target concurrency."""
        c = TARGET_RPS_CONCURRENCY
        out = []
        for label, target in (("assemble (default)", "gateway"), ("passthrough", "passthrough")):
            phase = self.find("non-stream", target, c)
            if phase is not None:
                out.append(
                    {
                        "non_stream": label,
                        "concurrency": c,
                        "rps": phase.rps,
                        "cpu_us_per_request": phase.cpu_us_per_request,
                        "p50_ms": phase.p50_ms,
                    }
                )
        return out

    def targets(self) -> list[dict[str, Any]]:
        out = []
        rps = self.find("non-stream", "gateway", TARGET_RPS_CONCURRENCY)
        out.append(
            {
                "name": f"non-streaming req/s through the gateway at c={TARGET_RPS_CONCURRENCY}",
                "target": f">= {TARGET_RPS:,.0f}",
                "value": rps.rps if rps else None,
                "pass": bool(rps and rps.rps >= TARGET_RPS) if rps else None,
            }
        )
        direct = self.find("stream", "direct", TARGET_TTFT_CONCURRENCY)
        gw = self.find("stream", "gateway", TARGET_TTFT_CONCURRENCY)
        added = _diff(gw.ttft_p50_ms, direct.ttft_p50_ms) if gw and direct else None
        out.append(
            {
                "name": f"added time to first token, p50, {TARGET_TTFT_CONCURRENCY} streams (ms)",
                "target": f"<= {TARGET_ADDED_TTFT_MS:g}",
                "value": added,
                "pass": (added <= TARGET_ADDED_TTFT_MS) if added is not None else None,
            }
        )
        c = TARGET_RPS_CONCURRENCY
        local, shared = (self.find("non-stream", target, c) for target in LIMITS_ROWS[:2])
        ratio = _ratio(shared.rps, local.rps) if local and shared else None
        out.append(
            {
                "name": f"req/s with limits on Redis over limits in process, c={c}",
                "target": f">= {TARGET_REDIS_LIMITS_RATIO:g}",
                "value": ratio,
                "pass": (ratio >= TARGET_REDIS_LIMITS_RATIO) if ratio is not None else None,
            }
        )
        one = next((row for row in self.worker_rows if row["workers"] == 1), None)
        two = next((row for row in self.worker_rows if row["workers"] == 2), None)
        cpu_ratio = (
            _ratio(two["cpu_us_per_request"], one["cpu_us_per_request"]) if one and two else None
        )
        out.append(
            {
                "name": "gateway CPU per request, 2 workers over 1",
                "target": f"<= {TARGET_WORKERS_CPU_RATIO:g}",
                "value": cpu_ratio,
                "pass": (cpu_ratio <= TARGET_WORKERS_CPU_RATIO) if cpu_ratio is not None else None,
            }
        )
        shares = [share for share in (two["shares"].values() if two else []) if share is not None]
        low, high = TARGET_WORKER_SHARE
        out.append(
            {
                "name": "each worker's share of the requests, 2 workers",
                "target": f"{low:.0%}-{high:.0%}",
                "value": " / ".join(f"{share:.0%}" for share in shares) or None,
                "pass": (len(shares) == 2 and all(low <= share <= high for share in shares))
                if two
                else None,
            }
        )
        for backend in CACHE_BACKENDS:
            hit = self.find("non-stream", f"cache-{backend}-hit", CACHE_LATENCY_CONCURRENCY)
            out.append(
                {
                    "name": f"cache hit p50, {backend} backend, c={CACHE_LATENCY_CONCURRENCY} (ms)",
                    "target": f"<= {TARGET_CACHE_HIT_P50_MS:g}",
                    "value": hit.p50_ms if hit else None,
                    "pass": (hit.p50_ms <= TARGET_CACHE_HIT_P50_MS)
                    if hit and hit.p50_ms is not None
                    else None,
                }
            )
        for backend in CACHE_BACKENDS:
            c = CACHE_CPU_CONCURRENCY
            hit = self.find("non-stream", f"cache-{backend}-hit", c)
            proxied = self.find("non-stream", f"cache-{backend}-proxied", c)
            hit_cpu = hit.cpu_us_per_request if hit else None
            proxied_cpu = proxied.cpu_us_per_request if proxied else None
            out.append(
                {
                    "name": f"gateway CPU per cache hit, {backend} backend, c={c} (us)",
                    "target": "< proxied"
                    + ("" if proxied_cpu is None else f" ({proxied_cpu:,.0f})"),
                    "value": hit_cpu,
                    "pass": (hit_cpu < proxied_cpu)
                    if hit_cpu is not None and proxied_cpu is not None
                    else None,
                }
            )
        return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


# ------------------------------------------------------------------------------------------
# Output


def render_table(report: dict[str, Any]) -> str:
    header = [
        "mode",
        "c",
        "direct req/s",
        "gw req/s",
        "direct p50/p99 ms",
        "gw p50/p99 ms",
        "added p50 ms",
        "TTFT p50 d/gw ms",
        "added TTFT p50 ms",
        "gw CPU us/req",
        "gw core",
    ]
    body = []
    for r in report["rows"]:
        ttft = (
            f"{_f(r['direct_ttft_p50_ms'])} / {_f(r['gateway_ttft_p50_ms'])}"
            if r["direct_ttft_p50_ms"] is not None
            else "-"
        )
        share = r["gateway_cpu_core_share"]
        body.append(
            [
                r["mode"],
                str(r["concurrency"]),
                _f(r["direct_rps"], 0),
                _f(r["gateway_rps"], 0),
                f"{_f(r['direct_p50_ms'])} / {_f(r['direct_p99_ms'])}",
                f"{_f(r['gateway_p50_ms'])} / {_f(r['gateway_p99_ms'])}",
                _f(r["added_p50_ms"]),
                ttft,
                _f(r["added_ttft_p50_ms"]),
                _f(r["gateway_cpu_us_per_request"], 0),
                "-" if share is None else f"{share:.0%}",
            ]
        )
    lines = [_grid(header, body)]
    lines.append(
        "  stream p50/p99 is the whole stream; TTFT: time to the first content event; "
        "gw core: the gateway's CPU time / wall time"
    )
    if report.get("router_cost"):
        lines.append("")
        lines.append(
            "Router policies (retries, breakers, health, resumption, load scraping, decision "
            "log), gateway CPU per request:"
        )
        rows = [
            [
                r["mode"],
                str(r["concurrency"]),
                _f(r["policies_on_rps"], 0),
                _f(r["policies_off_rps"], 0),
                _f(r["policies_on_cpu_us_per_request"], 0),
                _f(r["policies_off_cpu_us_per_request"], 0),
                _f(r["router_policies_cpu_us_per_request"], 0),
            ]
            for r in report["router_cost"]
        ]
        lines.append(
            _grid(["mode", "c", "on req/s", "off req/s", "on us/req", "off us/req", "cost"], rows)
        )
    if len(report.get("non_stream_modes", [])) > 1:
        lines.append("")
        lines.append("Non-streaming answers assembled from a stream (stall protection) or whole:")
        rows = [
            [
                m["non_stream"],
                str(m["concurrency"]),
                _f(m["rps"], 0),
                _f(m["p50_ms"], 2),
                _f(m["cpu_us_per_request"], 0),
            ]
            for m in report["non_stream_modes"]
        ]
        lines.append(_grid(["non_stream", "c", "req/s", "p50 ms", "us/req"], rows))
    if report.get("workers"):
        lines.append("")
        pinned_note = (
            "gateway on cores 0-1, wrk and the sim apart"
            if report["workers"][0].get("pinned")
            else "nothing pinned: fewer than 4 cores, the load shares them"
        )
        lines.append(f"server.workers, non-streaming at c=16 ({pinned_note}):")
        lines.append(workers.table(report["workers"]))
    if report.get("limits"):
        lines.append("")
        lines.append(
            "Per-key limits (the demo key with rpm, tpm, tokens a day and concurrency, none "
            "refusing): none, in process, through Redis (vgate's pipelined client, the default; "
            "then redis-py's, `redis.request_client: redis-py`):"
        )
        rows = [
            [
                r["mode"],
                str(r["concurrency"]),
                f"{_f(r['none_rps'], 0)} / {_f(r['local_rps'], 0)} / {_f(r['redis_rps'], 0)}"
                f" / {_f(r['redis_py_rps'], 0)}",
                f"{_f(r['redis_over_local_rps'])} / {_f(r['redis_py_over_local_rps'])}",
                f"{_f(r['none_cpu_us_per_request'], 0)} / {_f(r['local_cpu_us_per_request'], 0)}"
                f" / {_f(r['redis_cpu_us_per_request'], 0)}"
                f" / {_f(r['redis_py_cpu_us_per_request'], 0)}",
                f"{_f(r['local_ttft_p50_ms'])} / {_f(r['redis_ttft_p50_ms'])}"
                if r["local_ttft_p50_ms"] is not None
                else f"{_f(r['local_p50_ms'])} / {_f(r['redis_p50_ms'])}",
            ]
            for r in report["limits"]
        ]
        lines.append(
            _grid(
                [
                    "mode",
                    "c",
                    "req/s none / local / redis / redis-py",
                    "(redis, redis-py)/local",
                    "us/req none / local / redis / redis-py",
                    "p50 (TTFT) ms local / redis",
                ],
                rows,
            )
        )
    if report.get("tracing_cost"):
        lines.append("")
        lines.append(
            "Tracing (a span per request and per upstream attempt, exported over OTLP/HTTP), "
            "off against on with every request sampled:"
        )
        rows = [
            [
                r["mode"],
                str(r["concurrency"]),
                _f(r["off_rps"], 0),
                _f(r["on_rps"], 0),
                _f(r["off_cpu_us_per_request"], 0),
                _f(r["on_cpu_us_per_request"], 0),
                _f(r["tracing_cpu_us_per_request"], 0),
                f"{_f(r['off_ttft_p50_ms'])} / {_f(r['on_ttft_p50_ms'])}"
                if r["off_ttft_p50_ms"] is not None
                else "-",
            ]
            for r in report["tracing_cost"]
        ]
        lines.append(
            _grid(
                [
                    "mode",
                    "c",
                    "off req/s",
                    "on req/s",
                    "off us/req",
                    "on us/req",
                    "cost",
                    "TTFT p50 off/on ms",
                ],
                rows,
            )
        )
    if report.get("cache"):
        lines.append("")
        lines.append(
            "Response cache on: proxied requests (not cacheable) against hits (the same "
            "request at temperature 0), same gateway:"
        )
        rows = [
            [
                r["backend"],
                str(r["concurrency"]),
                _f(r["proxied_rps"], 0),
                _f(r["hit_rps"], 0),
                f"{_f(r['proxied_p50_ms'])} / {_f(r['proxied_p99_ms'])}",
                f"{_f(r['hit_p50_ms'])} / {_f(r['hit_p99_ms'])}",
                _f(r["proxied_cpu_us_per_request"], 0),
                _f(r["hit_cpu_us_per_request"], 0),
                f"{r['cache_hits_counted']:,.0f} / {r['hit_requests']:,}",
            ]
            for r in report["cache"]
        ]
        lines.append(
            _grid(
                [
                    "backend",
                    "c",
                    "proxied req/s",
                    "hit req/s",
                    "proxied p50/p99 ms",
                    "hit p50/p99 ms",
                    "proxied us/req",
                    "hit us/req",
                    "hits counted",
                ],
                rows,
            )
        )
    compared = report.get("compare")
    if compared and "head_over_base" in compared:
        from bench.compare import render as render_compare  # bench.compare imports this module

        lines.append("")
        lines.append(render_compare(compared, compared["base"]))
    for t in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "N/A "}[t["pass"]]
        value = t["value"]
        if value is None:
            value = "-"
        elif not isinstance(value, str):
            value = f"{value:,.3f}".rstrip("0").rstrip(".")
        lines.append(f"{verdict}  {t['name']}: {value} (target {t['target']})")
    if report["transports"]:
        lines.append("")
        lines.append(
            "Upstream HTTP client, bare Starlette proxy on one core, wrk "
            f"c={report['plan']['transport_concurrency']}:"
        )
        rows = []
        for t in report["transports"]:
            if "skipped" in t:
                rows.append([t["label"], "skipped", "", "", "", t["skipped"]])
                continue
            rows.append(
                [
                    t["label"],
                    _f(t["rps"], 0),
                    _f(t["p50_ms"]),
                    _f(t["p99_ms"]),
                    _f(t["cpu_us_per_request"], 0),
                    f"{t['cpu_core_share']:.0%}",
                ]
            )
        lines.append(_grid(["client", "req/s", "p50 ms", "p99 ms", "CPU us/req", "core"], rows))
    for warning in report["warnings"]:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def _grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def machine_info(wrk_binary: str) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    wrk_version = subprocess.run(
        [wrk_binary, "-v"], capture_output=True, text=True, check=False, timeout=10
    ).stdout.splitlines()
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": cores(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "packages": versions,
        "wrk": wrk_version[0] if wrk_version else None,
        "git_commit": commit.stdout.strip() if commit.returncode == 0 else None,
    }


def add_comparison(
    report: dict[str, Any], base: str, plan: Plan, procs: Processes, workdir: Path
) -> None:
    """This build against `base` side by side (bench/compare.py), and issue 15's two
    targets that are ratios against it. A base that cannot be had (a shallow clone) is a
    warning, not a failed run."""
    from bench import compare  # imports this module: not at the top

    print(f"bench: this build against {base}, side by side", file=sys.stderr, flush=True)
    workdir.mkdir()
    try:
        result = compare.compare(
            base,
            rounds=COMPARE_ROUNDS,
            duration_s=max(plan.duration_s / 2, 3.0),
            procs=procs,
            workdir=workdir,
        )
    except compare.RevisionMissing as exc:
        report["warnings"].append(f"no side-by-side comparison: {exc}")
        report["compare"] = {"base": base, "skipped": str(exc)}
        return
    report["compare"] = result
    ratios = result["head_over_base"]
    events = ratios["stream-event"]
    non_stream = ratios["non-stream"]
    report["targets"] += [
        {
            "name": f"CPU per stream event at c=16, this build over {base} (side by side)",
            "target": f"<= {TARGET_STREAM_EVENT_RATIO:g}",
            "value": round(events, 3),
            "pass": events <= TARGET_STREAM_EVENT_RATIO,
        },
        {
            "name": f"CPU per non-streaming request at c=16, this build over {base}",
            "target": f"<= {TARGET_NON_STREAM_RATIO:g}",
            "value": round(non_stream, 3),
            "pass": non_stream <= TARGET_NON_STREAM_RATIO,
        },
    ]


def write_report(report: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(report, indent=2) + "\n"
    path = RESULTS_DIR / f"{stamp}.json"
    path.write_text(text)
    (RESULTS_DIR / "latest.json").write_text(text)
    return path


# ------------------------------------------------------------------------------------------
# Entry point


def parse_plan(argv: Sequence[str] | None) -> tuple[Plan, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="vgate's benchmark: direct-to-worker vs through the gateway.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short smoke run (about 2 s per phase, no transports)",
    )
    parser.add_argument("--duration", type=float, help="seconds per measured phase (default 10)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per phase (default 1)")
    parser.add_argument(
        "--concurrency",
        type=int,
        action="append",
        help="concurrent clients; repeat (default: 1, 16, 64)",
    )
    parser.add_argument(
        "--transports",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compare upstream HTTP clients (default: on, off with --quick)",
    )
    parser.add_argument(
        "--non-stream",
        choices=("assemble", "passthrough"),
        help="the gateway routes' non_stream mode, to compare the two (default: the config's)",
    )
    parser.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="end with this build against --base side by side (default: on, off with --quick)",
    )
    parser.add_argument(
        "--base",
        default=BASELINE_REVISION,
        help=f"the git revision --compare runs beside this build (default {BASELINE_REVISION})",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the servers' logs and configs (the path is printed)",
    )
    args = parser.parse_args(argv)
    duration = args.duration if args.duration is not None else (2.0 if args.quick else 10.0)
    warmup = args.warmup if args.warmup is not None else 1.0
    if duration < 1 or warmup < 1:
        parser.error("--duration and --warmup are whole seconds, at least 1 (wrk's unit)")
    transports_on = args.transports if args.transports is not None else not args.quick
    plan = Plan(
        duration_s=float(round(duration)),
        warmup_s=float(round(warmup)),
        concurrencies=tuple(args.concurrency or (1, 16, 64)),
        transports=transports_on,
        non_stream=args.non_stream,
    )
    return plan, args


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vgate-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"bench: logs and configs kept in {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    plan, args = parse_plan(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # Even when started in the background, where the shell set SIGINT to ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        wrk_binary = ensure_wrk()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    with _workdir(args.keep_logs) as workdir:
        procs = Processes(workdir)
        try:
            report = Bench(plan, procs, wrk_binary, workdir).run()
            compare_on = args.compare if args.compare is not None else not args.quick
            if compare_on:
                add_comparison(report, args.base, plan, procs, workdir / "compare")
        except BenchError as exc:
            print(f"bench: FAILED: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()
    path = write_report(report)
    print()
    print(render_table(report))
    print(f"\nwrote {path.relative_to(REPO)} and bench/results/latest.json")
    failed = any(t["pass"] is False for t in report["targets"])
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
