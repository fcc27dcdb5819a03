from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from gateway.config import BackendConfig
from policies.load import (
    MAX_SERIES,
    LoadReport,
    LoadScraper,
    ScrapeTarget,
    UpstreamLoad,
    parse_load,
)
from providers.vllm import VLLMAdapter
from tests.fake_upstream import FakeUpstream, ScriptedUpstream, read_request
from tests.servers import start_sim

VLLM_BODY = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 7.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 0.0
# TYPE vllm:num_requests_running_total counter
vllm:num_requests_running_total 999
vllm:num_requests_waiting_by_reason{reason="capacity"} 500
vllm:generation_tokens_total{model_name="llama"} 123456.0
"""


def test_parses_vllm_gauges_summed_over_label_sets() -> None:
    assert parse_load(VLLM_BODY) == (5, 7)


def test_parse_tolerates_odd_but_valid_text() -> None:
    body = (
        b"vllm:num_requests_running 4\r\n"  # first line, no labels, CRLF
        b'vllm:num_requests_waiting{model_name="a } b",x="\\"q\\""} 2 1700000000000\n'
        b"vllm:num_requests_waiting\t1e0\n"
        b"vllm:num_requests_waiting NaN\n"
        b"vllm:num_requests_waiting -3\n"
        b"vllm:num_requests_waiting +Inf\n"
        b"vllm:num_requests_running{broken 9\n"
        b'vllm:num_requests_running{a="b"}\n'
        b"vllm:num_requests_running nonsense"  # no final newline
    )
    assert parse_load(body) == (4, 3)


def test_parse_without_gauges_is_none_and_garbage_never_raises() -> None:
    assert parse_load(b"") is None
    assert parse_load(b"<html>404 Not Found</html>") is None
    assert parse_load(b"# TYPE vllm:num_requests_running gauge\n") is None
    assert parse_load(bytes(range(256)) * 100) is None
    assert parse_load(b"vllm:num_requests_waiting 2\n") == (0, 2)
    # Each sample finite, their sum not: the parse raised OverflowError.
    huge = b"vllm:num_requests_running 1e308\nvllm:num_requests_running 1e308\n"
    assert parse_load(huge + b"vllm:num_requests_waiting 2\n") == (0, 2)


def test_parse_is_bounded_on_huge_bodies() -> None:
    many = b"".join(b'vllm:num_requests_running{n="%d"} 1\n' % n for n in range(10 * MAX_SERIES))
    assert parse_load(many) == (MAX_SERIES, 0)  # the first MAX_SERIES series, no more
    padded = b"# padding\n" * 200_000 + VLLM_BODY  # 2 MB of lines that do not matter
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        assert parse_load(padded) == (5, 7)
        timings.append(time.perf_counter() - started)
    assert min(timings) < 0.05  # the best of five: a run preempted on a busy machine is no fault


def test_extra_load_is_what_others_sent_while_fresh() -> None:
    upstream = UpstreamLoad()
    assert upstream.extra == 0 and upstream.report is None
    upstream.update(LoadReport(running=6, waiting=4, at=100.0), own_in_flight=3)
    assert upstream.extra == 7  # 10 upstream, 3 of them ours
    upstream.update(LoadReport(running=2, waiting=0, at=101.0), own_in_flight=5)
    assert upstream.extra == 0  # ours not yet counted upstream: never negative
    upstream.expire(103.0, max_age_s=3.0)
    assert upstream.report is not None
    upstream.expire(104.5, max_age_s=3.0)
    assert upstream.extra == 0 and upstream.report is None


Fetch = Callable[[], Awaitable[bytes | None]]


def target(fetch: Fetch, in_flight: int = 0, name: str = "w") -> ScrapeTarget:
    return ScrapeTarget(name, fetch, UpstreamLoad(), lambda: in_flight)


def body_of(body: bytes | None) -> Fetch:
    async def fetch() -> bytes | None:
        return body

    return fetch


async def test_scrape_keeps_reports_and_expires_them_when_scrapes_fail() -> None:
    answers: list[bytes | Exception] = [VLLM_BODY] + [ConnectionResetError("gone")] * 10

    async def fetch() -> bytes | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    scraped = target(fetch, in_flight=2)
    scraper = LoadScraper([scraped], interval_s=1.0, stale_after=3)
    await scraper.scrape_due(10.0)
    assert scraped.upstream.report == LoadReport(5, 7, 10.0)
    assert scraped.upstream.extra == 10
    await scraper.scrape_due(10.5)  # not due yet: nothing fetched
    assert len(answers) == 10
    for now in (11.0, 12.0, 13.0):  # failing, but the report is not yet 3 intervals old
        await scraper.scrape_due(now)
        assert scraped.upstream.extra == 10 and scraped.failing
    await scraper.scrape_due(14.0)
    assert scraped.upstream.report is None and scraped.upstream.extra == 0


@pytest.mark.parametrize(
    ("before", "after"),
    [(10, 0), (0, 10)],
    ids=["own-requests-end-during-the-fetch", "own-requests-start-during-the-fetch"],
)
async def test_the_gateways_own_requests_never_become_others_load(before: int, after: int) -> None:
    """The worker renders its metrics in the middle of a slow fetch, while ten of this
    gateway's own requests end (or start): it counts all ten, and no one else's."""
    own = [before]

    async def fetch() -> bytes | None:
        body = b"vllm:num_requests_running 10\nvllm:num_requests_waiting 0\n"
        own[0] = after  # the gateway's requests moved on while the answer was on its way
        return body

    scraped = ScrapeTarget("w", fetch, UpstreamLoad(), lambda: own[0])
    await LoadScraper([scraped]).scrape_due(0.0)
    assert scraped.upstream.report == LoadReport(10, 0, 0.0)
    assert scraped.upstream.extra == 0  # no phantom load of ten for a whole interval


async def test_a_backend_without_metrics_is_left_alone_for_a_while() -> None:
    calls = {"none": 0, "html": 0}

    def counting(name: str, body: bytes | None) -> Fetch:
        async def fetch() -> bytes | None:
            calls[name] += 1
            return body

        return fetch

    absent = target(counting("none", None), name="openai")
    foreign = target(counting("html", b"<html>not prometheus</html>"), name="other")
    scraper = LoadScraper([absent, foreign], interval_s=1.0, absent_retry_s=60.0)
    for now in range(100):
        await scraper.scrape_due(float(now))
    assert calls == {"none": 2, "html": 2}  # at 0 and 60
    assert absent.upstream.report is None and foreign.upstream.report is None


async def test_scrapes_are_time_bounded_and_concurrency_bounded() -> None:
    running = 0
    most = 0

    async def slow() -> bytes | None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(10)
        finally:
            running -= 1
        return VLLM_BODY

    targets = [target(slow, name=f"w{n}") for n in range(10)]
    scraper = LoadScraper(targets, interval_s=1.0, timeout_s=0.05, max_concurrency=3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await scraper.scrape_due(started)
    elapsed = loop.time() - started
    assert most == 3
    assert elapsed < 5.0  # 4 waves of 0.05 s, not 10 s (the margin: a slow machine)
    assert all(t.failing and t.upstream.report is None for t in targets)


async def test_a_scrape_that_blows_up_does_not_stop_the_others() -> None:
    async def boom() -> bytes | None:
        raise RuntimeError("bug in a fetch")

    broken, fine = target(boom, name="broken"), target(body_of(VLLM_BODY), name="fine")
    scraper = LoadScraper([broken, fine])
    await scraper.scrape_due(0.0)
    assert fine.upstream.report is not None and broken.failing


async def test_start_scrapes_in_the_background_and_aclose_stops_it() -> None:
    count = 0

    async def fetch() -> bytes | None:
        nonlocal count
        count += 1
        return VLLM_BODY

    scraped = target(fetch)
    scraper = LoadScraper([scraped], interval_s=0.01)
    await scraper.start()
    await scraper.start()  # idempotent: still one task
    for _ in range(200):
        if count >= 3:
            break
        await asyncio.sleep(0.01)
    await scraper.aclose()
    assert count >= 3 and scraped.upstream.extra == 12
    stopped = count
    await asyncio.sleep(0.05)
    assert count == stopped
    await scraper.aclose()  # twice is fine
    await LoadScraper([]).start()  # nothing to scrape: no task


def adapter_for(url: str) -> VLLMAdapter:
    return VLLMAdapter(BackendConfig(name="w", provider="vllm", url=url), connect_timeout_s=1.0)


async def test_adapter_metrics_is_none_where_there_are_none() -> None:
    upstream = FakeUpstream("status", status=404, body=b'{"error": "Not Found"}', retry_after=None)
    adapter = adapter_for(upstream.url)
    await adapter.start()
    try:
        assert await adapter.metrics() is None
        scraped = target(adapter.metrics)
        scraper = LoadScraper([scraped], absent_retry_s=60.0)
        await scraper.scrape_due(0.0)
        assert scraped.next_due == 60.0 and not scraped.failing
    finally:
        await adapter.aclose()
        upstream.stop()


async def test_scraping_a_real_sim_sees_its_queue(logs: Path) -> None:
    """`vgate sim` with one slot: of three slow requests, one runs and two wait."""
    sim = start_sim(logs, ttft_ms=60_000, max_num_seqs=1)  # they never finish by themselves
    adapter = adapter_for(sim.url)
    await adapter.start()
    scraped = ScrapeTarget("sim", adapter.metrics, UpstreamLoad(), lambda: 1)
    scraper = LoadScraper([scraped], interval_s=0.05, timeout_s=2.0)
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}
    try:
        await scraper.scrape_due(0.0)
        assert scraped.upstream.report == LoadReport(0, 0, 0.0)
        async with httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
            requests = [
                asyncio.create_task(client.post("/v1/chat/completions", json=body))
                for _ in range(3)
            ]
            now = 0.0
            while scraped.upstream.report is None or scraped.upstream.report.waiting < 2:
                now += 1.0
                assert now < 500, scraped.upstream.report
                await asyncio.sleep(0.02)
                await scraper.scrape_due(now)
            assert scraped.upstream.report == LoadReport(1, 2, now)
            assert scraped.upstream.extra == 2  # three upstream, one of them "ours"
            for request in requests:
                request.cancel()  # a disconnect aborts the request in the sim, as in vLLM
            await asyncio.gather(*requests, return_exceptions=True)
        while scraped.upstream.report is None or scraped.upstream.report != LoadReport(0, 0, now):
            now += 1.0
            assert now < 1000, scraped.upstream.report
            await asyncio.sleep(0.02)
            await scraper.scrape_due(now)
        assert scraped.upstream.extra == 0
    finally:
        await adapter.aclose()
        sim.stop()


async def _metrics_cut_off_then_whole(
    upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """The first connection's /metrics stops mid-body for longer than a scrape may take,
    then finishes it and serves the next request on the same connection: a client that
    pooled it after the timed-out scrape would read that body's tail as its next answer."""
    first = upstream.connections == 1
    body = b"vllm:num_requests_running 3\nvllm:num_requests_waiting 4\n"
    while True:
        await read_request(reader)
        head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        if first:
            writer.write(head + body[:10])
            await writer.drain()
            await asyncio.sleep(3)
            writer.write(body[10:])
            body = b"vllm:num_requests_running 99\nvllm:num_requests_waiting 99\n"
            first = False
            continue
        writer.write(head + body)
        await writer.drain()


