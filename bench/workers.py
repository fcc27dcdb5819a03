"""What `server.workers` buys: the same non-streaming wrk load through 1 and 2 gateway processes.

    python bench/workers.py [--duration S] [--warmup S] [--concurrency C] [--balances] [--json F]

In front of one instant `vgate sim` (so the gateway's cost, not the worker's, dominates), a
gateway with `server.workers: 1`, then 2 (the parent deals connections out), each under wrk
at `concurrency` keep-alive connections; with --balances, 2 again with the kernel's ways of
spreading connections instead (`vgate serve --balance shared|reuseport`: every worker
accepting on one shared socket, one SO_REUSEPORT socket per worker). Rows:

- rps: requests per second;
- cpu_us_per_request: the gateway's CPU (utime + stime from /proc: the parent and every
  worker) per request;
- shares: each worker's part of the requests (vgate_worker_requests_total, the merged
  /metrics, before and after the measured phase), the issue's target 40-60 % each for 2.

Pinning: with 4 cores or more, the gateway gets cores 0 and 1 (both runs, so 1 worker leaves
one idle), wrk core 2 and the sim core 3; with fewer, nothing is pinned and the rows say so:
then the load generator, the sim and the workers share the cores, and rps is what is left
for the gateway, not what it can do. `run()` returns the rows for `make bench` to include.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/workers.py`
    sys.path.insert(0, str(REPO))

from bench.procs import (  # noqa: E402
    BenchError,
    Processes,
    Server,
    cores,
    cpu_seconds,
    free_port,
    pinned,
)
from bench.wrk import Wrk, ensure_wrk  # noqa: E402

KEYS_FILE = REPO / "config" / "keys.yaml"
DEMO_KEY = "vg-demo-0123456789abcdef"
MODEL = "tiny-llama"
CHAT_PATH = "/v1/chat/completions"
BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write one short sentence about benchmarks."}],
        "max_tokens": 16,
    },
    separators=(",", ":"),
).encode()
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {DEMO_KEY}"}


def _children(pid: int) -> list[int]:
    """A process's live children (its workers), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _gateway_cpu_s(parent: int, seen: dict[int, float]) -> float:
    """CPU seconds of the parent and its children now; `seen` remembers each pid's last
    reading, so a worker replaced midway still counts what it had spent when last read."""
    for pid in (parent, *_children(parent)):
        with contextlib.suppress(OSError):  # gone between the listing and the read
            seen[pid] = cpu_seconds(pid)
    return sum(seen.values())


