"""Breaker state shared through a real redis-server: two `BreakerSync`s in one test are two
gateway processes' views (each its own client, breaker and origin)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from gateway.config import BreakerConfig, RedisConfig
from policies.breaker import BackendBreaker
from policies.breaker_sync import MAX_AHEAD_S, BreakerSync
from policies.redis_state import RedisHealth, create_client
from tests.policies.test_breaker import fail, succeed
from tests.servers import RedisServer, start_redis

TIMEOUT_S = 1.0  # a Redis call this slow is an outage; a loaded machine's slow one is not
_prefixes = count()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


class Process:
    """One gateway process's view: its own breaker, client and sync."""

    def __init__(self, url: str, prefix: str, config: BreakerConfig) -> None:
        self.breaker = BackendBreaker("w1", config, route="tiny-llama")
        self.redis = create_client(RedisConfig(url=url, socket_timeout_s=TIMEOUT_S))
        self.health_changes: list[bool] = []
        self.applied: list[str] = []
        self.sync = BreakerSync(
            self.redis,
            [self.breaker],
            key_prefix=prefix,
            timeout_s=TIMEOUT_S,
            health=RedisHealth("breaker", lambda _, up: self.health_changes.append(up)),
            on_applied=lambda _, state: self.applied.append(state),
            check_interval_s=0.2,
            backoff_initial_s=0.02,
            backoff_max_s=0.2,
        )

    async def aclose(self) -> None:
        await self.sync.aclose()
        await self.redis.aclose()


Start = Callable[..., Awaitable[Process]]


@pytest.fixture
async def start(redis_server: RedisServer) -> AsyncIterator[Start]:
    """Start processes sharing one key prefix (a fresh one per test)."""
    prefix = f"test{next(_prefixes)}"
    started: list[Process] = []

    async def start_one(url: str = redis_server.url, **breaker: Any) -> Process:
        config = BreakerConfig(
            **{"consecutive_failures": 2, "open_s": 0.3, "min_requests": 1000, **breaker}
        )
        process = Process(url, prefix, config)
        started.append(process)
        await process.sync.start()
        return process

    yield start_one
    for process in started:
        await process.aclose()


async def eventually(predicate: Callable[[], Any], timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last: {result!r})")
        await asyncio.sleep(0.005)


def trip(breaker: BackendBreaker) -> None:
    while breaker.state != "open":
        fail(breaker)


async def wait_until_cooled(breaker: BackendBreaker) -> None:
    await eventually(breaker.allows)


async def test_a_breaker_opened_in_one_process_is_seen_open_by_another(start: Start) -> None:
    a, b = await start(open_s=30), await start(open_s=30)  # still open when b is checked
    trip(a.breaker)
    await eventually(lambda: b.breaker.state == "open")
    assert not b.breaker.allows()
    # The same cool-down: both processes probe again at the same moment.
    assert a.breaker.opened_at is not None and b.breaker.opened_at is not None
    assert abs(a.breaker.opened_at - b.breaker.opened_at) < 1e-5
    assert b.applied == ["open"]


async def test_a_close_propagates(start: Start) -> None:
    a, b = await start(), await start()
    trip(a.breaker)
    await eventually(lambda: b.breaker.state == "open")
    await wait_until_cooled(a.breaker)
    succeed(a.breaker)  # a's probe closes it...
    assert a.breaker.state == "closed"
    await eventually(lambda: b.breaker.state == "closed")  # ...for b too
    assert b.breaker.allows()
    assert b.applied == ["open", "closed"]


async def test_a_failed_probe_elsewhere_restarts_the_shared_cool_down(start: Start) -> None:
    # Cooling down for 2 s: b still is when it is checked, after the news reached it.
    a, b = await start(open_s=2), await start(open_s=2)
    trip(a.breaker)
    await eventually(lambda: b.breaker.state == "open")
    first = b.breaker.opened_at
    await wait_until_cooled(a.breaker)
    fail(a.breaker)  # the probe fails: open again, from now
    assert first is not None
    await eventually(lambda: (b.breaker.opened_at or 0) > first)
    assert not b.breaker.allows()


