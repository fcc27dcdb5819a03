"""The lean HTTP/1.1 client against small real socket servers, under asyncio and uvloop."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from gateway.errors import UpstreamBroken, UpstreamBufferFull, UpstreamConnectError
from providers.http1 import ByteBudget, ConnectionPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Respond = Callable[[asyncio.StreamWriter, bytes], Awaitable[bool]]


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
        max_head_bytes=int(options.get("max_head_bytes", 64 * 1024)),
        max_headers=int(options.get("max_headers", 256)),
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


def test_body_ending_at_close_under_a_transfer_coding_other_than_chunked(run) -> None:
    async def main() -> None:
        head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\n\r\n"
        server = Server(fixed(head + b"until the end", False))
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
        with pytest.raises(UpstreamBroken, match="over"):
            await (await client.request(b"POST", b"/", b"", b"")).read(1024)
        await client.aclose()

    run(main())


def test_cut_off_body_is_broken(run) -> None:
    async def main() -> None:
        server = Server(fixed(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this", False))
        client = pool(await server.start())
        response = await client.request(b"POST", b"/", b"", b"")
        received = b""
        with pytest.raises(UpstreamBroken, match="closed"):
            async for piece in response.chunks():
                received += piece
        assert received == b"only this"
        await client.aclose()

    run(main())


def test_malformed_response_is_broken(run) -> None:
    async def main() -> None:
        server = Server(fixed(b"NOT HTTP AT ALL\r\n\r\n"))
        client = pool(await server.start())
        with pytest.raises(UpstreamBroken, match="malformed"):
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
        with pytest.raises(UpstreamConnectError) as caught:
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
        for _ in range(500):  # the two connections, however slow the machine
            if server.connections >= 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # time for any more to arrive, as there must be none
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
        for _ in range(2):
            response = await client.request(b"POST", b"/", b"", b"")
            assert await response.read(10) == b"{}"
        assert server.requests[0].split(b"\r\n")[1].startswith(b"Host: localhost:")
        assert server.connections == 1  # a clean exchange over TLS is pooled too
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
        with pytest.raises(UpstreamConnectError) as caught:
            await client.request(b"POST", b"/", b"", b"")
        assert caught.value.timed_out

    try:
        run(main())
    finally:
        for sock in (*fillers, listener):
            sock.close()


# What a misbehaving upstream sends: each must fail its own exchange, or be skipped, and
# never reach the next caller on a reused connection.

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
# The head of an answer nobody asked for: a reused connection would read the next answer
# as its body, and wait for 100,000 bytes.
UNASKED = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n"


def answer(body: bytes) -> bytes:
    return ANSWER % (len(body), body)


async def until(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    """Poll `predicate` until true, however slow the machine; go on (to fail later) if not."""
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)


def test_interim_answers_are_skipped_and_never_reach_the_next_caller(run) -> None:
    """100 Continue (and 103 with its headers) come before the answer; a client that takes
    one as the answer pools the connection, and the next caller receives this answer."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the first request ("first"), no body
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </hint>\r\n\r\n")
        await writer.drain()
        # The answer takes a while (an LLM generating). A client that took the 100 as the
        # answer has sent the next request on this connection by then.
        try:
            second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.3)
        except TimeoutError:
            second = b""
        writer.write(answer(b'"first"'))
        if second:
            writer.write(answer(b'"second"'))
        await writer.drain()
        while True:  # later requests on this connection: answered in turn
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer(b'"second"'))
            await writer.drain()

    async def main() -> None:
        server = await asyncio.start_server(_quiet(handle), "127.0.0.1", 0)
        client = pool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        first = await client.request(b"GET", b"/", b"", b"")
        first_body = await first.read(100)
        second = await client.request(b"GET", b"/", b"", b"")
        second_body = await second.read(100)
        assert (first.status, first_body, first.header(b"link")) == (200, b'"first"', None)
        assert (second.status, second_body) == (200, b'"second"')
        await client.aclose()
        server.close()

    run(main())


