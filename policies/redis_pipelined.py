"""A lean asyncio Redis client for the request path: one connection, auto-pipelined.

Per-key limits and the response cache put a Redis call on every request, so the client's
own cost is paid per request. redis-py's asyncio client costs far more than the gateway's
whole request (bench/limits.py: about 300 µs of CPU per admit at 50 concurrent requests):
a pool checkout, a StreamWriter write and drain, and a read per call. This client is the
protocol and nothing else, the way the HTTP client stands on httptools:

- one connection per process (Redis runs commands one at a time; pipelining, not more
  connections, is what makes it go faster), opened on first use and again after it is lost;
- every command issued in the same event-loop turn goes out in ONE write (auto-pipelining),
  so 50 requests checking their limits at once cost one syscall each way, not 50;
- replies are parsed by hiredis's C reader and handed to their callers in order.

It speaks redis-py's API where the limits and the cache use it (`register_script`,
`pipeline`, `get`, `set`, `mget`, `delete`, `script_load`, `execute_command`) and raises
redis-py's exceptions (`ResponseError`, `NoScriptError`, `ConnectionError`), so the stores
and their failure handling do not know which client they hold. It serves only `redis.url`
(redis://, rediss://, unix://); behind Sentinel or a Cluster the stores keep redis-py.

A call is never retried here and has no timeout of its own: the stores bound every call
(`asyncio.timeout`), and a reply that comes after its caller gave up is read and dropped,
so the replies that follow still reach their own callers. A lost connection fails every
call in flight with `ConnectionError`; the next call opens a new one (bounded by
`socket_timeout_s`).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from gateway.config import RedisConfig

Arg = str | bytes | int | float

# Calls in flight at once on the one connection: they share its writes, so the bound is
# there to cap the memory of a stalled server's backlog, not to ration connections.
PIPELINED_MAX_CALLS = 4096


class _Reply(ResponseError):
    """What hiredis's reader builds for an error reply; turned into redis-py's class."""


def _error(reply: _Reply) -> ResponseError:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


class _Connection(asyncio.Protocol):
    """One connection: writes what was issued in a loop turn at once, resolves replies in
    order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._reader = hiredis.Reader(replyError=_Reply)
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._outgoing: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self.lost: BaseException | None = None
        self.commands = 0  # sent, and the writes they took: how well they were batched
        self.writes = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport's subclasses, but behave as one
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiters = self._waiters
        try:
            while (reply := reader.gets()) is not False:
                waiter = waiters.popleft()
                if waiter.done():  # its caller gave up (timeout, cancel): dropped
                    continue
                if isinstance(reply, _Reply):
                    waiter.set_exception(_error(reply))
                else:
                    waiter.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as error:
            self._fail(RedisConnectionError(f"redis protocol error: {error}"))
            if self._transport is not None:
                self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"redis connection lost ({exc})" if exc else "redis closed the connection"
        self._fail(RedisConnectionError(reason))

    # calls

    @property
    def usable(self) -> bool:
        return self.lost is None and self._transport is not None

    def call(self, args: Sequence[Arg]) -> asyncio.Future[Any]:
        if self.lost is not None:
            raise self.lost
        future: asyncio.Future[Any] = self._loop.create_future()
        self._waiters.append(future)
        # (hiredis's stub types the tuple as of one element: any length is packed)
        self._outgoing.append(hiredis.pack_command(tuple(args)))  # type: ignore[arg-type]
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        outgoing, self._outgoing = self._outgoing, []
        if self._transport is not None and self.lost is None and outgoing:
            self._transport.write(b"".join(outgoing))
            self.commands += len(outgoing)
            self.writes += 1

    def _fail(self, error: RedisConnectionError) -> None:
        if self.lost is None:
            self.lost = error
        self._outgoing.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def close(self) -> None:
        self._fail(RedisConnectionError("redis client closed"))
        if self._transport is not None:
            self._transport.close()


