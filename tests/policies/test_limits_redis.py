"""Per-key limits through a real redis-server. Several `RedisLimits` in one test, each with
its own client, are several gateway processes. Limit behaviour is driven with a clock the
test moves (sent into the script as `now`; production uses the server's TIME), never by
sleeping; only the outage tests wait, for a real server to go and come back."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from gateway.config import LimitsConfig, RedisConfig
from policies.limits import DAY_US, KeyLimits, Ticket, Verdict
from policies.limits_local import LocalLimits
from policies.limits_redis import FailoverLimits, RedisLimits, create_limits
from policies.redis_pipelined import PipelinedRedis, request_path_client
from policies.redis_state import RedisClient, RedisHealth, create_client
from tests.policies.test_limits import T0, Clock, headers
from tests.servers import RedisServer, start_redis

TIMEOUT_S = 1.0  # a Redis call this slow is an outage; a loaded machine's slow one is not
_prefixes = count()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


Make = Callable[..., RedisLimits]
Client = RedisClient | PipelinedRedis


def new_client(kind: str, url: str, timeout_s: float = TIMEOUT_S) -> Client:
    """A client of the kind the gateway gives the store: its own pipelined one on a
    `redis.url`, redis-py's behind Sentinel or a Cluster. Both must behave the same."""
    if kind == "pipelined":
        client = request_path_client(RedisConfig(url=url, socket_timeout_s=timeout_s))
        assert client is not None
        return client
    return create_client(RedisConfig(url=url, socket_timeout_s=timeout_s))


@pytest.fixture(params=["pipelined", "redis-py"])
def client_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make(redis_server: RedisServer, clock: Clock, client_kind: str) -> AsyncIterator[Make]:
    """RedisLimits sharing one key prefix (fresh per test), each with its own client."""
    prefix = f"t{next(_prefixes)}"
    clients: list[Client] = []

    def make_one(*, url: str = redis_server.url, now: Any = clock, **options: Any) -> RedisLimits:
        client = new_client(client_kind, url)
        clients.append(client)
        return RedisLimits(client, key_prefix=prefix, timeout_s=TIMEOUT_S, clock=now, **options)

    yield make_one
    for client in clients:
        await client.aclose()


def summary(verdict: Verdict) -> tuple[Any, ...]:
    return (
        verdict.allowed,
        verdict.status,
        verdict.code,
        verdict.limit,
        verdict.retry_after_s,
        verdict.headers,
    )


