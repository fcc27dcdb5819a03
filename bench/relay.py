"""What relaying a shared stream through Redis costs its leader (gateway/router/relay.py).

    python bench/relay.py [--redis-url URL] [--streams N] [--events N] [--gap-ms MS]

Without --redis-url it starts its own redis-server (bench/limits.py's). N streams at once in
one process, each sending `--events` events (a chat chunk's SSE event, ~180 bytes) one per
`--gap-ms`, as an upstream would: once through a `Relay` on the pipelined client, once
without, interleaved; first with no follower anywhere (the relay only checks, now and
then, whether one watches), then with each stream watched (it appends). Rows: this
process's CPU per event with and without the relay, the appends (XADDs) per event, the
checks per stream, Redis's own time per script call (INFO commandstats) and its memory
per stream.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.limits import redis_server  # noqa: E402
from gateway.config import RedisConfig  # noqa: E402
from gateway.router.relay import Relay  # noqa: E402
from policies.cache_redis import RedisStore  # noqa: E402
from policies.redis_pipelined import request_path_client  # noqa: E402
from policies.redis_state import RedisHealth, create_client  # noqa: E402

EVENT = (
    b'data: {"id":"chatcmpl-0123456789","object":"chat.completion.chunk","created":1,'
    b'"model":"tiny-llama","choices":[{"index":0,"delta":{"content":" word"},'
    b'"finish_reason":null}]}\n\n'
)


async def _streams(
    store: RedisStore | None, streams: int, events: int, gap_s: float
) -> tuple[float, int, int]:
    """CPU seconds this process spent sending every stream's events (and relaying them),
    the appends the relays made and the checks whether watched."""
    relays: list[Relay] = []

    async def one(index: int) -> None:
        relay = None
        if store is not None:
            header = {"o": None, "b": "w1"}
            relay = Relay(store, f"r:s:{index}", header, max_bytes=1 << 20, ttl_s=60)
            relays.append(relay)
        for _ in range(events):
            if relay is not None:
                relay.send(EVENT)
            await asyncio.sleep(gap_s)
        if relay is not None:
            relay.finish(None, {"prompt_tokens": 1, "completion_tokens": events})
            await relay.task

    start = time.process_time()
    await asyncio.gather(*(one(i) for i in range(streams)))
    spent = time.process_time() - start
    return spent, sum(r.appends for r in relays), sum(r.checks for r in relays)


async def measure(url: str, streams: int, events: int, gap_s: float) -> list[dict[str, Any]]:
    settings = RedisConfig(url=url, socket_timeout_s=1.0)
    redis = create_client(settings)
    fast = request_path_client(settings)
    store = RedisStore(
        redis,
        fast=fast,
        key_prefix="bench",
        timeout_s=1.0,
        probe_interval_s=1.0,
        health=RedisHealth("cache"),
    )
    try:
        rows = []
        for watched in (False, True):
            for index in range(streams):  # a follower elsewhere marked each (or none)
                if watched:
                    await redis.set(f"bench:cache:watch:r:s:{index}", 1, px=600_000)
            await redis.config_resetstat()
            without = with_relay = 0.0
            appends = checks = 0
            for _ in range(3):  # interleaved: the machine's noise falls on both
                without += (await _streams(None, streams, events, gap_s))[0]
                spent, made, asked = await _streams(store, streams, events, gap_s)
                with_relay += spent
                appends += made
                checks += asked
            stats = await redis.info("commandstats")
            evalsha = stats.get("cmdstat_evalsha", {})
            memory = await redis.memory_usage("bench:cache:flight:r:s:0")
            sent = 3 * streams * events
            rows.append(
                {
                    "watched": watched,
                    "streams": streams,
                    "events_each": events,
                    "gap_ms": gap_s * 1000,
                    "cpu_us_per_event_without": round(without / sent * 1e6, 1),
                    "cpu_us_per_event_with_relay": round(with_relay / sent * 1e6, 1),
                    "relay_cpu_us_per_event": round((with_relay - without) / sent * 1e6, 1),
                    "appends_per_event": round(appends / sent, 3),
                    "watch_checks_per_stream": round(checks / (3 * streams), 1),
                    "redis_us_per_append": evalsha.get("usec_per_call"),
                    "redis_bytes_per_stream_after_end": memory,
                }
            )
        return rows
    finally:
        await store.aclose()
        await redis.aclose()
        if fast is not None:
            await fast.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url")
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--gap-ms", type=float, default=5.0)
    args = parser.parse_args()

    def run(url: str) -> list[dict[str, Any]]:
        return asyncio.run(measure(url, args.streams, args.events, args.gap_ms / 1000))

    if args.redis_url:
        rows = run(args.redis_url)
    else:
        with redis_server() as url:
            rows = run(url)
    for row in rows:
        for name, value in row.items():
            print(f"{name:36} {value}")
        print()


if __name__ == "__main__":
    main()
