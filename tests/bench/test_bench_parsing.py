"""The benchmark's own parsing: wrk's result line, SSE events, and the streaming client."""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest
import uvloop

from bench import pipe as pipe_module
from bench.compare import Build, Comparison, RevisionMissing, export_revision
from bench.compare import render as render_compare
from bench.procs import BenchError
from bench.run import render_table
from bench.streamload import content_in, percentile, run_load, server_timing_ms
from bench.wrk import MARKER, lua_script, parse_output


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


ROLE = _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
TEXT = _event({"choices": [{"index": 0, "delta": {"content": " hello"}}]})
USAGE = _event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
DONE = b"data: [DONE]\n\n"


def test_parse_output_reads_the_done_hook_line() -> None:
    line = MARKER + json.dumps(
        {
            "requests": 30000,
            "duration_us": 10_000_000,
            "bytes": 1,
            "connect": 0,
            "read": 0,
            "write": 0,
            "status": 2,
            "timeout": 0,
            "mean_us": 512.5,
            "p50_us": 480,
            "p90_us": 700,
            "p99_us": 1200,
            "max_us": 9000,
        }
    )
    result = parse_output(f"Running 10s test\n{line}\nRequests/sec: 3000\n", concurrency=16)
    assert result.rps == 3000.0
    assert (result.p50_ms, result.p99_ms) == (0.48, 1.2)
    assert result.errors["status"] == 2
    assert result.error_count == 2


def test_parse_output_without_result_line_fails() -> None:
    with pytest.raises(BenchError):
        parse_output("unable to connect to 127.0.0.1:1\n", concurrency=1)


def test_lua_script_sets_request_once_and_refuses_unquotable_bodies() -> None:
    script = lua_script(b'{"model":"m"}', {"Authorization": "Bearer k"})
    assert 'wrk.method = "POST"' in script
    assert 'wrk.body = [==[{"model":"m"}]==]' in script
    assert 'wrk.headers["Authorization"] = "Bearer k"' in script
    assert "function done(summary, latency, requests)" in script
    assert "function request" not in script  # wrk's fast path: one prebuilt request
    with pytest.raises(ValueError):
        lua_script(b'"]==]"', {})


def test_content_in_tells_role_text_usage_and_done_apart() -> None:
    assert content_in(ROLE.strip()) is False
    assert content_in(TEXT.strip()) is True
    assert content_in(USAGE.strip()) is False
    assert content_in(DONE.strip()) is None
    assert content_in(_event({"choices": [{"index": 0, "text": " x"}]}).strip()) is True


def test_server_timing_and_percentile() -> None:
    assert server_timing_ms(b"gateway;dur=0.412, upstream;dur=8.6") == 0.412
    assert server_timing_ms(b"upstream;dur=8.6", b"upstream") == 8.6
    assert server_timing_ms(b"other") is None
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 99) == 99