async def test_a_process_that_starts_late_sees_the_open_breaker(start: Start) -> None:
    a = await start(open_s=30)
    trip(a.breaker)
    await eventually(lambda: not a.sync._pending)  # published
    late = await start(open_s=30)
    # start() returns after catching up: open before the late process serves anything.
    assert late.breaker.state == "open" and not late.breaker.allows()


async def test_applied_transitions_are_not_published_again(
    start: Start, redis_server: RedisServer
) -> None:
    a, b = await start(), await start()
    echoes: list[BackendBreaker] = []
    b.breaker.on_local_change = echoes.append  # what b would publish
    monitor = Redis.from_url(redis_server.url)
    pubsub = monitor.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(a.sync.channel)
    try:
        trip(a.breaker)
        await eventually(lambda: b.breaker.state == "open")
        await wait_until_cooled(a.breaker)
        succeed(a.breaker)
        await eventually(lambda: b.breaker.state == "closed")
        await monitor.publish(a.sync.channel, b"end")
        origins, states = [], []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = await pubsub.get_message(timeout=1)
            if message is None:  # the subscription's own confirmation, filtered out
                continue
            if message["data"] == b"end":
                break
            event = orjson.loads(message["data"])
            origins.append(event["origin"])
            states.append(event["state"])
        assert set(origins) == {a.sync.origin}  # b said nothing
        assert states[0] == "open" and states[-1] == "closed"
        assert echoes == [] and not b.breaker.changed_locally
        assert a.breaker.changed_locally and a.applied == []  # a ignored its own messages
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await monitor.aclose()


async def test_an_older_transition_never_overrides_a_newer_one(
    start: Start, redis_server: RedisServer
) -> None:
    a = await start(open_s=30)
    now = time.time()
    # Arrived late (a publish retried after an outage): older than what a knows.
    assert a.breaker.apply_remote("open", now, now)
    assert not a.breaker.apply_remote("closed", None, now - 1)
    assert a.breaker.state == "open"
    # The key holds only the newest too: the script refuses an older write.
    trip_at = a.breaker.changed_at
    client = Redis.from_url(redis_server.url)
    try:
        a.breaker.apply_remote("closed", None, now + 1)
        trip(a.breaker)
        await eventually(lambda: not a.sync._pending)
        key = a.sync.key(a.breaker)
        stored = orjson.loads(await client.get(key) or b"{}")
        assert stored["state"] == "open" and stored["at"] > trip_at
        stale = await a.sync._script(
            keys=[key], args=[b'{"stale": true}', repr(stored["at"] - 10), 60, "x", MAX_AHEAD_S]
        )
        assert stale == 0
        assert orjson.loads(await client.get(key) or b"{}") == stored
    finally:
        await client.aclose()


