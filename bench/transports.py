"""Bare Starlette proxies, one per upstream HTTP client, to measure the client alone.

Not the product: each is the least a proxy does (read the body, parse it as JSON as a gateway
must, forward it, return the upstream's answer), served the way the gateway is served
(uvicorn, uvloop, httptools, one process) so that the only difference between them is the
upstream client. `make bench` runs them under the same wrk load to justify the product's
choice of its own lean client, providers/http1.py (README, "Why a lean upstream client").

Run: `python -m bench.transports --client aiohttp --port 8001 --upstream http://127.0.0.1:8002`.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

CLIENTS = ("httpx", "httpx-aiohttp", "aiohttp", "pyreqwest", "vgate-http1")
LABELS = {
    "httpx": "httpx.AsyncClient (default transport)",
    "httpx-aiohttp": "httpx.AsyncClient + httpx_aiohttp.AiohttpTransport",
    "aiohttp": "aiohttp.ClientSession",
    "pyreqwest": "pyreqwest.Client (Rust reqwest)",
    "vgate-http1": "providers.http1.ConnectionPool (the product's)",
}
# Clients the benchmark installs beside the venv when missing: import name, PyPI name.
OPTIONAL = {
    "httpx-aiohttp": ("httpx_aiohttp", "httpx-aiohttp"),
    "pyreqwest": ("pyreqwest", "pyreqwest"),
}
IMPORTS = {"httpx": "httpx", "aiohttp": "aiohttp", "vgate-http1": "providers.http1"} | {
    client: name for client, (name, _) in OPTIONAL.items()
}
POOL_SIZE = 256  # the gateway's default max_connections per backend

Forward = Callable[[bytes], Awaitable[tuple[int, bytes, str]]]


@asynccontextmanager
async def _httpx(url: str, transport: Any = None) -> AsyncIterator[Forward]:
    import httpx

    # The default client as most code writes it; only the transport differs in (c).
    async with httpx.AsyncClient(transport=transport, timeout=30.0) as client:

        async def forward(body: bytes) -> tuple[int, bytes, str]:
            response = await client.post(
                url, content=body, headers={"Content-Type": "application/json"}
            )
            return response.status_code, response.content, response.headers.get("content-type", "")

        yield forward


@asynccontextmanager
async def _aiohttp(url: str) -> AsyncIterator[Forward]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=POOL_SIZE)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def forward(body: bytes) -> tuple[int, bytes, str]:
            async with session.post(
                url, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                return response.status, await response.read(), response.content_type

        yield forward


@asynccontextmanager
async def _pyreqwest(url: str) -> AsyncIterator[Forward]:
    from pyreqwest.client import ClientBuilder  # type: ignore[import-not-found,unused-ignore]

    client = ClientBuilder().max_connections(POOL_SIZE).http1_only().build()

    async def forward(body: bytes) -> tuple[int, bytes, str]:
        request = client.post(url).header("Content-Type", "application/json").body_bytes(body)
        response = await request.build().send()
        content = bytes(await response.bytes())
        return response.status, content, response.headers.get("content-type", "")

    yield forward
    await client.close()


@asynccontextmanager
async def _vgate_http1(url: str) -> AsyncIterator[Forward]:
    from providers.http1 import ConnectionPool

    origin, _, path = url.partition("/v1/")
    pool = ConnectionPool(origin, max_connections=POOL_SIZE, keepalive_s=4, connect_timeout_s=2)
    headers = b"Content-Type: application/json\r\n"

    async def forward(body: bytes) -> tuple[int, bytes, str]:
        response = await pool.request(b"POST", b"/v1/" + path.encode(), headers, body)
        content = await response.read(64 * 1024 * 1024)
        return response.status, content, response.header(b"content-type") or ""

    yield forward
    await pool.aclose()


def _client(client: str, url: str) -> Any:
    if client == "aiohttp":
        return _aiohttp(url)
    if client == "pyreqwest":
        return _pyreqwest(url)
    if client == "vgate-http1":
        return _vgate_http1(url)
    if client == "httpx-aiohttp":
        import httpx_aiohttp  # type: ignore[import-not-found,unused-ignore]

        return _httpx(url, httpx_aiohttp.AiohttpTransport())
    return _httpx(url)


def create_app(client: str, upstream: str) -> Starlette:
    url = upstream.rstrip("/") + "/v1/chat/completions"
    state: dict[str, Forward] = {}

    async def chat(request: Request) -> Response:
        body = await request.body()
        if not isinstance(orjson.loads(body).get("model"), str):
            return Response(b'{"error": "no model"}', status_code=400)
        status, content, content_type = await state["forward"](body)
        return Response(content, status_code=status, media_type=content_type or None)

    async def health(request: Request) -> Response:
        return Response(b"ok")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with _client(client, url) as forward:
            state["forward"] = forward
            yield

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description="A bare proxy for the transport comparison.")
    parser.add_argument("--client", choices=CLIENTS, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args(argv)
    uvicorn.run(
        create_app(args.client, args.upstream),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