def test_switching_protocols_is_broken(run) -> None:
    async def main() -> None:
        server = Server(
            fixed(
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n"
            )
        )
        client = pool(await server.start())
        with pytest.raises(UpstreamBroken, match=r"switched protocols \(101\)"):
            await client.request(b"GET", b"/", b"", b"")
        await client.aclose()

    run(main())


def test_a_connection_that_receives_bytes_while_idle_is_dropped(run) -> None:
    async def main() -> None:
        speak = asyncio.Event()
        spoken = asyncio.Event()

        async def respond(writer: asyncio.StreamWriter, head: bytes) -> bool:
            writer.write(OK)
            await writer.drain()
            if not speak.is_set():

                async def unasked() -> None:
                    await speak.wait()
                    writer.write(UNASKED)
                    await writer.drain()
                    spoken.set()

                tasks.append(asyncio.create_task(unasked()))
            return True

        tasks: list[asyncio.Task[None]] = []
        server = Server(respond)
        client = pool(await server.start(), keepalive_s=600.0)  # only the bytes may spoil it
        assert await (await client.request(b"POST", b"/", b"", b"")).read(10) == b"{}"
        speak.set()  # the connection idles in the pool now
        await asyncio.wait_for(spoken.wait(), 10)
        await until(lambda: all(c.closed for c in client._idle))
        async with asyncio.timeout(10):  # without the fix: waits for 100,000 bytes, forever
            response = await client.request(b"POST", b"/", b"", b"")
            assert await response.read(10) == b"{}"
        assert server.connections == 2
        await client.aclose()

    run(main())


def test_bytes_after_the_answer_spoil_the_connection(run) -> None:
    async def main() -> None:
        server = Server(fixed(OK + UNASKED))  # more than the answer, in the same write
        client = pool(await server.start())
        first = await client.request(b"POST", b"/", b"", b"")
        assert await first.read(10) == b"{}" and first.header(b"content-length") == "2"
        async with asyncio.timeout(10):
            assert await (await client.request(b"POST", b"/", b"", b"")).read(10) == b"{}"
        assert server.connections == 2
        await client.aclose()

    run(main())


def test_a_connection_the_upstream_closed_while_idle_is_not_reused(run) -> None:
    async def main() -> None:
        server = Server(fixed(OK, keep_open=False))  # keep-alive promised, then closed
        client = pool(await server.start())
        assert await (await client.request(b"POST", b"/", b"", b"")).read(10) == b"{}"
        await until(lambda: all(c.closed for c in client._idle))
        async with asyncio.timeout(10):
            assert await (await client.request(b"POST", b"/", b"", b"")).read(10) == b"{}"
        assert server.connections == 2
        await client.aclose()

    run(main())