def _worker_requests(url: str) -> dict[str, float]:
    """vgate_worker_requests_total by worker index; {"0": total} for one process."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    shares: dict[str, float] = {}
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vgate_worker_requests_total{"):
            worker = line.split('worker="', 1)[1].split('"', 1)[0]
            shares[worker] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("vgate_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return shares or {"0": total}


def _start_sim(procs: Processes, core: int | None) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "gateway.cli.main", "sim", "--port", str(port)]
    argv += ["--model", MODEL, "--max-num-seqs", "1024"]
    return procs.server("sim-workers", pinned(core, argv), port=port)


def _on_cores(cores_list: str | None, argv: list[str]) -> list[str]:
    """`argv` under `taskset -c LIST` (the workers the gateway forks inherit it)."""
    if cores_list is None or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", cores_list, *argv]


def _start_gateway(
    procs: Processes,
    workdir: Path,
    sim: Server,
    workers: int,
    core: str | None,
    balance: str,
) -> Server:
    port = free_port()
    name = f"gateway-workers-{workers}" + (f"-{balance}" if workers > 1 else "")
    config = workdir / f"{name}.yaml"
    config.write_text(
        json.dumps(
            {
                "server": {
                    "host": "127.0.0.1",
                    "port": port,
                    "access_log": True,
                    "drain_delay_s": 0,
                    "workers": workers,
                },
                "keys": {"file": str(KEYS_FILE)},
                "models": [
                    {
                        "name": MODEL,
                        "backends": [{"name": "sim-fast", "provider": "vllm", "url": sim.url}],
                    }
                ],
            }
        )
    )
    argv = [sys.executable, "-m", "gateway.cli.main", "serve", "--config", str(config)]
    if workers > 1:
        argv += ["--balance", balance]
    access_log = workdir / f"{name}.access.jsonl"
    return procs.server(name, _on_cores(core, argv), port=port, stdout_path=access_log)


def _wait_workers(gateway: Server, workers: int, timeout_s: float = 30.0) -> None:
    """Every worker answering the scrape (all started: /health answered by one only)."""
    deadline = time.monotonic() + timeout_s
    while workers > 1:
        with urllib.request.urlopen(gateway.url + "/metrics", timeout=10) as response:
            if f'vgate_metrics_workers{{state="answered"}} {workers}.0' in response.read().decode():
                return
        if time.monotonic() > deadline:
            raise BenchError(f"{gateway.name}: not every worker up after {timeout_s}s")
        time.sleep(0.1)


def run(
    procs: Processes,
    wrk_binary: str,
    workdir: Path,
    *,
    duration_s: float = 5.0,
    warmup_s: float = 1.0,
    concurrency: int = 16,
    balances: bool = False,
) -> list[dict[str, Any]]:
    """One row per gateway: workers 1, 2 (and 2 with the kernel's balancing when asked)."""
    pin = cores() >= 4
    gateway_cores = "0,1" if pin else None
    wrk = Wrk(wrk_binary, procs, workdir, 2 if pin else None)  # wrk -t1: one core
    sim = _start_sim(procs, 3 if pin else None)
    rows = []
    try:
        plans = [(1, "dispatch"), (2, "dispatch")]
        plans += [(2, "shared"), (2, "reuseport")] if balances else []
        for workers, balance in plans:
            gateway = _start_gateway(procs, workdir, sim, workers, gateway_cores, balance)
            try:
                _wait_workers(gateway, workers)
                rows.append(
                    _measure(wrk, gateway, workers, balance, duration_s, warmup_s, concurrency)
                )
                rows[-1]["pinned"] = pin
            finally:
                procs.stop(gateway.popen, grace_s=15)
    finally:
        procs.stop(sim.popen)
    return rows


def _measure(
    wrk: Wrk,
    gateway: Server,
    workers: int,
    balance: str,
    duration_s: float,
    warmup_s: float,
    concurrency: int,
) -> dict[str, Any]:
    url = gateway.url + CHAT_PATH

    def load(seconds: float) -> Any:
        result = wrk.run(url, BODY, HEADERS, concurrency=concurrency, duration_s=seconds)
        if result.error_count or result.requests == 0:
            raise BenchError(
                f"{gateway.name}: wrk saw errors {result.errors}\n{gateway.log_tail()}"
            )
        return result

    load(warmup_s)
    seen: dict[int, float] = {}
    cpu_before = _gateway_cpu_s(gateway.pid, seen)
    counted_before = _worker_requests(gateway.url)
    result = load(duration_s)
    cpu_after = _gateway_cpu_s(gateway.pid, seen)
    counted = {
        worker: value - counted_before.get(worker, 0.0)
        for worker, value in _worker_requests(gateway.url).items()
    }
    total = sum(counted.values())
    return {
        "workers": workers,
        "balance": _BALANCES[balance] if workers > 1 else "one process",
        "concurrency": concurrency,
        "requests": result.requests,
        "rps": result.rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "cpu_us_per_request": round((cpu_after - cpu_before) / result.requests * 1e6, 1),
        "gateway_cpu_cores": round((cpu_after - cpu_before) / result.duration_s, 2),
        "shares": {w: round(v / total, 3) if total else None for w, v in sorted(counted.items())},
    }


_BALANCES = {
    "dispatch": "parent deals (default)",
    "shared": "kernel: shared socket",
    "reuseport": "kernel: SO_REUSEPORT",
}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'workers':>7}  {'connections':<24} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'CPU us/req':>10} {'cores':>5}  shares"
    ]
    for row in rows:
        shares = " / ".join(f"{share:.0%}" for share in row["shares"].values() if share is not None)
        lines.append(
            f"{row['workers']:>7}  {row['balance']:<24} {row['rps']:>8.0f} {row['p50_ms']:>7.2f} "
            f"{row['p99_ms']:>7.2f} {row['cpu_us_per_request']:>10.0f} "
            f"{row['gateway_cpu_cores']:>5.2f}  {shares}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--balances", action="store_true", help="also 2 workers with the kernel's balancing"
    )
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vgate-bench-workers-") as tmp:
        workdir = Path(tmp)
        procs = Processes(workdir)
        try:
            rows = run(
                procs,
                ensure_wrk(),
                workdir,
                duration_s=args.duration,
                warmup_s=args.warmup,
                concurrency=args.concurrency,
                balances=args.balances,
            )
        finally:
            procs.stop_all()
    print(table(rows))
    if not rows[0]["pinned"]:
        print(f"({cores()} cores: nothing pinned; wrk and the sim share the gateway's cores)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
