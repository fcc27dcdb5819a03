"""The lean HTTP/1.1 client against small real socket servers, under asyncio and uvloop."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from providers.http1 import ConnectFailed, ConnectionBroken, ConnectionPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[None]], None]:
    runner = asyncio.run if request.param == "asyncio" else uvloop.run
    return lambda coroutine: runner(coroutine)  # type: ignore[arg-type,return-value]


class Server:
    """A socket server that counts connections and notices when clients close them."""

    def __init__(self, respond: Callable[[asyncio.StreamWriter, bytes], Awaitable[bool]]) -> None:
        self.respond = respond
        self.connections = 0
        self.closed_by_client = asyncio.Event()
        self.requests: list[bytes] = []

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ssl_context)
        port = self.server.sockets[0].getsockname()[1]
        if ssl_context is not None:
            return f"https://localhost:{port}"
        return f"http://127.0.0.1:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if not await self.respond(writer, head):
                    writer.close()  # the response ends where the connection does
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client.set()
        writer.close()

    async def stop(self) -> None:
        self.server.close()


def fixed(
    response: bytes, keep_open: bool = True
) -> Callable[[asyncio.StreamWriter, bytes], Awaitable[bool]]:
    async def respond(writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(response)
        await writer.drain()
        return keep_open

    return respond


def pool(url: str, **options: float) -> ConnectionPool:
    return ConnectionPool(
        url,
        max_connections=int(options.get("max_connections", 8)),
        keepalive_s=options.get("keepalive_s", 4.0),
        connect_timeout_s=options.get("connect_timeout_s", 1.0),
    )


OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


def test_keep_alive_reuses_one_connection(run) -> None:
    async def main() -> None:
        server = Server(fixed(OK))
        client = pool(await server.start())
        for _ in range(5):
            response = await client.request(b"POST", b"/v1/x", b"X-Request-ID: a\r\n", b"{}")
            assert response.status == 200 and response.header(b"content-type") == "application/json"
            assert await response.read(100) == b"{}"
        assert server.connections == 1
        head = server.requests[0]
        assert head.startswith(b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"Content-Length: 2\r\n" in head and b"X-Request-ID: a\r\n" in head
        await client.aclose()
        await server.stop()

    run(main())


def test_base_path_is_prefixed(run) -> None:
    async def main() -> None:
        server = Server(fixed(OK))
        client = pool(await server.start() + "/proxy/")
        await (await client.request(b"POST", b"/v1/x", b"", b"")).read(10)
        assert server.requests[0].startswith(b"POST /proxy/v1/x HTTP/1.1")
        await client.aclose()

    run(main())


def test_chunked_body_streams_in_pieces_and_ends(run) -> None:
    async def respond(writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in (b"one", b"two", b"three"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        return True

    async def main() -> None:
        server = Server(respond)
        client = pool(await server.start())
        response = await client.request(b"POST", b"/", b"", b"")
        pieces = [piece async for piece in response.chunks()]
        assert b"".join(pieces) == b"onetwothree" and len(pieces) >= 2
        # The exchange ended cleanly, so the connection went back to the pool.
        await (await client.request(b"POST", b"/", b"", b"")).read(100)
        assert server.connections == 1
        await client.aclose()

    run(main())


def test_body_ending_at_close(run) -> None:
    async def main() -> None:
        server = Server(fixed(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end", False))
        client = pool(await server.start())
        response = await client.request(b"GET", b"/", b"", b"")
        assert await response.read(100) == b"until the end"
        await client.aclose()

    run(main())


def test_large_body_is_read_whole_despite_flow_control(run) -> None:
    big = b"x" * (3 * 1024 * 1024)

    async def main() -> None:
        server = Server(fixed(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(big), big)))
        client = pool(await server.start())
        assert await (await client.request(b"POST", b"/", b"", b"")).read(len(big)) == big
        with pytest.raises(ConnectionBroken, match="over"):
            await (await client.request(b"POST", b"/", b"", b"")).read(1024)
        await client.aclose()

    run(main())


def test_cut_off_body_is_broken(run) -> None:
    async def main() -> None:
        server = Server(fixed(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this", False))
        client = pool(await server.start())
        response = await client.request(b"POST", b"/", b"", b"")
        received = b""
        with pytest.raises(ConnectionBroken, match="closed"):
            async for piece in response.chunks():
                received += piece
        assert received == b"only this"
        await client.aclose()

    run(main())


def test_malformed_response_is_broken(run) -> None:
    async def main() -> None:
        server = Server(fixed(b"NOT HTTP AT ALL\r\n\r\n"))
        client = pool(await server.start())
        with pytest.raises(ConnectionBroken, match="malformed"):
            await client.request(b"POST", b"/", b"", b"")
        await client.aclose()

    run(main())


def test_refused_connection_fails_to_connect(run) -> None:
    async def main() -> None:
        server = Server(fixed(OK))
        url = await server.start()
        await server.stop()
        server.server.close()
        await server.server.wait_closed()
        with pytest.raises(ConnectFailed) as caught:
            await pool(url).request(b"POST", b"/", b"", b"")
        assert not caught.value.timed_out

    run(main())


def test_cancelling_mid_stream_closes_the_connection(run) -> None:
    async def respond(writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        return True  # and then nothing more: the upstream is still "generating"

    async def main() -> None:
        server = Server(respond)
        client = pool(await server.start())
        response = await client.request(b"POST", b"/", b"", b"")
        chunks = response.chunks()
        assert await anext(chunks) == b"hello"
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await anext(chunks)
        # The upstream learns at once that nobody is listening any more.
        async with asyncio.timeout(2):
            await server.closed_by_client.wait()
        await client.aclose()

    run(main())


def test_connections_are_bounded(run) -> None:
    release = asyncio.Event

    async def main() -> None:
        go = release()

        async def respond(writer: asyncio.StreamWriter, head: bytes) -> bool:
            await go.wait()
            writer.write(OK)
            return True

        server = Server(respond)
        client = pool(await server.start(), max_connections=2)
        pending = [asyncio.create_task(client.request(b"POST", b"/", b"", b"")) for _ in range(5)]
        await asyncio.sleep(0.1)
        assert server.connections == 2 and not any(task.done() for task in pending)
        go.set()
        for task in pending:
            assert await (await task).read(10) == b"{}"
        assert server.connections == 2
        await client.aclose()

    run(main())


def test_idle_connections_expire(run) -> None:
    async def main() -> None:
        server = Server(fixed(OK))
        client = pool(await server.start(), keepalive_s=0.0)
        for _ in range(3):
            await (await client.request(b"POST", b"/", b"", b"")).read(10)
        assert server.connections == 3
        await client.aclose()

    run(main())


def test_tls(run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client trusts this one certificate

    async def main() -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        server = Server(fixed(OK))
        client = pool(await server.start(context))
        response = await client.request(b"POST", b"/", b"", b"")
        assert await response.read(10) == b"{}"
        assert server.requests[0].split(b"\r\n")[1].startswith(b"Host: localhost:")
        await client.aclose()

    run(main())


def test_connect_timeout(run) -> None:
    # A listener that never accepts, its backlog filled: further connects hang in SYN.
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)

    async def main() -> None:
        client = pool(f"http://127.0.0.1:{port}", connect_timeout_s=0.2)
        with pytest.raises(ConnectFailed) as caught:
            await client.request(b"POST", b"/", b"", b"")
        assert caught.value.timed_out

    try:
        run(main())
    finally:
        for sock in (*fillers, listener):
            sock.close()