async def _sse_server(delay_s: float) -> asyncio.Server:
    """A keep-alive HTTP/1.1 server answering every POST with a chunked SSE stream."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"server-timing: gateway;dur=0.25\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                for part in (ROLE, TEXT, USAGE, DONE):
                    if part is TEXT:
                        await asyncio.sleep(delay_s)
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_run_load_measures_ttft_over_keep_alive_streams() -> None:
    server = await _sse_server(delay_s=0.02)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await run_load(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            b"{}",
            [("Authorization", "Bearer k")],
            concurrency=2,
            duration_s=0.3,
            warmup_s=0.05,
            timeout_s=5,
        )
    summary = result.summary()
    assert summary["errors"] == {}
    assert summary["requests"] >= 4
    assert summary["requests_total"] >= summary["requests"]
    # The first content event (20 ms in), not the role chunk; the margin: a slow machine.
    assert 18 <= summary["ttft_p50_ms"] < 1000
    assert summary["server_timing_gateway_p50_ms"] == 0.25


async def test_run_load_counts_a_stream_without_done_as_an_error() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = ROLE + TEXT
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await run_load(
            f"http://127.0.0.1:{port}/", b"", concurrency=1, duration_s=0.1, warmup_s=0, timeout_s=5
        )
    assert result.requests == 0
    assert result.errors["stream without content or [DONE]"] >= 1


def test_render_table_shows_rows_targets_and_skipped_transports() -> None:
    row = {
        "mode": "stream",
        "concurrency": 16,
        "direct_rps": 97.0,
        "gateway_rps": 96.5,
        "direct_p50_ms": 165.0,
        "direct_p99_ms": 170.0,
        "gateway_p50_ms": 165.6,
        "gateway_p99_ms": 172.0,
        "added_p50_ms": 0.6,
        "direct_ttft_p50_ms": 10.8,
        "gateway_ttft_p50_ms": 11.4,
        "added_ttft_p50_ms": 0.6,
        "gateway_cpu_us_per_request": 2500.0,
        "gateway_cpu_core_share": 0.25,
    }
    report = {
        "rows": [row],
        "targets": [{"name": "added TTFT", "target": "<= 1", "value": 0.6, "pass": True}],
        "transports": [
            {
                "client": "httpx-aiohttp",
                "label": "httpx + AiohttpTransport",
                "skipped": "not installable",
            }
        ],
        "plan": {"transport_concurrency": 16},
        "warnings": [],
    }
    table = render_table(report)
    assert "10.80 / 11.40" in table
    assert "PASS  added TTFT: 0.6 (target <= 1)" in table
    assert "skipped" in table


def test_side_by_side_summary_takes_medians_and_the_marginal_cost_of_an_event() -> None:
    builds = [Build("base", None), Build("head", None)]
    comparison = Comparison.__new__(Comparison)
    comparison.builds = builds
    comparison.rounds = [
        {
            "non-stream": {"base": 300.0, "head": 240.0},
            "stream-short": {"base": 1000.0, "head": 800.0},
            "stream-long": {"base": 3000.0, "head": 2000.0},
        },
        {
            "non-stream": {"base": 310.0, "head": 310.0},
            "stream-short": {"base": 1100.0, "head": 900.0},
            "stream-long": {"base": 3200.0, "head": 2100.0},
        },
        {
            "non-stream": {"base": 290.0, "head": 232.0},
            "stream-short": {"base": 1000.0, "head": 800.0},
            "stream-long": {"base": 3000.0, "head": 2000.0},
        },
    ]
    summary = comparison.summary({"stream-short": 19, "stream-long": 83})
    # Medians: long 3000 / 2000, short 1000 / 800; 64 more events.
    assert summary["cpu_us_per_stream_event"] == {"base": 2000 / 64, "head": 1200 / 64}
    assert summary["head_over_base"]["stream-event"] == pytest.approx(0.6)
    assert summary["head_over_base"]["non-stream"] == pytest.approx(0.8)  # median of ratios
    table = render_compare(summary, "abc1234")
    assert "a stream event (marginal)" in table and "0.600" in table


def test_a_revision_not_in_the_clone_is_its_own_error(tmp_path) -> None:
    with pytest.raises(RevisionMissing, match="not a commit of this clone"):
        export_revision("0" * 40, tmp_path / "base")


def test_the_byte_pipe_is_the_floor_each_build_is_measured_against() -> None:
    comparison = Comparison.__new__(Comparison)
    comparison.builds = [Build("base", None), Build("head", None)]
    comparison.rounds = [
        {
            "non-stream": {"base": 300.0, "head": 240.0},
            "stream-short": {"base": 1000.0, "head": 800.0, "pipe": 500.0},
            "stream-long": {"base": 3000.0, "head": 2000.0, "pipe": 1140.0},
        }
    ]
    summary = comparison.summary({"stream-short": 19, "stream-long": 83})
    floor = summary["floor"]
    assert floor["cpu_us_per_stream_event"] == pytest.approx(10.0)  # 640 µs over 64 events
    assert floor["over_floor"] == {"base": pytest.approx(3.125), "head": pytest.approx(1.875)}
    assert "head 1.88x that floor" in render_compare(summary, "abc1234")


def test_the_byte_pipe_passes_bytes_both_ways_as_they_come() -> None:
    async def main() -> None:
        heard: list[bytes] = []

        async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            heard.append(await reader.readuntil(b"\r\n\r\n"))
            for part in (b"HTTP/1.1 200 OK\r\n\r\n", b"data: 1\n\n", b"data: 2\n\n"):
                writer.write(part)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(upstream, "127.0.0.1", 0)
        upstream_port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        pipe = await loop.create_server(
            lambda: pipe_module._Client("127.0.0.1", upstream_port), "127.0.0.1", 0
        )
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", pipe.sockets[0].getsockname()[1]
        )
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\r\n")
        async with asyncio.timeout(10):
            received = await reader.read()  # to the upstream's close, passed on
        assert heard == [b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\r\n"]
        assert received == b"HTTP/1.1 200 OK\r\n\r\ndata: 1\n\ndata: 2\n\n"
        writer.close()
        pipe.close()
        server.close()

    uvloop.run(main())