async def test_redis_decides_exactly_as_the_local_store(make: Make, clock: Clock) -> None:
    """The Lua script and the Python arithmetic, step by step over a random sequence of
    admits and settles on a few keys, across a UTC midnight: the same verdicts."""
    rng = random.Random(5)
    midnight = (int(T0 * 1_000_000) // DAY_US + 1) * DAY_US / 1_000_000
    clock.now = midnight - 200
    shared = make(lease_s=1e6)
    local = LocalLimits(clock=clock)
    limit_sets = [
        KeyLimits(rpm=7),
        KeyLimits(rpm=13, tpm=997, tokens_per_day=5000, max_concurrent=3),
        KeyLimits(tpm=333, max_concurrent=2),
        KeyLimits(tokens_per_day=1234),
    ]
    open_tickets: list[tuple[Ticket, Ticket]] = []
    outcomes: set[tuple[bool, int | None]] = set()
    for _ in range(1500):
        clock.advance(rng.choice([0, 0, 0, 0.001, 0.05, 0.3, 1.7]))
        if open_tickets and rng.random() < 0.4:
            pair = open_tickets.pop(rng.randrange(len(open_tickets)))
            failed = rng.random() < 0.3
            actual = rng.choice([None, 0, 5, 50, 400, 2000])
            await local.settle(pair[0], actual, failed=failed)
            assert await shared.settle(pair[1], actual, failed=failed)
            continue
        index = rng.randrange(len(limit_sets))
        tokens = rng.choice([0, 1, 10, 60, 200, 400])
        mine = await local.admit(f"k{index}", limit_sets[index], tokens)
        theirs = await shared.admit(f"k{index}", limit_sets[index], tokens)
        assert summary(theirs) == summary(mine), (index, tokens, clock.now)
        outcomes.add((mine.allowed, mine.status))
        if mine.ticket is not None and theirs.ticket is not None:
            assert mine.ticket.day == theirs.ticket.day
            open_tickets.append((mine.ticket, theirs.ticket))
    assert clock.now > midnight
    assert outcomes == {(True, None), (False, 429), (False, 403)}


async def test_usage_is_shared_and_charges_nothing(make: Make, clock: Clock) -> None:
    """Two processes' views of a key: the same figures, the local store's arithmetic."""
    a, b = make(), make()
    local = LocalLimits(clock=clock)
    limits = KeyLimits(rpm=10, tpm=1000, tokens_per_day=5000, max_concurrent=3)
    assert await a.usage("k", limits) == {
        "source": "redis",
        "requests_remaining": 10,
        "tokens_remaining": 1000,
        "tokens_today": 0,
        "tokens_per_day_remaining": 5000,
        "in_flight": 0,
    }
    pairs = []
    for store in (a, b, a):
        theirs = (await store.admit("k", limits, 100)).ticket
        mine = (await local.admit("k", limits, 100)).ticket
        assert theirs is not None and mine is not None
        pairs.append((theirs, mine))
    seen = await a.usage("k", limits)
    assert seen == await b.usage("k", limits) == await a.usage("k", limits)  # charges nothing
    assert seen == {**await local.usage("k", limits), "source": "redis"}
    assert (seen["requests_remaining"], seen["tokens_today"], seen["in_flight"]) == (7, 300, 3)
    (t1, m1), (t2, m2), _ = pairs
    assert await b.settle(t1, 40, failed=False)  # reconciled by the other process
    assert await a.settle(t2, None, failed=True)
    await local.settle(m1, 40, failed=False)
    await local.settle(m2, None, failed=True)
    clock.advance(6.0)
    seen = await b.usage("k", limits)
    assert seen == await a.usage("k", limits)
    assert seen == {**await local.usage("k", limits), "source": "redis"}
    assert seen["requests_remaining"] == 9 and seen["tokens_remaining"] == 960
    assert (seen["tokens_today"], seen["tokens_per_day_remaining"], seen["in_flight"]) == (
        140,
        4860,
        1,
    )
    # The server's clock (production): the same state, read on Redis's TIME.
    real = make(now=None)
    assert (await real.usage("fresh", limits))["requests_remaining"] == 10


async def test_usage_falls_back_to_this_process_without_redis(make: Make, clock: Clock) -> None:
    local = LocalLimits(clock=clock)
    store = FailoverLimits(make(url="redis://127.0.0.1:1/0"), local)
    limits = KeyLimits(rpm=5, max_concurrent=2)
    assert (await local.admit("k", limits, 0)).allowed
    usage = await store.usage("k", limits)
    assert usage == {
        "source": "local",
        "requests_remaining": 4,
        "tokens_remaining": None,
        "tokens_today": None,
        "tokens_per_day_remaining": None,
        "in_flight": 1,
    }
    assert not store.down  # a failed admin read is not an outage: admits decide that
    await store.aclose()


async def test_rpm_is_exact_and_resets(make: Make, clock: Clock) -> None:
    a, b = make(), make()  # two processes
    limits = KeyLimits(rpm=10)
    allowed = [(await (a if i % 2 else b).admit("k", limits, 0)).allowed for i in range(40)]
    assert sum(allowed) == 10
    clock.advance(6.0)  # one request's worth
    assert sum([(await a.admit("k", limits, 0)).allowed for _ in range(5)]) == 1
    clock.advance(60.0)
    assert sum([(await b.admit("k", limits, 0)).allowed for _ in range(20)]) == 10


async def test_tpm_estimate_reconciled_and_refunded_across_processes(
    make: Make, clock: Clock
) -> None:
    a, b = make(), make()
    limits = KeyLimits(rpm=100, tpm=1000, tokens_per_day=10_000)
    first = await a.admit("k", limits, 600)
    assert first.ticket is not None
    assert not (await b.admit("k", limits, 600)).allowed
    assert await b.settle(first.ticket, 100, failed=False)  # settled by another process
    second = await b.admit("k", limits, 600)
    assert second.ticket is not None
    assert headers(second)["x-ratelimit-remaining-tokens"] == "300"
    assert headers(second)["x-ratelimit-remaining-requests"] == "98"
    assert await a.settle(second.ticket, None, failed=True)  # refund: request and tokens
    third = await a.admit("k", limits, 0)
    assert headers(third)["x-ratelimit-remaining-tokens"] == "900"
    assert headers(third)["x-ratelimit-remaining-requests"] == "98"
    assert third.ticket is not None
    assert await a.settle(third.ticket, 2000, failed=False)  # used more than estimated
    refused = await b.admit("k", limits, 1)
    assert refused.status == 429 and refused.limit == "tokens"
    # 100 + 2000 tokens, capped at two minutes' worth (2000): 1001 over a 1000 bucket.
    assert refused.retry_after_s == pytest.approx(60.06)


async def test_day_quota_across_processes(make: Make, clock: Clock) -> None:
    a, b = make(), make()
    limits = KeyLimits(tokens_per_day=1000)
    assert (await a.admit("k", limits, 600)).allowed
    refused = await b.admit("k", limits, 401)
    assert refused.status == 403 and refused.code == "insufficient_quota"
    assert (await b.admit("k", limits, 400)).allowed
    clock.advance(86_400)
    assert (await a.admit("k", limits, 1000)).allowed


async def test_concurrency_is_shared_and_released(make: Make) -> None:
    a, b = make(), make()
    limits = KeyLimits(max_concurrent=3)
    verdicts = [await (a if i % 2 else b).admit("k", limits, 0) for i in range(6)]
    assert [v.allowed for v in verdicts] == [True, True, True, False, False, False]
    assert verdicts[3].code == "concurrency_limit_exceeded"
    ticket = verdicts[0].ticket
    assert ticket is not None
    assert await a.settle(ticket, 0, failed=False)
    assert not await b.settle(ticket, 0, failed=False)  # once: again is a no-op
    assert (await b.admit("k", limits, 0)).allowed
    assert not (await a.admit("k", limits, 0)).allowed


async def test_a_dead_processs_slot_is_freed_when_its_lease_ends(make: Make, clock: Clock) -> None:
    dead, alive = make(lease_s=30), make(lease_s=30)
    limits = KeyLimits(max_concurrent=1, tpm=1000)
    assert (await dead.admit("k", limits, 500)).allowed  # never settled: the process died
    assert not (await alive.admit("k", limits, 0)).allowed
    clock.advance(30.0)
    assert (await alive.admit("k", limits, 0)).allowed


async def test_a_retried_admit_is_charged_once(make: Make) -> None:
    store = make()
    limits = KeyLimits(rpm=10, tpm=1000, max_concurrent=5)
    first = await store.admit("k", limits, 100, ticket_id="same")
    again = await store.admit("k", limits, 100, ticket_id="same")
    assert first.allowed and again.allowed
    assert headers(again)["x-ratelimit-remaining-requests"] == "9"
    assert headers(again)["x-ratelimit-remaining-tokens"] == "900"


async def test_an_admit_undone_before_it_ran_never_charges(make: Make) -> None:
    """A timed-out admit is undone in the background; should the undo reach Redis first,
    the admit, arriving late, takes nothing."""
    store = make()
    limits = KeyLimits(rpm=10, max_concurrent=1)
    undo = store.undo_ticket("k", limits, 0, "late")
    assert not await store.settle(undo, None, failed=True)  # nothing to undo yet
    assert (await store.admit("k", limits, 0, ticket_id="late")).allowed  # the late arrival
    after = await store.admit("k", limits, 0)
    assert after.allowed  # the slot was not taken...
    assert headers(after)["x-ratelimit-remaining-requests"] == "9"  # ...nor a request


async def test_admit_and_settle_are_one_round_trip_each(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make()
    limits = KeyLimits(rpm=100, tpm=10_000, tokens_per_day=100_000, max_concurrent=5)
    await store.admit("warm", limits, 0)  # the script is loaded (SCRIPT LOAD once)
    sent: list[str] = []
    original = store.redis.execute_command

    async def counting(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return await original(*args, **options)

    monkeypatch.setattr(store.redis, "execute_command", counting)
    verdict = await store.admit("k", limits, 100)
    assert sent == ["EVALSHA"]
    assert verdict.ticket is not None
    await store.settle(verdict.ticket, 50, failed=False)
    assert sent == ["EVALSHA", "EVALSHA"]


async def test_scripts_are_loaded_again_after_a_flush(make: Make) -> None:
    store = make()
    limits = KeyLimits(rpm=5)
    assert (await store.admit("k", limits, 0)).allowed
    # as after a restart: NOSCRIPT, then SCRIPT LOAD
    await store.redis.execute_command("SCRIPT", "FLUSH")
    assert (await store.admit("k", limits, 0)).allowed
    assert headers(await store.admit("k", limits, 0))["x-ratelimit-remaining-requests"] == "2"


async def test_keys_share_one_slot_and_expire(
    make: Make, clock: Clock, redis_server: RedisServer
) -> None:
    store = make(lease_s=120)
    verdict = await store.admit("key-demo", KeyLimits(rpm=60, max_concurrent=2), 0)
    assert verdict.allowed
    state, tickets, undone = store.keys("key-demo")
    assert state == f"{store.key_prefix}:rl:{{key-demo}}"
    assert tickets == state + ":t"
    assert tickets == state + ":t" and undone == state + ":u"
    assert key_slot(state.encode()) == key_slot(tickets.encode()) == key_slot(undone.encode())
    redis = Redis.from_url(redis_server.url)  # to look, beside the store's own client
    assert 1000 < await redis.pttl(state) <= 2000  # one request drains in 1 s, plus 1 s
    assert 120_000 < await redis.pttl(tickets) <= 121_000  # the lease, plus 1 s
    await store.admit("quota", KeyLimits(tokens_per_day=10), 1)
    midnight = (int(T0 * 1_000_000) // DAY_US + 1) * DAY_US / 1_000
    to_midnight_ms = midnight - T0 * 1000
    assert to_midnight_ms < await redis.pttl(store.keys("quota")[0]) <= to_midnight_ms + 1000
    await redis.aclose()


async def test_the_servers_clock_is_the_clock(make: Make) -> None:
    """Without a test clock the script reads Redis's TIME: processes whose own clocks
    disagree still agree on every limit."""
    a, b = make(now=None), make(now=None)
    limits = KeyLimits(rpm=300, tokens_per_day=100)
    first = await a.admit("k", limits, 1)
    assert first.ticket is not None
    seconds, _ = await a.redis.execute_command("TIME")
    seconds = int(seconds)
    assert first.ticket.day == seconds * 1_000_000 // DAY_US
    assert headers(first)["x-ratelimit-reset-requests"] == "200ms"
    second = await b.admit("k", limits, 1)
    assert headers(second)["x-ratelimit-remaining-requests"] == "298"
    assert await b.settle(first.ticket, 1, failed=False)


# Redis failing: fail open, fail closed, recovery, never a request hung on it.


class Recorder:
    def __init__(self) -> None:
        self.changes: list[bool] = []

    def __call__(self, component: str, up: bool) -> None:
        assert component == "limits"
        self.changes.append(up)


def failover(
    server: RedisServer,
    clock: Clock,
    mode: str,
    recorder: Recorder,
    client_kind: str,
    **options: Any,
) -> FailoverLimits:
    client = new_client(client_kind, server.url)
    return FailoverLimits(
        RedisLimits(client, timeout_s=TIMEOUT_S, clock=clock),
        LocalLimits(clock=clock),
        mode="closed" if mode == "closed" else "open",
        health=RedisHealth("limits", recorder),
        probe_interval_s=0.05,
        settle_deadline_s=10.0,
        **options,
    )


async def timed(store: FailoverLimits, limits: KeyLimits, key: str = "k") -> Verdict:
    started = time.monotonic()
    verdict = await store.admit(key, limits, 0)
    assert time.monotonic() - started < TIMEOUT_S + 0.5, "an admit waited on Redis"
    return verdict


async def until_redis_answers(store: FailoverLimits, limits: KeyLimits) -> Verdict:
    deadline = time.monotonic() + 10
    while True:
        verdict = await timed(store, limits)
        if not store.down:
            return verdict
        assert time.monotonic() < deadline, "did not recover"
        await asyncio.sleep(0.02)  # real time for the probe interval to pass


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_killed_and_restarted_mid_use(
    tmp_path: Path, clock: Clock, mode: str, caplog: pytest.LogCaptureFixture, client_kind: str
) -> None:
    server = start_redis(tmp_path)
    recorder = Recorder()
    store = failover(server, clock, mode, recorder, client_kind)
    limits = KeyLimits(rpm=5, max_concurrent=10)
    try:
        before = [await timed(store, limits) for _ in range(3)]
        assert all(v.allowed for v in before) and recorder.changes == [True]
        held = before[0].ticket
        assert held is not None and held.store is store.redis
        server.kill()
        caplog.set_level(logging.INFO)
        during = [await timed(store, limits) for _ in range(20)]
        store.settle_nowait(held, 0, failed=False)  # retried in the background meanwhile
        if mode == "open":
            # Loud, and the process's own limits meanwhile: exactly 5 of 20.
            assert [v.allowed for v in during] == [True] * 5 + [False] * 15
            assert during[5].status == 429
            assert store.degraded_admits == 20
        else:
            assert not any(v.allowed for v in during)
            assert {v.status for v in during} == {503}
            assert during[0].code == "rate_limits_unavailable"
            assert headers(during[0]) == {"retry-after": "1"}
            assert store.unavailable_refusals == 20
        assert recorder.changes == [True, False]  # one episode, reported once
        unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(unreachable) == 1
        fail_mode = [r for r in caplog.records if f"fail {mode}" in r.getMessage()]
        assert len(fail_mode) == 1

        server = start_redis(tmp_path, port=server.port)  # empty: it kept nothing
        recovered = await until_redis_answers(store, limits)
        assert recorder.changes == [True, False, True]
        assert recovered.allowed and recovered.ticket is not None
        assert recovered.ticket.store is store.redis
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        await store.drain(5)
        assert store.pending_settles == 0 and store.lost_settles == 0
        if mode == "open":
            local_ticket = during[0].ticket
            assert local_ticket is not None and local_ticket.store is store.local
            store.settle_nowait(local_ticket, 0, failed=False)  # back where it came from
            assert local_ticket.settled
    finally:
        await store.aclose()
        await store.redis.redis.aclose()
        server.stop()


async def test_a_hung_redis_never_hangs_a_request(
    tmp_path: Path, clock: Clock, client_kind: str
) -> None:
    """A server that stops answering (SIGSTOP): each admit waits at most the timeout, then
    the process's own limits; an admit that timed out is given back once Redis runs again
    (it may have been carried out)."""
    server = start_redis(tmp_path)
    recorder = Recorder()
    store = failover(server, clock, "open", recorder, client_kind)
    limits = KeyLimits(max_concurrent=1)
    five = KeyLimits(max_concurrent=5)
    try:
        warm = await timed(store, KeyLimits(rpm=1000), "other")
        assert warm.allowed
        held = [(await timed(store, five, "five")).ticket for _ in range(5)]
        server.popen.send_signal(signal.SIGSTOP)
        for ticket in held:  # one pipeline, timing out and sent again until Redis answers
            assert ticket is not None and ticket.store is store.redis
            store.settle_nowait(ticket, 0, failed=False)
        hung = await timed(store, limits)  # waits TIMEOUT_S, then local
        assert hung.allowed and hung.ticket is not None and hung.ticket.store is store.local
        assert recorder.changes == [True, False]
        others = [await timed(store, KeyLimits(rpm=1000), "other") for _ in range(50)]
        assert all(v.allowed for v in others)  # local, at once: no wait on Redis
        server.popen.send_signal(signal.SIGCONT)
        recovered = await until_redis_answers(store, limits)
        await store.drain(5)
        assert recorder.changes == [True, False, True]
        # The timed-out admit took the key's one slot in Redis; the undo gave it back.
        if not recovered.allowed:
            recovered = await timed(store, limits)
        assert recovered.allowed and recovered.ticket is not None
        assert recovered.ticket.store is store.redis
        # The settles that timed out were sent again: all five slots are free, no more.
        again = [await timed(store, five, "five") for _ in range(6)]
        assert [v.allowed for v in again] == [True] * 5 + [False]
        assert store.lost_settles == 0
    finally:
        server.popen.send_signal(signal.SIGCONT)
        await store.aclose()
        await store.redis.redis.aclose()
        server.stop()


async def test_settles_are_bounded(tmp_path: Path, clock: Clock, client_kind: str) -> None:
    server = start_redis(tmp_path)
    store = failover(server, clock, "open", Recorder(), client_kind, max_pending_settles=3)
    try:
        tickets = []
        for _ in range(5):
            verdict = await store.admit("k", KeyLimits(max_concurrent=10), 0)
            assert verdict.ticket is not None
            tickets.append(verdict.ticket)
        server.popen.send_signal(signal.SIGSTOP)
        for ticket in tickets:
            store.settle_nowait(ticket, 0, failed=False)
        assert store.pending_settles == 3 and store.dropped_settles == 2
    finally:
        server.popen.send_signal(signal.SIGCONT)
        await store.aclose(timeout_s=1)
        await store.redis.redis.aclose()
        server.stop()


async def test_create_limits(redis_server: RedisServer) -> None:
    config = LimitsConfig(redis_failure="closed", probe_interval_s=2)
    assert isinstance(create_limits(config, RedisConfig(), None), LocalLimits)
    client = create_client(RedisConfig(url=redis_server.url))
    changes: list[tuple[str, bool]] = []
    store = create_limits(
        config,
        RedisConfig(url=redis_server.url, key_prefix="made"),
        client,
        on_redis_change=lambda component, up: changes.append((component, up)),
    )
    try:
        assert isinstance(store, FailoverLimits) and store.mode == "closed"
        verdict = await store.admit("k", KeyLimits(rpm=1), 0)
        assert verdict.allowed and changes == [("limits", True)]
        assert verdict.ticket is not None
        store.settle_nowait(verdict.ticket, None, failed=False)
        await store.aclose()
        assert await client.exists("made:rl:{k}") == 1
    finally:
        await client.aclose()


@pytest.mark.parametrize("which", [0, 1, 2], ids=["hash", "tickets", "undone"])
async def test_a_key_of_the_wrong_type_is_repaired_not_taken_for_an_outage(
    make: Make, redis_server: RedisServer, which: int
) -> None:
    """One of a key's Redis keys holding a string (a hand edit, another program sharing the
    prefix) made every admit of that key fail with WRONGTYPE, which was taken for an
    outage: every key failed open (or, fail-closed, was refused with 503), again and again."""
    shared = make()
    failover = FailoverLimits(shared, LocalLimits(), mode="closed")
    limits = KeyLimits(rpm=2)
    client = Redis.from_url(redis_server.url)
    try:
        await client.set(shared.keys("k")[which], b"not a hash or a sorted set")
        first = await failover.admit("k", limits, 1)
        assert first.allowed and first.ticket is not None and first.ticket.store is shared
        assert not failover.down and failover.unavailable_refusals == 0
        assert (await failover.admit("k", limits, 1)).allowed
        refused = await failover.admit("k", limits, 1)  # rpm 2, counted in Redis again
        assert refused.status == 429
        assert (await failover.admit("other", limits, 1)).allowed  # never 503 meanwhile
        assert not failover.down
    finally:
        await client.aclose()
        await failover.aclose()


_BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
while true do
  t = redis.call('TIME')
  if t[1] * 1000000 + t[2] - start > 1500000 then return 1 end
end
"""


async def test_a_call_that_timed_out_never_leaves_its_answer_to_the_next(
    redis_server: RedisServer, client_kind: str
) -> None:
    """A guard on the client library (redis-py once had this bug, CVE-2023-28859): an
    admit cut off by its timeout after its command was sent must not leave the pooled
    connection with an answer unread, which the next call would take for its own."""
    client = new_client(client_kind, redis_server.url, timeout_s=5.0)
    busy = Redis.from_url(redis_server.url)
    store = RedisLimits(client, key_prefix=f"t{next(_prefixes)}", timeout_s=0.3, max_calls=1)
    limits = KeyLimits(rpm=5)
    try:
        assert (await store.admit("k", limits, 1)).allowed  # the connection, pooled
        blocker = asyncio.ensure_future(busy.eval(_BUSY, 0))
        await asyncio.sleep(0.1)
        with pytest.raises(TimeoutError):
            await store.admit("k", limits, 1)  # sent, its answer comes after the timeout
        await blocker
        usage = await store.usage("k", limits)
        assert isinstance(usage, dict) and usage["source"] == "redis"
        # The timed-out admit ran when Redis woke (it may: the undo is FailoverLimits'),
        # so two of five are used, and this third is counted as the third.
        assert usage["requests_remaining"] == 3
        third = await store.admit("k", limits, 1)
        assert third.allowed and third.ticket is not None
        assert dict(third.headers)[b"x-ratelimit-remaining-requests"] == b"2"
    finally:
        await client.aclose()
        await busy.aclose()