class RedisAddress:
    """Where and how to connect, from a redis://, rediss:// or unix:// URL."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{url!r} is not a redis://, rediss:// or unix:// URL")
        self.unix_path = parts.path if parts.scheme == "unix" else None
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 6379
        self.tls = parts.scheme == "rediss"
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        query = dict(pair.split("=", 1) for pair in parts.query.split("&") if "=" in pair)
        db = query.get("db")
        if db is None and parts.scheme != "unix" and parts.path.strip("/"):
            db = parts.path.strip("/")
        self.db = int(db) if db else 0

    def handshake(self, client_name: str | None) -> list[tuple[Arg, ...]]:
        """The commands a new connection sends before any other."""
        commands: list[tuple[Arg, ...]] = []
        if self.password is not None:
            if self.username is not None:
                commands.append(("AUTH", self.username, self.password))
            else:
                commands.append(("AUTH", self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        if client_name:
            commands.append(("CLIENT", "SETNAME", client_name))
        return commands


class PipelinedRedis:
    """The client (see the module's docstring). `aclose` closes its connection."""

    def __init__(
        self, url: str, *, socket_timeout_s: float = 0.5, client_name: str | None = "vgate"
    ) -> None:
        self.address = RedisAddress(url)
        self.connect_timeout_s = socket_timeout_s
        self.client_name = client_name
        self._connection: _Connection | None = None
        self.commands = 0  # sent on connections since closed (`sent()` adds the open one's)
        self.writes = 0
        self._opening: asyncio.Task[_Connection] | None = None
        self._closed = False

    # the one primitive

    async def execute_command(self, *args: Arg, **_options: Any) -> Any:
        connection = self._connection
        if connection is None or not connection.usable:
            connection = await self._connect()
        return await connection.call(args)

    async def _connect(self) -> _Connection:
        if self._closed:
            raise RedisConnectionError("redis client closed")
        # Called only while there is no usable connection: an opening that is done (the
        # connection it made was lost since, or it failed) is stale.
        if self._opening is None or self._opening.done():
            self._opening = asyncio.get_running_loop().create_task(self._open())
            # retrieved here, should every caller have given up waiting for it
            self._opening.add_done_callback(lambda task: task.cancelled() or task.exception())
        opening = self._opening
        try:
            # Shielded: one caller's timeout does not cancel the others' connection.
            return await asyncio.shield(opening)
        finally:
            if opening.done() and self._opening is opening:
                self._opening = None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        connection = _Connection(loop)
        address = self.address
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if address.unix_path is not None:
                    await loop.create_unix_connection(lambda: connection, address.unix_path)
                else:
                    context = ssl.create_default_context() if address.tls else None
                    await loop.create_connection(
                        lambda: connection, address.host, address.port, ssl=context
                    )
                replies = [
                    connection.call(command) for command in address.handshake(self.client_name)
                ]
                for reply in replies:
                    await reply
        except BaseException:
            connection.close()
            raise
        old, self._connection = self._connection, connection
        if old is not None:
            self._retire(old)
        return connection

    def _retire(self, connection: _Connection) -> None:
        connection.close()
        self.commands += connection.commands
        self.writes += connection.writes

    def sent(self) -> tuple[int, int]:
        """Commands sent and the writes they took, since this client was made."""
        connection = self._connection
        if connection is None:
            return self.commands, self.writes
        return self.commands + connection.commands, self.writes + connection.writes

    async def aclose(self) -> None:
        self._closed = True
        if self._opening is not None:
            self._opening.cancel()
            self._opening = None
        if self._connection is not None:
            self._retire(self._connection)
            self._connection = None

    # redis-py's API, the part the stores use

    def register_script(self, source: str) -> Script:
        return Script(self, source)

    def pipeline(self, transaction: bool = False) -> Pipeline:
        if transaction:
            raise ValueError("this client pipelines; it has no MULTI transactions")
        return Pipeline(self)

    async def script_load(self, source: str) -> str:
        sha = await self.execute_command("SCRIPT", "LOAD", source)
        return sha.decode() if isinstance(sha, bytes) else str(sha)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Arg) -> Any:
        return await self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    async def get(self, key: str) -> bytes | None:
        return await self.execute_command("GET", key)  # type: ignore[no-any-return]

    async def mget(self, keys: Iterable[str]) -> list[bytes | None]:
        keys = list(keys)
        if not keys:
            return []
        return await self.execute_command("MGET", *keys)  # type: ignore[no-any-return]

    async def set(
        self, key: str, value: Arg, *, px: int | None = None, nx: bool = False
    ) -> bool | None:
        args: list[Arg] = ["SET", key, value]
        if px is not None:
            args += ["PX", px]
        if nx:
            args.append("NX")
        reply = await self.execute_command(*args)
        return True if reply == b"OK" else None

    async def exists(self, *keys: str) -> int:
        return await self.execute_command("EXISTS", *keys)  # type: ignore[no-any-return]

    async def delete(self, *keys: str) -> int:
        return await self.execute_command("DEL", *keys)  # type: ignore[no-any-return]

    async def ping(self) -> bool:
        return bool(await self.execute_command("PING") == b"PONG")


class Script:
    """redis-py's `Script`: EVALSHA, and on NOSCRIPT (a restarted or flushed server) the
    script loaded and run again once."""

    def __init__(self, client: PipelinedRedis, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Any:
        try:
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.sha = await self.client.script_load(self.source)
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)


class Pipeline:
    """Commands queued, then sent together by `execute` (they go out in one write, as every
    command of a loop turn does) and answered in order. No MULTI: not a transaction."""

    def __init__(self, client: PipelinedRedis) -> None:
        self.client = client
        self._commands: list[tuple[Arg, ...]] = []

    def execute_command(self, *args: Arg) -> Pipeline:
        self._commands.append(args)
        return self

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Arg) -> Pipeline:
        return self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    def get(self, key: str) -> Pipeline:
        return self.execute_command("GET", key)

    def exists(self, *keys: str) -> Pipeline:
        return self.execute_command("EXISTS", *keys)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        commands, self._commands = self._commands, []
        if not commands:
            return []
        connection = self.client._connection
        if connection is None or not connection.usable:
            connection = await self.client._connect()
        futures = [connection.call(command) for command in commands]
        results: list[Any] = await asyncio.gather(*futures, return_exceptions=True)
        if raise_on_error:
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results


def request_path_client(config: RedisConfig) -> PipelinedRedis | None:
    """The client for the calls made on a request's path (limits, cache lookups) where
    this client serves the deployment (one server at `redis.url`); None: use redis-py's."""
    if config.url is None or config.sentinel is not None or config.cluster is not None:
        return None
    if config.request_client != "pipelined":
        return None
    return PipelinedRedis(config.url, socket_timeout_s=config.socket_timeout_s)
