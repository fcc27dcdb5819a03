"""A small streaming load client: N concurrent SSE clients, time to first token and total time.

wrk cannot see when the first token of a stream arrives, so streams are driven by this
client: raw asyncio (uvloop when installed) with httptools' response parser, one keep-alive
connection per client, a closed loop (each client sends its next request when the last one
ended). It is deliberately lean so that its own overhead, identical for the direct and the
gateway run, stays small: an aiohttp client costs several times more CPU per stream.

TTFT is the time from writing the request to the end of the first `data:` event that
carries content (`choices[0].delta.content` or `choices[0].text` non-empty; vLLM's first
chunk carries only the role). A request counts as ok only with status 200 and a `[DONE]`.

Run: `python -m bench.streamload --url URL --concurrency 16 --duration 10 --body JSON`;
prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import orjson

_DONE = b"data: [DONE]"


@dataclass
class Sample:
    status: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    done: bool = False
    gateway_ms: float | None = None


def content_in(event: bytes) -> bool | None:
    """Whether one SSE event carries generated text; None for `[DONE]`, False for other events."""
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return None
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return False
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content") or choice.get("text"):
                return True
    return False


def server_timing_ms(value: bytes, name: bytes = b"gateway") -> float | None:
    """The `dur` of one metric in a Server-Timing header, e.g. `gateway;dur=0.412, upstream;...`."""
    for metric in value.split(b","):
        parts = [p.strip() for p in metric.split(b";")]
        if parts and parts[0] == name:
            for param in parts[1:]:
                if param.startswith(b"dur="):
                    try:
                        return float(param[4:])
                    except ValueError:
                        return None
    return None


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that runs one streaming request at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[Sample] | None = None
        self._sample = Sample()
        self._start = 0.0
        self._buffer = b""
        self._tail = b""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("connection closed mid-response"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"server-timing":
            self._sample.gateway_ms = server_timing_ms(value)

    def on_headers_complete(self) -> None:
        self._sample.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        sample = self._sample
        if sample.ttft_s is None:
            self._buffer += body.replace(b"\r\n", b"\n")
            while b"\n\n" in self._buffer:
                event, self._buffer = self._buffer.split(b"\n\n", 1)
                found = content_in(event)
                if found:
                    sample.ttft_s = time.perf_counter() - self._start
                    self._tail = self._buffer[-16:]
                    self._buffer = b""
                    sample.done = _DONE in self._tail
                    return
                if found is None:
                    sample.done = True
            return
        window = self._tail + body
        if _DONE in window:
            sample.done = True
        self._tail = window[-16:]

    def on_message_complete(self) -> None:
        self._sample.total_s = time.perf_counter() - self._start
        if not self._sample.done and _DONE in self._buffer:
            self._sample.done = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self._sample)
        if not self.parser.should_keep_alive() and self.transport is not None:
            self.transport.close()

    # client side
    def request(self, raw: bytes) -> asyncio.Future[Sample]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._sample = Sample()
        self._buffer = b""
        self._tail = b""
        self._start = time.perf_counter()
        self.transport.write(raw)
        return self._waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of `values` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    requests: int = 0
    requests_total: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    ttft_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    gateway_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 3),
            "requests": self.requests,
            "requests_total": self.requests_total,
            "rps": round(self.requests / self.duration_s, 1) if self.duration_s > 0 else 0.0,
            "errors": dict(self.errors),
            "ttft_p50_ms": _ms(percentile(self.ttft_s, 50)),
            "ttft_p90_ms": _ms(percentile(self.ttft_s, 90)),
            "ttft_p99_ms": _ms(percentile(self.ttft_s, 99)),
            "total_p50_ms": _ms(percentile(self.total_s, 50)),
            "total_p99_ms": _ms(percentile(self.total_s, 99)),
            "server_timing_gateway_p50_ms": percentile(self.gateway_ms, 50),
        }


def build_request(url: str, body: bytes, headers: Sequence[tuple[str, str]]) -> bytes:
    parts = urlsplit(url)
    head = [
        f"POST {parts.path or '/'} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


async def run_load(
    url: str,
    body: bytes,
    headers: Sequence[tuple[str, str]] = (),
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    timeout_s: float = 30.0,
) -> LoadResult:
    """`concurrency` closed-loop clients for `warmup_s` + `duration_s` (warm-up not recorded)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    raw = build_request(url, body, headers)
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    measure_from = start + warmup_s
    deadline = measure_from + duration_s
    result = LoadResult(concurrency, duration_s)

    async def client() -> None:
        conn: _Connection | None = None
        while time.perf_counter() < deadline:
            if conn is None or conn.closed:
                try:
                    _, conn = await asyncio.wait_for(
                        loop.create_connection(_Connection, host, port), timeout_s
                    )
                except (OSError, TimeoutError) as exc:
                    result.errors[f"connect: {type(exc).__name__}"] += 1
                    conn = None
                    await asyncio.sleep(0.01)
                    continue
            assert conn is not None
            sent = time.perf_counter()
            try:
                sample = await asyncio.wait_for(conn.request(raw), timeout_s)
            except (OSError, TimeoutError, httptools.HttpParserError) as exc:
                result.errors[type(exc).__name__] += 1
                conn.close()
                conn = None
                continue
            result.requests_total += 1
            if sample.status != 200:
                result.errors[f"status {sample.status}"] += 1
            elif not sample.done or sample.ttft_s is None:
                result.errors["stream without content or [DONE]"] += 1
            elif sent >= measure_from:
                result.requests += 1
                result.ttft_s.append(sample.ttft_s)
                result.total_s.append(sample.total_s)
                if sample.gateway_ms is not None:
                    result.gateway_ms.append(sample.gateway_ms)
        if conn is not None:
            conn.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    # The window: from the end of warm-up to the last recorded stream's end.
    result.duration_s = max(time.perf_counter() - measure_from, 1e-9)
    return result


def _install_fast_loop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="the JSON request body")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    headers = [tuple(h.split(":", 1)) for h in args.header]
    _install_fast_loop()
    result = asyncio.run(
        run_load(
            args.url,
            args.body.encode(),
            [(name.strip(), value.strip()) for name, value in headers],
            concurrency=args.concurrency,
            duration_s=args.duration,
            warmup_s=args.warmup,
            timeout_s=args.timeout,
        )
    )
    json.dump(result.summary(), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
