"""A byte pipe on uvloop: the floor under any relay written in Python.

    python bench/pipe.py --port PORT --upstream HOST:PORT

Each client connection gets a connection of its own to the upstream, and bytes go both ways
as they arrive: two asyncio protocols, no HTTP, no JSON, no copy kept. bench/compare.py runs
it beside the two builds of the gateway under the same stream loads: what a stream event
costs it is what the kernel and the event loop charge any Python relay that forwards each
event as it comes (one read, one write), so what the gateway costs above it is its own.
A side that cannot take more pauses the other's reading, so nothing queues without bound.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop


class _Side(asyncio.Protocol):
    """One end of a pipe: what it reads, the other end writes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.waiting: list[bytes] = []  # read before the other end was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.write(data)
        else:
            self.waiting.append(data)
            if self.transport is not None:
                self.transport.pause_reading()  # one read held at most

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()


class _Client(_Side):
    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.host, self.port = host, port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            _, upstream = await asyncio.get_running_loop().create_connection(
                _Side, self.host, self.port
            )
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        upstream.other, self.other = self, upstream
        assert upstream.transport is not None and self.transport is not None
        for data in self.waiting:
            upstream.transport.write(data)
        self.waiting.clear()
        self.transport.resume_reading()


async def serve(port: int, host: str, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(host, upstream_port), "127.0.0.1", port)
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set_result, None)
    await stop
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT")
    args = parser.parse_args(argv)
    host, _, upstream_port = args.upstream.rpartition(":")
    uvloop.run(serve(args.port, host, int(upstream_port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
