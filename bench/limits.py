"""What per-key limits cost per request: admit + settle, in process and through Redis.

    python bench/limits.py [--redis-url URL] [--requests N] [--json FILE]

Without --redis-url it starts its own redis-server (nothing on disk) on a free port. Every
request is checked against all four limits (rpm, tpm, tokens per day, concurrency), set
high enough that all are admitted (the refused path is measured apart). Rows:

- local: `LocalLimits`, admit then settle, one after the other: CPU per request.
- local, refused: an admit every limit refuses (nothing charged).
- redis, sequential: `FailoverLimits` over `RedisLimits` on the server's clock, admit then
  (awaited) settle: the latency a request pays, two round trips on loopback.
- redis, 50 clients: 50 concurrent clients in one process, admit then `settle_nowait` (as
  the edge does): throughput, and this process's CPU per request.
- redis, PING: one PING per request, for scale: what one round trip costs this client.

Round trips are counted at the client (`execute_command` calls) and the script's time in
Redis is read from INFO commandstats (EVALSHA's usec_per_call). `run()` returns the rows
for `make bench` to include.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/limits.py`
    sys.path.insert(0, str(REPO))

from redis.utils import HIREDIS_AVAILABLE  # noqa: E402

from gateway.config import RedisConfig  # noqa: E402
from policies.limits import KeyLimits  # noqa: E402
from policies.limits_local import LocalLimits  # noqa: E402
from policies.limits_redis import FailoverLimits, RedisLimits  # noqa: E402
from policies.redis_pipelined import (  # noqa: E402
    PIPELINED_MAX_CALLS,
    PipelinedRedis,
    request_path_client,
)
from policies.redis_state import create_client  # noqa: E402

BIG = 10_000_000
LIMITS = KeyLimits(rpm=BIG, tpm=BIG * 10, tokens_per_day=10**15, max_concurrent=BIG)
TOKENS = 300


@contextmanager
def redis_server() -> Iterator[str]:
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (or pass --redis-url)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with tempfile.TemporaryDirectory() as directory:
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        proc = subprocess.Popen(
            [*args, "--appendonly", "no"],
            cwd=directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                        conn.sendall(b"PING\r\n")
                        if conn.recv(64).startswith(b"+PONG"):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start")
                time.sleep(0.01)
            yield f"redis://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


async def _local(requests: int) -> list[dict[str, Any]]:
    store = LocalLimits()
    keys = [f"key-{i}" for i in range(100)]
    for key in keys:  # warm
        verdict = await store.admit(key, LIMITS, TOKENS)
        assert verdict.ticket is not None
        store.settle_nowait(verdict.ticket, TOKENS, failed=False)
    started, cpu = time.perf_counter(), _cpu()
    for i in range(requests):
        verdict = await store.admit(keys[i % 100], LIMITS, TOKENS)
        assert verdict.ticket is not None
        store.settle_nowait(verdict.ticket, TOKENS - 50, failed=False)
    wall, cpu = time.perf_counter() - started, _cpu() - cpu
    refusing = KeyLimits(rpm=1, tpm=BIG, tokens_per_day=10**15, max_concurrent=BIG)
    await store.admit("refused", refusing, TOKENS)
    started, refused_cpu = time.perf_counter(), _cpu()
    for _ in range(requests):
        assert not (await store.admit("refused", refusing, TOKENS)).allowed
    refused_wall, refused_cpu = time.perf_counter() - started, _cpu() - refused_cpu
    return [
        {
            "store": "local",
            "mode": "admit + settle",
            "requests": requests,
            "us_per_request": 1e6 * wall / requests,
            "cpu_us_per_request": 1e6 * cpu / requests,
            "round_trips_per_request": 0.0,
        },
        {
            "store": "local",
            "mode": "admit refused",
            "requests": requests,
            "us_per_request": 1e6 * refused_wall / requests,
            "cpu_us_per_request": 1e6 * refused_cpu / requests,
            "round_trips_per_request": 0.0,
        },
    ]


CLIENTS = ("redis-py", "pipelined")


def _client(kind: str, url: str, connections: int) -> tuple[Any, int]:
    """The client and the store's `max_calls` the gateway would give it."""
    config = RedisConfig(url=url, max_connections=connections)
    if kind == "pipelined":
        client = request_path_client(config)
        assert client is not None
        return client, PIPELINED_MAX_CALLS
    return create_client(config), connections - 4


