"""Several gateway processes on one Redis admit exactly a key's limit between them
(LESSONS 1: limits that are per replica). Each process is a real OS process with its own
pooled client and `FailoverLimits` (fail-closed, so a Redis error shows as a 503 rather
than as a local admission); 50 concurrent clients are spread over them.

Run as a module it is one such worker:
`python -m tests.policies.test_limits_multiprocess --url redis://... --prefix P ...`
prints "ready", waits for "go" on stdin, drives its clients and prints one JSON line.

Reuse: `drive` spreads requests over concurrent clients against any `attempt` (an edge
version passes one that posts to `vgate serve` processes); `run_workers` starts processes
that speak the ready/go/JSON protocol, releases them together and collects their results.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import orjson
import pytest

from gateway.config import RedisConfig
from policies.limits import KeyLimits
from policies.limits_local import LocalLimits
from policies.limits_redis import FailoverLimits, RedisLimits
from policies.redis_state import create_client
from tests.servers import REPO, RedisServer, start_redis

PROCESSES = 4
CLIENTS = 50
REQUESTS = 2000
T0 = 1_700_000_000.0


async def drive(
    attempt: Callable[[int], Awaitable[str]], *, clients: int, requests: int
) -> Counter[str]:
    """`requests` calls of `attempt(i)` (i: the request's number) by `clients` concurrent
    clients, each taking the next request as soon as its last one is answered; counts the
    outcomes `attempt` returns ("allowed", "refused", ...)."""
    outcomes: Counter[str] = Counter()
    numbers = iter(range(requests))

    async def client() -> None:
        for number in numbers:
            outcomes[await attempt(number)] += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes


def run_workers(commands: Sequence[Sequence[str]], timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Start every command, wait until each has printed "ready", say "go" to all at once,
    and return the JSON line each prints at the end."""
    procs = [
        subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for command in commands
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != b"ready":
                _, err = proc.communicate(timeout=timeout_s)
                raise AssertionError(f"worker did not start: {line!r} {err.decode()}")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=timeout_s)
            assert proc.returncode == 0, err.decode()
            results.append(orjson.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def worker_command(url: str, prefix: str, **options: Any) -> list[str]:
    command = [sys.executable, "-m", "tests.policies.test_limits_multiprocess"]
    command += ["--url", url, "--prefix", prefix]
    for name, value in options.items():
        if value is not None and value is not False:
            command += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return command


async def _worker(args: argparse.Namespace) -> dict[str, Any]:
    client = create_client(RedisConfig(url=args.url, socket_timeout_s=2.0))
    clock = None if args.now is None else (lambda: args.now)
    store = FailoverLimits(
        RedisLimits(client, key_prefix=args.prefix, timeout_s=2.0, clock=clock),
        LocalLimits(),
        mode="closed",
    )
    limits = KeyLimits(args.rpm, args.tpm, args.tokens_per_day, args.max_concurrent)
    await client.ping()  # connected before the start
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    async def attempt(_: int) -> str:
        verdict = await store.admit("shared-key", limits, args.tokens)
        if verdict.ticket is not None and not args.hold:
            store.settle_nowait(verdict.ticket, args.tokens, failed=False)
        return "allowed" if verdict.allowed else str(verdict.status)

    started = time.perf_counter()
    outcomes = await drive(attempt, clients=args.clients, requests=args.requests)
    wall_s = time.perf_counter() - started
    await store.aclose(timeout_s=5)
    await client.aclose()
    return {**outcomes, "wall_s": wall_s, "lost_settles": store.lost_settles}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1)
    parser.add_argument("--now", type=float, default=None)  # None: the Redis server's clock
    parser.add_argument("--rpm", type=int, default=None)
    parser.add_argument("--tpm", type=int, default=None)
    parser.add_argument("--tokens-per-day", type=int, default=None)
    parser.add_argument("--max-concurrent", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=0)
    parser.add_argument("--hold", action="store_true")  # never settle: slots stay taken
    args = parser.parse_args()
    print(orjson.dumps(asyncio.run(_worker(args))).decode(), flush=True)


# The tests.


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def run(server: RedisServer, prefix: str, **options: Any) -> tuple[Counter[str], float]:
    """REQUESTS admits of one key by CLIENTS clients spread over PROCESSES processes."""
    commands = []
    for index in range(PROCESSES):
        clients = CLIENTS // PROCESSES + (index < CLIENTS % PROCESSES)
        requests = REQUESTS // PROCESSES + (index < REQUESTS % PROCESSES)
        commands.append(
            worker_command(server.url, prefix, clients=clients, requests=requests, **options)
        )
    started = time.perf_counter()
    results = run_workers(commands)
    wall_s = time.perf_counter() - started
    total: Counter[str] = Counter()
    admitting_s = 0.0  # from "go" to the last answer: the slowest process
    for result in results:
        assert result.pop("lost_settles") == 0
        admitting_s = max(admitting_s, result.pop("wall_s"))
        total.update(result)
    assert sum(total.values()) == REQUESTS
    sys.stderr.write(
        f"{prefix}: {dict(total)}; admitting {admitting_s:.3f} s, {wall_s:.2f} s with "
        f"{PROCESSES} processes' start-up\n"
    )
    return total, wall_s


@pytest.mark.parametrize(
    ("name", "options", "refusal"),
    [
        ("rpm", {"rpm": 300}, "429"),
        ("tpm", {"tpm": 30_000, "tokens": 100}, "429"),
        ("day", {"tokens_per_day": 30_000, "tokens": 100}, "403"),
        ("concurrent", {"max_concurrent": 300, "hold": True}, "429"),
        ("all", {"rpm": 300, "tpm": 60_000, "tokens_per_day": 90_000, "tokens": 100}, "429"),
    ],
)
def test_four_processes_admit_exactly_the_limit(
    redis_server: RedisServer, name: str, options: dict[str, Any], refusal: str
) -> None:
    """2,000 requests from 50 clients over 4 processes against a limit of 300: exactly 300
    admitted. The script's clock is pinned (`now`), so no refill during the run."""
    total, _ = run(redis_server, f"exact-{name}", now=T0, **options)
    assert total == Counter({"allowed": 300, refusal: REQUESTS - 300})


def test_four_processes_on_the_servers_clock(redis_server: RedisServer) -> None:
    """The same on Redis's own TIME: 300, plus what refilled meanwhile (5 per s; bounded
    by the whole run's time, start-up included, as the processes do not start together)."""
    total, wall_s = run(redis_server, "server-clock", rpm=300)
    assert 300 <= total["allowed"] <= 300 + 5 * wall_s + 1
    assert total["allowed"] + total["429"] == REQUESTS


if __name__ == "__main__":
    main()