async def test_a_scrape_cut_off_by_its_timeout_never_leaves_its_connection_pooled() -> None:
    upstream = ScriptedUpstream(_metrics_cut_off_then_whole)
    adapter = adapter_for(upstream.url)
    await adapter.start()
    scraped = target(adapter.metrics)
    scraper = LoadScraper([scraped], interval_s=1.0, timeout_s=1.0)
    try:
        await scraper.scrape_due(0.0)
        assert scraped.failing and scraped.upstream.report is None  # timed out mid-body
        await asyncio.sleep(3)  # the rest of that body has arrived by now
        await scraper.scrape_due(1.0)
        assert scraped.upstream.report == LoadReport(3, 4, 1.0)
        assert upstream.connections == 2
    finally:
        await adapter.aclose()
        upstream.stop()


def _huge_metrics(chunked: bool) -> Callable[..., Awaitable[None]]:
    async def script(
        upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A /metrics of 100 MB (vLLM's is tens of KB), sent for as long as it is read."""
        await read_request(reader)
        size = 100_000_000
        framing = "transfer-encoding: chunked" if chunked else f"content-length: {size}"
        writer.write(f"HTTP/1.1 200 OK\r\n{framing}\r\n\r\n".encode())
        line = b"vllm:num_requests_running 1\n" * 2340  # 65,520 bytes
        upstream.state["sent"] = 0
        while upstream.state["sent"] < size:
            writer.write(b"%x\r\n%s\r\n" % (len(line), line) if chunked else line)
            await writer.drain()
            upstream.state["sent"] += len(line)

    return script


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_huge_metrics_body_fails_the_scrape_without_being_read(chunked: bool) -> None:
    upstream = ScriptedUpstream(_huge_metrics(chunked))
    adapter = adapter_for(upstream.url)
    await adapter.start()
    scraped = target(adapter.metrics)
    try:
        await LoadScraper([scraped], timeout_s=20.0).scrape_due(0.0)
        assert scraped.failing and scraped.upstream.report is None
        # The client stopped at its cap (2 MiB); the rest was never asked for.
        assert upstream.state["sent"] < 20_000_000
    finally:
        await adapter.aclose()
        upstream.stop()