async def test_redis_down_local_breakers_work_and_sync_resumes_when_it_is_back(
    start: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vgate.redis")
    own = start_redis(tmp_path)
    try:
        a, b = await start(own.url, open_s=30), await start(own.url, open_s=30)
        assert a.health_changes == [True] and b.health_changes == [True]
        own.kill()
        await eventually(lambda: a.sync.health.up is False and b.sync.health.up is False)
        # Local decisions go on, at once, without Redis.
        began = time.monotonic()
        trip(a.breaker)
        assert time.monotonic() - began < 0.5  # well under a Redis timeout (1 s)
        assert a.breaker.state == "open" and not a.breaker.allows()
        assert b.breaker.state == "closed"
        await asyncio.sleep(0.5)  # several failed reconnects and publishes: one episode
        assert a.health_changes == [True, False] and b.health_changes == [True, False]
        warnings = [
            r for r in caplog.records if r.name == "vgate.redis" and r.levelno == logging.WARNING
        ]
        assert len(warnings) == 2 and "unreachable" in warnings[0].getMessage()

        own = start_redis(tmp_path, port=own.port)  # an empty Redis: it kept nothing
        await eventually(lambda: b.breaker.state == "open")  # a republished, b caught up
        assert a.health_changes == [True, False, True]
        assert b.health_changes == [True, False, True]
        recovered = [
            r for r in caplog.records if r.name == "vgate.redis" and r.levelno == logging.INFO
        ]
        assert len(recovered) == 2 and "reachable again" in recovered[0].getMessage()
    finally:
        own.stop()


async def test_a_slow_redis_never_holds_up_a_transition(
    start: Start, redis_server: RedisServer
) -> None:
    a, b = await start(), await start()
    client = Redis.from_url(redis_server.url)
    try:
        # Paused for three Redis timeouts: a transition that waited on Redis would show.
        await client.execute_command("CLIENT", "PAUSE", "3000", "ALL")
        began = time.monotonic()
        trip(a.breaker)
        assert time.monotonic() - began < 0.5
        await eventually(lambda: a.sync.health.up is False)  # the publish timed out
        await eventually(lambda: b.breaker.state == "open")  # and went out once Redis woke
        assert a.sync.health.up
    finally:
        await client.aclose()


async def test_a_lost_message_is_caught_up_from_the_keys(
    start: Start, redis_server: RedisServer
) -> None:
    b = await start()
    now = time.time()
    event = {"route": "tiny-llama", "backend": "w1", "state": "open", "opened_at": now}
    client = Redis.from_url(redis_server.url)
    try:  # the key written, its message never heard (sent while b's subscription was away)
        await client.set(b.sync.key(b.breaker), orjson.dumps({**event, "at": now, "origin": "x"}))
        await eventually(lambda: b.breaker.state == "open")
    finally:
        await client.aclose()


async def test_malformed_messages_and_unknown_backends_are_ignored(start: Start) -> None:
    a = await start()
    a.sync._receive(b"not json")
    a.sync._receive(orjson.dumps({"route": "other", "backend": "w1", "state": "open"}))
    event = {"route": "other", "backend": "w1", "state": "open", "opened_at": 1.0}
    a.sync._receive(orjson.dumps({**event, "at": time.time(), "origin": "elsewhere"}))
    assert a.breaker.state == "closed"


@pytest.mark.parametrize(
    "poison",
    [
        {"state": "open", "opened_at": -1e300, "at": "now"},  # no datetime holds it
        {"state": "open", "opened_at": "nan", "at": "now"},
        {"state": "closed", "opened_at": None, "at": 1e300},  # would outrank every transition
        {"state": "closed", "opened_at": None, "at": "inf"},
    ],
    ids=["opened-out-of-range", "opened-nan", "at-far-ahead", "at-infinite"],
)
async def test_a_key_with_impossible_times_poisons_no_breaker(
    redis_server: RedisServer, poison: dict[str, Any]
) -> None:
    """A value in Redis with times no process could have written (another version's, a
    clock years off, a hand edit) must not stop the others from being shared: it raised
    in the catch-up (the keys after it never read, the subscription never listened), or
    outranked every later transition of its breaker for as long as it was kept."""
    prefix = f"poison{next(_prefixes)}"
    config = BreakerConfig(consecutive_failures=2, open_s=30, min_requests=1000)
    clients: list[Redis] = []
    syncs: list[BreakerSync] = []

    def process() -> tuple[BackendBreaker, BackendBreaker, BreakerSync]:
        w1 = BackendBreaker("w1", config, route="tiny-llama")
        w2 = BackendBreaker("w2", config, route="tiny-llama")
        client = create_client(RedisConfig(url=redis_server.url, socket_timeout_s=TIMEOUT_S))
        sync = BreakerSync(
            client,
            [w1, w2],
            key_prefix=prefix,
            timeout_s=TIMEOUT_S,
            check_interval_s=0.2,
            backoff_initial_s=0.02,
            backoff_max_s=0.2,
        )
        clients.append(client)
        syncs.append(sync)
        return w1, w2, sync

    a1, a2, a = process()
    b1, b2, b = process()
    now = time.time()
    value = {"route": "tiny-llama", "backend": "w1", "origin": "elsewhere", **poison}
    value["at"] = now if value["at"] == "now" else value["at"]
    writer = Redis.from_url(redis_server.url)
    try:
        await writer.set(a.key(a1), orjson.dumps(value))
        await a.start()
        await b.start()
        trip(a2)  # another backend: its sharing must not wait on w1's bad key
        await eventually(lambda: b2.state == "open")
        trip(a1)  # and w1's own transitions are shared again (the bad key overwritten)
        await eventually(lambda: b1.state == "open")
        assert b1.changed_at < now + 3600
    finally:
        for sync in syncs:
            await sync.aclose()
        for client in clients:
            await client.aclose()
        await writer.aclose()


class SilentProxy:
    """A TCP proxy to Redis whose subscriptions can go silent: their bytes stop flowing
    either way without a FIN or RST, as when a cable is pulled or a NAT entry dropped."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.subscriptions = 0  # connections that sent SUBSCRIBE
        self._silenced: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def silence_subscriptions(self) -> None:
        self._silenced.update(range(1, self.subscriptions + 1))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.redis_port
        )
        number = [0]  # this connection's subscription number, once it subscribes

        async def pump(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, outgoing: bool
        ) -> None:
            while data := await source.read(65536):
                if outgoing and not number[0] and b"SUBSCRIBE" in data.upper():
                    self.subscriptions += 1
                    number[0] = self.subscriptions
                if number[0] in self._silenced:
                    continue  # swallowed: no answer, no error, the socket stays open
                sink.write(data)
                await sink.drain()

        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(
                pump(reader, upstream_writer, True), pump(upstream_reader, writer, False)
            )
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            upstream_writer.close()
            self._tasks.discard(task)

    async def aclose(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def test_a_subscription_that_went_silent_is_noticed_and_made_again(
    redis_server: RedisServer,
) -> None:
    """No FIN, no RST: only the missing answer to its PING tells the subscriber that its
    connection is dead; without noticing, it would hear no transition again (catching up
    from the keys every check_interval_s would be all that is left)."""
    proxy = SilentProxy(redis_server.port)
    url = await proxy.start()
    breaker = BackendBreaker("w1", BreakerConfig(), route="tiny-llama")
    client = create_client(RedisConfig(url=url, socket_timeout_s=TIMEOUT_S))
    sync = BreakerSync(
        client,
        [breaker],
        key_prefix=f"silent{next(_prefixes)}",
        timeout_s=TIMEOUT_S,
        check_interval_s=0.2,
        backoff_initial_s=0.02,
        backoff_max_s=0.2,
    )
    try:
        await sync.start()
        await eventually(lambda: proxy.subscriptions == 1)
        proxy.silence_subscriptions()
        await eventually(lambda: proxy.subscriptions >= 2)  # subscribed again, anew
    finally:
        await sync.aclose()
        await client.aclose()
        await proxy.aclose()


async def test_breakers_replaced_by_a_reload_are_shared_and_the_old_ones_let_go(
    start: Start,
) -> None:
    a, b = await start(open_s=30), await start(open_s=30)
    config = a.breaker.config
    # A config reload on both processes: w1 leaves, w2 comes.
    a_w2 = BackendBreaker("w2", config, route="tiny-llama")
    b_w2 = BackendBreaker("w2", config, route="tiny-llama")
    a.sync.replace([a_w2])
    b.sync.replace([b_w2])
    # The old breaker opens first: were it still published, its message would reach b before
    # the new one's, which a's one publisher sends after it.
    trip(a.breaker)
    trip(a_w2)
    await eventually(lambda: b_w2.state == "open")  # the new one is shared...
    assert b.breaker.state == "closed"  # ...the old one neither published nor followed
    assert a.breaker.on_local_change is None and a_w2.on_local_change is not None