def test_an_answer_before_the_request_was_sent_whole_is_not_pooled(run) -> None:
    """An upstream may answer (413, say) without reading the body; the connection still
    holds the body's unsent rest, and the next request would queue behind it."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)  # and never reads the body
        await writer.drain()
        if len(connections) == 1:
            await asyncio.Event().wait()
        while True:  # the second connection serves requests as they come
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(OK)
            await writer.drain()

    connections: list[asyncio.StreamWriter] = []

    async def main() -> None:
        server = await asyncio.start_server(_quiet(handle), "127.0.0.1", 0)
        client = pool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        big = b"x" * (64 * 1024 * 1024)  # more than the sockets' buffers hold
        assert await (await client.request(b"POST", b"/", b"", big)).read(10) == b"{}"
        async with asyncio.timeout(10):
            assert await (await client.request(b"POST", b"/", b"", b"")).read(10) == b"{}"
        assert len(connections) == 2
        await client.aclose()
        server.close()

    run(main())


def test_an_oversized_head_fails_before_it_is_kept(run) -> None:
    total = 64 * 1024 * 1024
    sent = 0
    done = asyncio.Event

    async def main() -> None:
        finished = done()

        async def respond(writer: asyncio.StreamWriter, head: bytes) -> bool:
            nonlocal sent
            writer.write(b"HTTP/1.1 200 OK\r\nx-big: ")
            piece = b"a" * (1024 * 1024)
            try:
                while sent < total:
                    writer.write(piece)
                    await writer.drain()
                    sent += len(piece)
            except ConnectionError:
                pass
            finished.set()
            return False

        server = Server(respond)
        client = pool(await server.start())
        with pytest.raises(UpstreamBroken, match=r"head passed 65536 bytes"):
            await client.request(b"POST", b"/", b"", b"")
        await asyncio.wait_for(finished.wait(), 30)
        assert sent < total  # the client hung up; it never took in the rest
        await client.aclose()

    run(main())


def test_header_fields_are_counted(run) -> None:
    many = b"".join(b"x-%d: 1\r\n" % index for index in range(40))

    async def main() -> None:
        server = Server(fixed(b"HTTP/1.1 200 OK\r\n" + many + b"content-length: 2\r\n\r\n{}"))
        url = await server.start()
        client = pool(url, max_headers=41)  # the 40 and content-length
        assert await (await client.request(b"POST", b"/", b"", b"")).read(10) == b"{}"
        with pytest.raises(UpstreamBroken, match="over 40 header fields"):
            await pool(url, max_headers=40).request(b"POST", b"/", b"", b"")
        await client.aclose()

    run(main())


CHUNKED = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"


def test_trailers_neither_replace_the_head_nor_grow_without_bound(run) -> None:
    async def main() -> None:
        trailer = b"content-type: text/html\r\nx-late: 1\r\n"
        server = Server(fixed(CHUNKED + b"2\r\n{}\r\n0\r\n" + trailer + b"\r\n"))
        client = pool(await server.start())
        for _ in range(2):
            response = await client.request(b"POST", b"/", b"", b"")
            assert await response.read(10) == b"{}"
            assert response.header(b"content-type") == "application/json"
            assert response.header(b"x-late") is None
        assert server.connections == 1  # trailers are part of a clean ending

        endless = b"x-trailer: " + b"a" * (1024 * 1024) + b"\r\n\r\n"
        server = Server(fixed(CHUNKED + b"2\r\n{}\r\n0\r\n" + endless))
        client = pool(await server.start())
        response = await client.request(b"POST", b"/", b"", b"")
        with pytest.raises(UpstreamBroken, match="trailers or chunk-size lines passed"):
            await response.read(10)
        await client.aclose()

    run(main())


def test_chunk_size_lines_are_bounded(run) -> None:
    async def main() -> None:
        extension = b"1;ext=" + b"a" * (1024 * 1024) + b"\r\nx\r\n0\r\n\r\n"
        server = Server(fixed(CHUNKED + b"2\r\n{}\r\n" + extension))
        client = pool(await server.start())
        response = await client.request(b"POST", b"/", b"", b"")
        with pytest.raises(UpstreamBroken, match="chunk-size lines passed"):
            await response.read(100)
        zeros = b"0" * (1024 * 1024) + b"1\r\nx\r\n0\r\n\r\n"  # a size line without end
        server = Server(fixed(CHUNKED + b"2\r\n{}\r\n" + zeros))
        client = pool(await server.start())
        response = await client.request(b"POST", b"/", b"", b"")
        with pytest.raises(UpstreamBroken, match="chunk-size lines passed"):
            await response.read(100)
        # A size beyond 64 bits is llhttp's to refuse.
        server = Server(fixed(CHUNKED + b"1" * 40 + b"\r\nx\r\n0\r\n\r\n"))
        client = pool(await server.start())
        with pytest.raises(UpstreamBroken, match="malformed"):
            await (await client.request(b"POST", b"/", b"", b"")).read(100)
        await client.aclose()

    run(main())


def test_bodies_read_whole_count_against_a_shared_budget(run) -> None:
    body = b"x" * 3000

    async def main() -> None:
        server = Server(fixed(answer(body)))
        client = pool(await server.start())
        budget = ByteBudget(5000)
        first = await client.request(b"POST", b"/", b"", b"")
        second = await client.request(b"POST", b"/", b"", b"")
        # The first holds 3,000 bytes until it is closed; the second cannot have 3,000 more.
        first_read = asyncio.create_task(first.read(10_000, budget))
        assert await first_read == body and budget.used == 0  # read whole: closed, given back
        budget.used = 2500  # as if another read held this much now
        with pytest.raises(UpstreamBufferFull) as caught:
            await second.read(10_000, budget)
        assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "1"}
        assert budget.used == 2500  # nothing kept by the failed read
        third = await client.request(b"POST", b"/", b"", b"")
        with pytest.raises(UpstreamBroken, match=r"over 1000 bytes \(upstream.max_body_bytes\)"):
            await third.read(1000, budget, "upstream.max_body_bytes")
        assert budget.used == 2500
        await client.aclose()

    run(main())


def _quiet(handle: Handler) -> Handler:
    """A raw handler whose peer may vanish at any point (the client under test hangs up)."""

    async def quiet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return quiet


def paced_chunks(*pieces: bytes, pause_s: float = 0.01) -> Respond:
    async def respond(writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(CHUNKED)
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(pause_s)
        writer.write(b"0\r\n\r\n")
        return True

    return respond


def test_pump_hands_each_piece_to_the_sink_and_reuses_the_connection(run) -> None:
    async def main() -> None:
        server = Server(paced_chunks(b"one", b"two", b"three"))
        client = pool(await server.start())
        response = await client.request(b"POST", b"/", b"", b"")
        pieces: list[bytes] = []
        assert await response.pump(lambda piece: pieces.append(piece) or False) is True
        assert b"".join(pieces) == b"onetwothree" and len(pieces) >= 2
        await (await client.request(b"POST", b"/", b"", b"")).read(100)
        assert server.connections == 1
        await client.aclose()

    run(main())


def test_pump_pauses_when_the_sink_asks_and_goes_on_when_called_again(run) -> None:
    async def main() -> None:
        server = Server(paced_chunks(b"one", b"two", b"three"))
        client = pool(await server.start())
        response = await client.request(b"POST", b"/", b"", b"")
        pieces: list[bytes] = []
        calls = 0
        ended = False
        while not ended:
            calls += 1
            ended = await response.pump(lambda piece: pieces.append(piece) or True)
        assert b"".join(pieces) == b"onetwothree"
        assert calls >= 3  # a pause after every piece until the end
        await (await client.request(b"POST", b"/", b"", b"")).read(100)
        assert server.connections == 1
        await client.aclose()

    run(main())


def test_a_connection_paused_as_its_answer_ended_reads_again_in_the_pool(run) -> None:
    """A sink that pauses on the last piece leaves its connection paused: pooled so, the
    next exchange on it would never hear its answer."""

    async def respond(writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(CHUNKED)
        await writer.drain()
        await asyncio.sleep(0.02)  # the body comes while `pump` waits for it
        writer.write(b"2\r\n{}\r\n0\r\n\r\n")
        return True

    async def main() -> None:
        server = Server(respond)
        client = pool(await server.start())
        for _ in range(3):
            async with asyncio.timeout(5):  # a paused pooled connection would wait forever
                response = await client.request(b"POST", b"/", b"", b"")
                while not await response.pump(lambda piece: True):
                    pass
        assert server.connections == 1
        await client.aclose()

    run(main())


def test_pump_after_chunks_gives_what_was_buffered_first(run) -> None:
    async def main() -> None:
        server = Server(paced_chunks(b"one", b"two", b"three", pause_s=0.05))
        client = pool(await server.start())
        response = await client.request(b"POST", b"/", b"", b"")
        first = await anext(response.chunks())
        await asyncio.sleep(0.07)  # "two" arrives and is buffered
        pieces = [first]
        assert await response.pump(lambda piece: pieces.append(piece) or False) is True
        assert b"".join(pieces) == b"onetwothree"
        await client.aclose()

    run(main())


def test_pump_raises_when_the_body_breaks_off_and_drops_the_connection(run) -> None:
    async def main() -> None:
        server = Server(fixed(CHUNKED + b"3\r\none\r\n", keep_open=False))
        client = pool(await server.start())
        response = await client.request(b"POST", b"/", b"", b"")
        pieces: list[bytes] = []
        with pytest.raises(UpstreamBroken, match="closed the connection"):
            while not await response.pump(lambda piece: pieces.append(piece) or False):
                pass
        assert pieces == [b"one"]
        assert not client._idle  # dropped, never pooled
        await client.aclose()

    run(main())


def test_pumped_bodies_are_not_framing(run) -> None:
    """Reads of body pieces reset the framing count under `pump` as under `chunks`: a long
    stream of small pieces must not pass the chunk-size line cap."""

    async def main() -> None:
        pieces = [b"x" * 100] * 400  # 40 KB of body in 400 reads, over a 4 KiB framing cap
        server = Server(paced_chunks(*pieces, pause_s=0))
        client = pool(await server.start(), max_head_bytes=4096)
        response = await client.request(b"POST", b"/", b"", b"")
        got: list[bytes] = []
        assert await response.pump(lambda piece: got.append(piece) or False) is True
        assert b"".join(got) == b"".join(pieces)
        await client.aclose()

    run(main())


def test_cancelling_a_pump_closes_the_connection(run) -> None:
    async def respond(writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(CHUNKED + b"3\r\none\r\n")
        await writer.drain()
        return True  # and then nothing more: the upstream is still "generating"

    async def main() -> None:
        server = Server(respond)
        client = pool(await server.start())
        response = await client.request(b"POST", b"/", b"", b"")
        task = asyncio.ensure_future(response.pump(lambda piece: False))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.closed_by_client.wait(), 2)
        await client.aclose()

    run(main())


def test_chunks_and_read_go_on_after_a_pump_that_paused(run) -> None:
    """A pump whose sink paused the connection (the router reads a stream's first events
    so) leaves the rest to whichever way reads next: it must read again, not wait forever."""

    async def respond(writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(CHUNKED)
        await writer.drain()
        for piece in (b"one", b"two", b"three"):
            await asyncio.sleep(0.02)  # each comes while the client waits for it
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        return True

    async def main() -> None:
        server = Server(respond)
        client = pool(await server.start())
        for how in ("chunks", "read"):
            async with asyncio.timeout(5):
                response = await client.request(b"POST", b"/", b"", b"")
                first: list[bytes] = []

                def pause_after(piece: bytes, first: list[bytes] = first) -> bool:
                    first.append(piece)
                    return True

                assert await response.pump(pause_after) is False
                if how == "chunks":
                    rest = b"".join([piece async for piece in response.chunks()])
                else:
                    rest = await response.read(100)
            assert b"".join(first) + rest == b"onetwothree"
        assert server.connections == 1
        await client.aclose()

    run(main())


def test_a_response_read_to_its_end_reads_nothing_of_the_next_exchange(run) -> None:
    """Its connection went back to the pool when its body ended: what arrives there later
    is the next exchange's, even when the first one's reader calls again."""

    async def main() -> None:
        server = Server(fixed(OK))
        client = pool(await server.start())
        first = await client.request(b"POST", b"/", b"", b"")
        assert await first.pump(lambda piece: False) is True
        second = await client.request(b"POST", b"/", b"", b"")  # the same connection
        assert server.connections == 1
        stolen: list[bytes] = []
        assert await first.pump(lambda piece: stolen.append(piece) or False) is True
        assert [piece async for piece in first.chunks()] == []
        assert await first.read(100) == b""
        assert stolen == []
        assert await second.read(100) == b"{}"
        await client.aclose()

    run(main())


def test_the_pieces_of_one_read_reach_the_sink_in_one_call(run) -> None:
    """Events that came together are observed and written together: one call per read,
    not one per chunk of the body."""
    pieces = [b"one", b"two", b"three", b"four", b"five"]

    async def respond(writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(CHUNKED)
        await writer.drain()
        await asyncio.sleep(0.02)  # the body comes while `pump` waits for it
        writer.write(b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n")
        return True

    async def main() -> None:
        server = Server(respond)
        client = pool(await server.start())
        response = await client.request(b"POST", b"/", b"", b"")
        calls: list[bytes] = []
        assert await response.pump(lambda piece: calls.append(piece) or False) is True
        assert b"".join(calls) == b"".join(pieces)
        assert len(calls) < len(pieces)  # one per read: the five came in one write
        await client.aclose()

    run(main())
