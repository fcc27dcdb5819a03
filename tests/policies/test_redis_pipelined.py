"""The request path's Redis client against real redis-servers: what it promises beyond
redis-py's API (which tests/policies/test_limits_redis.py runs both clients through)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvloop
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.config import RedisConfig
from policies.redis_pipelined import PipelinedRedis, RedisAddress, request_path_client
from tests.servers import RedisServer, free_port, start_redis

_BUSY_HALF_A_SECOND = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
while true do
  t = redis.call('TIME')
  if t[1] * 1000000 + t[2] - start > 500000 then return 1 end
end
"""


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[PipelinedRedis]:
    client = PipelinedRedis(redis_server.url, socket_timeout_s=2.0)
    yield client
    await client.aclose()


async def test_calls_of_one_loop_turn_share_one_write(client: PipelinedRedis) -> None:
    await client.ping()  # connected
    commands, writes = client.sent()
    replies = await asyncio.gather(
        *(client.set(f"pipelined:{i}", str(i)) for i in range(50)),
        *(client.execute_command("INCR", "pipelined:counter") for _ in range(50)),
    )
    assert replies[:50] == [True] * 50
    assert replies[50:] == list(range(1, 51))  # in order, each its own answer
    sent, wrote = client.sent()
    assert (sent - commands, wrote - writes) == (100, 1)
    values = await client.mget([f"pipelined:{i}" for i in range(50)])
    assert values == [str(i).encode() for i in range(50)]


async def test_an_error_reply_is_the_callers_alone(client: PipelinedRedis) -> None:
    await client.set("pipelined:text", "not a number")
    results = await asyncio.gather(
        client.execute_command("INCR", "pipelined:text"),
        client.execute_command("ECHO", "after"),
        return_exceptions=True,
    )
    assert isinstance(results[0], ResponseError) and "not an integer" in str(results[0])
    assert results[1] == b"after"


async def test_a_script_is_loaded_again_after_a_flush(client: PipelinedRedis) -> None:
    script = client.register_script("return ARGV[1] .. KEYS[1]")
    assert await script(keys=["k"], args=["v"]) == b"vk"
    await client.execute_command("SCRIPT", "FLUSH")
    assert await script(keys=["k"], args=["w"]) == b"wk"  # NOSCRIPT, loaded, run again


async def test_a_pipeline_answers_in_order_and_errors_in_place(client: PipelinedRedis) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.execute_command("SET", "pipelined:p", "1")
    pipe.execute_command("LPUSH", "pipelined:p", "x")  # WRONGTYPE
    pipe.get("pipelined:p")
    ok, wrong, value = await pipe.execute(raise_on_error=False)
    assert ok == b"OK" and isinstance(wrong, ResponseError) and value == b"1"
    with pytest.raises(ValueError):
        client.pipeline(transaction=True)


async def test_a_reply_after_its_caller_gave_up_goes_to_no_one_else(
    client: PipelinedRedis, redis_server: RedisServer
) -> None:
    blocker = Redis.from_url(redis_server.url)
    try:
        await client.ping()
        busy = asyncio.ensure_future(blocker.eval(_BUSY_HALF_A_SECOND, 0))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await client.execute_command("ECHO", "late")
        await busy
        assert await client.execute_command("ECHO", "mine") == b"mine"
    finally:
        await blocker.aclose()


async def test_a_lost_server_fails_the_calls_in_flight_and_a_new_one_is_used(
    tmp_path: Path,
) -> None:
    server = start_redis(tmp_path)
    client = PipelinedRedis(server.url, socket_timeout_s=1.0)
    try:
        assert await client.ping()
        blocked = asyncio.ensure_future(client.execute_command("BLPOP", "never", "0"))
        await asyncio.sleep(0.05)
        server.kill()
        with pytest.raises(RedisConnectionError):
            async with asyncio.timeout(5):  # at once, not after a timeout of its own
                await blocked
        with pytest.raises((RedisConnectionError, OSError)):
            await client.ping()  # nothing listens: refused, no hang
        server = start_redis(tmp_path, port=server.port)
        assert await client.ping()  # a new connection, without being told
    finally:
        await client.aclose()
        server.stop()


async def test_password_and_db_come_from_the_url(tmp_path: Path) -> None:
    server = start_redis(tmp_path, extra_args=["--requirepass", "s3cret"])
    url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
    client = PipelinedRedis(url)
    check = Redis.from_url(url)
    try:
        await client.set("in-db-3", "yes")
        assert await check.get("in-db-3") == b"yes"  # redis-py reads it in db 3
        assert await client.execute_command("CLIENT", "GETNAME") == b"vgate"
        wrong = PipelinedRedis(f"redis://:wrong@127.0.0.1:{server.port}/0")
        with pytest.raises(ResponseError):
            await wrong.ping()
        await wrong.aclose()
    finally:
        await client.aclose()
        await check.aclose()
        server.stop()


async def test_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    server = start_redis(tmp_path, extra_args=["--unixsocket", str(path)])
    client = PipelinedRedis(f"unix://{path}?db=2")
    try:
        await client.set("over-unix", "1")
        assert await client.get("over-unix") == b"1"
        assert client.address.db == 2
    finally:
        await client.aclose()
        server.stop()


async def test_a_server_that_never_answers_bounds_the_connect() -> None:
    """A listener that accepts and says nothing (a hung server): the handshake (CLIENT
    SETNAME) waits at most socket_timeout_s, and so does the call that opened it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen(8)
        host, port = listener.getsockname()
        client = PipelinedRedis(f"redis://{host}:{port}", socket_timeout_s=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await client.ping()
        assert loop.time() - started < 2.0
        await client.aclose()


def test_it_runs_on_uvloop(redis_server: RedisServer) -> None:
    """The gateway's loop is uvloop, whose transports are not asyncio.Transport's."""

    async def main() -> list[object]:
        client = PipelinedRedis(redis_server.url)
        try:
            return list(await asyncio.gather(client.ping(), client.execute_command("ECHO", "x")))
        finally:
            await client.aclose()

    assert uvloop.run(main()) == [True, b"x"]


def test_which_deployments_it_serves() -> None:
    assert isinstance(request_path_client(RedisConfig(url="redis://h:1/0")), PipelinedRedis)
    assert request_path_client(RedisConfig()) is None
    chosen = RedisConfig(url="redis://h:1/0", request_client="redis-py")
    assert request_path_client(chosen) is None
    sentinel = RedisConfig(sentinel={"service_name": "m", "sentinels": ["h:26379"]})
    assert request_path_client(sentinel) is None  # redis-py follows the primary


def test_addresses() -> None:
    plain = RedisAddress("redis://cache.internal")
    assert (plain.host, plain.port, plain.db, plain.tls, plain.password) == (
        "cache.internal",
        6379,
        0,
        False,
        None,
    )
    full = RedisAddress("rediss://user:p%40ss@10.0.0.1:6380/5")
    assert (full.username, full.password, full.db, full.tls) == ("user", "p@ss", 5, True)
    assert full.handshake("vgate") == [
        ("AUTH", "user", "p@ss"),
        ("SELECT", 5),
        ("CLIENT", "SETNAME", "vgate"),
    ]
    with pytest.raises(ValueError):
        RedisAddress("http://nope")