class _RoundTrips:
    """Writes to Redis: redis-py's commands and pipelines (one round trip each), the
    pipelined client's writes (every command of a loop turn in one)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls = 0
        if isinstance(client, PipelinedRedis):
            return
        original, original_pipeline = client.execute_command, client.pipeline

        async def counting(*args: Any, **options: Any) -> Any:
            self.calls += 1
            return await original(*args, **options)

        def counting_pipeline(*args: Any, **options: Any) -> Any:
            pipe = original_pipeline(*args, **options)
            execute = pipe.execute

            async def counted(*args: Any, **options: Any) -> Any:
                self.calls += 1
                return await execute(*args, **options)

            pipe.execute = counted
            return pipe

        client.execute_command = counting
        client.pipeline = counting_pipeline

    def count(self) -> int:
        if isinstance(self.client, PipelinedRedis):
            return self.client.sent()[1]
        return self.calls


async def _redis(
    url: str, requests: int, clients: int, connections: int, kind: str
) -> list[dict[str, Any]]:
    client, max_calls = _client(kind, url, connections)
    store = FailoverLimits(
        RedisLimits(client, key_prefix=f"bench{os.getpid()}", timeout_s=1.0, max_calls=max_calls),
        LocalLimits(),
        mode="open",  # a stall beyond the timeout shows as "without redis", not as a crash
    )
    trips = _RoundTrips(client)
    rows = []
    try:
        for _ in range(200):  # warm: scripts loaded, connections open
            verdict = await store.admit("warm", LIMITS, TOKENS)
            assert verdict.ticket is not None
            await store.settle(verdict.ticket, TOKENS, failed=False)
        await client.execute_command("CONFIG", "RESETSTAT")

        sequential = max(1, requests // 10)
        started, cpu = time.perf_counter(), _cpu()
        for _ in range(sequential):
            await client.execute_command("PING")
        wall, cpu = time.perf_counter() - started, _cpu() - cpu
        rows.append(
            {
                "store": "redis",
                "mode": "PING only (the client's floor)",
                "requests": sequential,
                "us_per_request": 1e6 * wall / sequential,
                "cpu_us_per_request": 1e6 * cpu / sequential,
                "round_trips_per_request": 1.0,
            }
        )
        before = trips.count()
        started, cpu = time.perf_counter(), _cpu()
        for i in range(sequential):
            verdict = await store.admit(f"key-{i % 100}", LIMITS, TOKENS)
            assert verdict.ticket is not None, verdict.message
            await store.settle(verdict.ticket, TOKENS - 50, failed=False)
        wall, cpu = time.perf_counter() - started, _cpu() - cpu
        rows.append(
            {
                "store": "redis",
                "mode": "admit + settle, sequential",
                "requests": sequential,
                "us_per_request": 1e6 * wall / sequential,
                "cpu_us_per_request": 1e6 * cpu / sequential,
                "round_trips_per_request": (trips.count() - before) / sequential,
            }
        )

        before = trips.count()
        numbers = iter(range(requests))

        async def one_client() -> None:
            for i in numbers:
                verdict = await store.admit(f"key-{i % 100}", LIMITS, TOKENS)
                assert verdict.ticket is not None, verdict.message
                store.settle_nowait(verdict.ticket, TOKENS - 50, failed=False)

        started, cpu = time.perf_counter(), _cpu()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        await store.drain(30)
        wall, cpu = time.perf_counter() - started, _cpu() - cpu
        rows.append(
            {
                "store": "redis",
                "mode": f"admit + settle_nowait, {clients} clients",
                "requests": requests,
                "us_per_request": 1e6 * wall / requests,
                "cpu_us_per_request": 1e6 * cpu / requests,
                "round_trips_per_request": (trips.count() - before) / requests,
                "requests_per_s": requests / wall,
            }
        )
        info = await client.execute_command("INFO", "commandstats")
        if isinstance(info, bytes):  # the pipelined client does not parse replies
            info = _commandstats(info)
        evalsha = info.get("cmdstat_evalsha", {})
        for row in rows:
            row["client"] = kind
            row["redis_script_us_per_call"] = float(evalsha.get("usec_per_call", 0.0))
            row["parser"] = "hiredis" if HIREDIS_AVAILABLE else "python (no hiredis)"
            row["admits_without_redis"] = store.degraded_admits
            row["settles_lost"] = store.lost_settles + store.dropped_settles
    finally:
        await store.aclose()
        await client.aclose()
    return rows


def _commandstats(text: bytes) -> dict[str, dict[str, str]]:
    stats: dict[str, dict[str, str]] = {}
    for line in text.decode().splitlines():
        name, _, fields = line.partition(":")
        if name.startswith("cmdstat_"):
            stats[name] = dict(field.split("=", 1) for field in fields.split(","))
    return stats


def run(
    redis_url: str | None = None,
    requests: int = 20_000,
    clients: int = 50,
    connections: int = 16,
) -> list[dict[str, Any]]:
    """Measure every row; with no `redis_url`, against a redis-server of its own.
    `connections`: the client's pool (redis.max_connections; the default's 16)."""
    rows = asyncio.run(_local(requests * 5))
    with contextlib.ExitStack() as stack:
        url = redis_url if redis_url is not None else stack.enter_context(redis_server())
        for kind in CLIENTS:
            rows += asyncio.run(_redis(url, requests, clients, connections, kind))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'store':6} {'client':9} {'mode':36} {'requests':>8} {'µs/req':>8} {'CPU µs/req':>10} "
        f"{'round trips':>11} {'req/s':>8}",
    ]
    for row in rows:
        rate = row.get("requests_per_s")
        lines.append(
            f"{row['store']:6} {row.get('client', ''):9} {row['mode']:36} {row['requests']:>8} "
            f"{row['us_per_request']:>8.1f} {row['cpu_us_per_request']:>10.1f} "
            f"{row['round_trips_per_request']:>11.2f} {'' if rate is None else f'{rate:>8.0f}'}"
        )
    scripts = [row["redis_script_us_per_call"] for row in rows if row["store"] == "redis"]
    if scripts:
        script = scripts[0]
        lines.append(f"Lua script time in Redis: {script:.1f} µs per call (EVALSHA usec_per_call)")
        redis_row = next(row for row in rows if row["store"] == "redis")
        lines.append(f"reply parser: {redis_row['parser']}")
        lines.append(
            f"admits decided without Redis (a call past its timeout): "
            f"{redis_row['admits_without_redis']}; settles lost: {redis_row['settles_lost']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = run(args.redis_url, args.requests, args.clients, args.connections)
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
