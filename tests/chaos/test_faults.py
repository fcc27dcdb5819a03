"""Fault injection in the simulated worker: what a client sees of each fault, over real HTTP."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio

from chaos.faults import FaultInjector, Faults
from chaos.sim import SimSettings, add_arguments, run, settings_from_args
from tests.chaos.test_sim import MESSAGES, MODEL, events, gauge, metrics_until, sample, serve
from tests.servers import start_sim

pytestmark = pytest.mark.asyncio(loop_scope="module")

SHORT = httpx.Timeout(5, read=0.3)  # for requests that are meant to get no answer


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def worker() -> AsyncIterator[httpx.AsyncClient]:
    async with serve(SimSettings(models=(MODEL, "other"))) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module")
async def sim(worker: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    """The shared worker, with no faults before and after each test."""
    assert (await worker.delete("/sim/faults")).status_code == 200
    yield worker
    assert (await worker.delete("/sim/faults")).status_code == 200


@pytest.fixture(autouse=True)
def no_server_errors() -> Iterator[None]:
    """No fault may make uvicorn log an error (a 500 it sent, a traceback)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not records, [record.getMessage() for record in records]


async def put(client: httpx.AsyncClient, **faults: Any) -> None:
    response = await client.put("/sim/faults", json=faults)
    assert response.status_code == 200, response.text


async def stats(client: httpx.AsyncClient) -> dict[str, int]:
    return dict((await client.get("/sim/stats")).json())


async def chat(
    client: httpx.AsyncClient, http_timeout: httpx.Timeout | None = None, **body: Any
) -> httpx.Response:
    request = {"model": MODEL, "messages": MESSAGES, **body}
    if http_timeout is None:
        return await client.post("/v1/chat/completions", json=request)
    return await client.post("/v1/chat/completions", json=request, timeout=http_timeout)


def stream(client: httpx.AsyncClient, max_tokens: int, **options: Any) -> Any:
    body = {"model": MODEL, "prompt": "flaky", "max_tokens": max_tokens, "stream": True}
    return client.stream("POST", "/v1/completions", json=body, **options)


def injected(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error = dict(body["error"])
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["param"] is None
    return error


# ---- errors ----------------------------------------------------------------------------------


async def test_error_status_answers_every_inference_request(sim: httpx.AsyncClient) -> None:
    await put(sim, error_status=503, retry_after_s=1.2)
    response = await chat(sim)
    assert injected(response, 503)["type"] == "Service Unavailable"
    assert response.headers["retry-after"] == "2"  # rounded up
    injected(await sim.post("/v1/completions", json={"prompt": "x"}), 503)
    injected(await sim.post("/v1/embeddings", json={"input": "x"}), 503)
    async with stream(sim, 3) as response:
        await response.aread()
        injected(response, 503)
    # Everything else works as ever.
    assert (await sim.get("/health")).status_code == 200
    assert (await sim.get("/metrics")).status_code == 200
    assert (await sim.get("/v1/models")).status_code == 200
    assert (await sim.get("/v1/chat/completions")).status_code == 405
    assert await stats(sim) == {"requests": 4, "faulted": 4}

    await put(sim, error_status=429)
    response = await chat(sim)
    assert injected(response, 429)["type"] == "Too Many Requests"
    assert "retry-after" not in response.headers


async def test_error_rate_is_exact_and_deterministic(sim: httpx.AsyncClient) -> None:
    await put(sim, error_status=500, error_rate=0.5)
    statuses = [(await chat(sim, max_tokens=2)).status_code for _ in range(10)]
    assert statuses == [200, 500] * 5
    assert await stats(sim) == {"requests": 10, "faulted": 5}

    await put(sim, error_status=500, error_rate=0.3)  # a new PUT counts afresh
    statuses = [(await chat(sim, max_tokens=2)).status_code for _ in range(10)]
    assert statuses.count(500) == 3
    assert await stats(sim) == {"requests": 10, "faulted": 3}


async def test_injector_rate_counts_are_exact() -> None:  # async only for the module mark
    for rate in (0.1, 0.29, 1 / 3, 0.5, 0.77, 1.0):
        injector = FaultInjector(Faults(reset=True, error_rate=rate))
        picked = sum(injector.admit() for _ in range(1000))
        assert picked == int(1000 * rate + 1e-9), rate
    assert not any(FaultInjector(Faults(latency_ms=5, error_rate=1)).admit() for _ in range(9))


async def test_the_rate_picks_requests_for_any_failure(sim: httpx.AsyncClient) -> None:
    await put(sim, reset=True, error_rate=0.5)
    assert (await chat(sim, max_tokens=1)).status_code == 200
    with pytest.raises(httpx.RemoteProtocolError):
        await chat(sim, max_tokens=1)
    assert (await chat(sim, max_tokens=1)).status_code == 200
    assert await stats(sim) == {"requests": 3, "faulted": 1}


# ---- connections that fail -------------------------------------------------------------------


async def test_reset_closes_without_a_response(sim: httpx.AsyncClient) -> None:
    await put(sim, reset=True)
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        await chat(sim)
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        async with stream(sim, 5):
            pass
    assert await stats(sim) == {"requests": 2, "faulted": 2}
    await sim.delete("/sim/faults")
    assert (await chat(sim)).status_code == 200  # the client's pool recovers


async def test_hang_never_answers_and_frees_its_slot_when_the_client_leaves(
    sim: httpx.AsyncClient,
) -> None:
    await put(sim, hang=True)
    before = (await sim.get("/metrics")).text
    request = asyncio.create_task(chat(sim, model="other", http_timeout=SHORT))
    running = "vllm:num_requests_running"
    await metrics_until(sim, lambda t: sample(t, running, model_name="other") == 1)
    with pytest.raises(httpx.ReadTimeout):
        await request
    text = await metrics_until(sim, lambda t: sample(t, running, model_name="other") == 0)
    aborts = "vllm:request_success_total"
    assert sample(text, aborts, model_name="other", finished_reason="abort") == (
        sample(before, aborts, model_name="other", finished_reason="abort") + 1
    )
    assert await stats(sim) == {"requests": 1, "faulted": 1}


async def test_cut_breaks_the_stream_body(sim: httpx.AsyncClient) -> None:
    await put(sim, cut_after_chunks=3)
    received: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        async with stream(sim, 10) as response:
            assert response.status_code == 200
            async for data in events(response):
                received.append(data)
    assert len(received) == 3 and "[DONE]" not in received
    assert all(orjson.loads(data)["choices"][0]["finish_reason"] is None for data in received)
    await metrics_until(sim, lambda t: gauge(t, "vllm:num_requests_running") == 0)
    # A stream shorter than the cut ends normally, and plain replies are not streams.
    async with stream(sim, 2) as response:
        assert [data async for data in events(response)][-1] == "[DONE]"
    assert (await chat(sim)).status_code == 200
    assert await stats(sim) == {"requests": 3, "faulted": 1}


async def test_cut_before_the_first_event(sim: httpx.AsyncClient) -> None:
    await put(sim, cut_after_chunks=0)
    with pytest.raises(httpx.RemoteProtocolError):
        async with stream(sim, 4) as response:
            assert response.status_code == 200  # the headers went out; then nothing
            await response.aread()


async def test_garbage_is_one_unparseable_event_in_an_otherwise_whole_stream(
    sim: httpx.AsyncClient,
) -> None:
    await put(sim, garbage_after_chunks=2)
    async with stream(sim, 4) as response:
        received = [data async for data in events(response)]
    assert received[-1] == "[DONE]"
    unparseable = []
    for data in received[:-1]:
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError:
            unparseable.append(data)
    assert len(unparseable) == 1 and received.index(unparseable[0]) == 2
    assert len(received) == 4 + 1 + 1  # four tokens, the garbage, [DONE]
    assert await stats(sim) == {"requests": 1, "faulted": 1}


async def test_stall_stops_sending_and_keeps_the_connection(sim: httpx.AsyncClient) -> None:
    await put(sim, stall_after_chunks=2, tokens_per_s=1000)
    received: list[str] = []
    with pytest.raises(httpx.ReadTimeout):
        async with stream(sim, 50, timeout=SHORT) as response:
            async for data in events(response):
                received.append(data)
    assert len(received) == 2
    # The stalled request held its slot until the client gave up.
    text = await metrics_until(sim, lambda t: gauge(t, "vllm:num_requests_running") == 0)
    assert sample(text, "vllm:request_success_total", model_name=MODEL, finished_reason="abort")
    assert await stats(sim) == {"requests": 1, "faulted": 1}


async def test_error_event_first(sim: httpx.AsyncClient) -> None:
    await put(sim, error_event_first=True)
    async with stream(sim, 5) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        received = [data async for data in events(response)]
    assert received[1:] == ["[DONE]"]
    error = orjson.loads(received[0])
    assert error == {
        "error": {
            "message": error["error"]["message"],
            "type": "Service Unavailable",
            "param": None,
            "code": 503,
        }
    }
    assert (await chat(sim)).status_code == 200  # only streams have an error event
    assert await stats(sim) == {"requests": 2, "faulted": 1}

    # With a status too, streams carry it in the event and plain replies get it as HTTP.
    await put(sim, error_event_first=True, error_status=500)
    async with stream(sim, 5) as response:
        received = [data async for data in events(response)]
    assert orjson.loads(received[0])["error"]["code"] == 500 and received[1] == "[DONE]"
    injected(await chat(sim), 500)


# ---- slow workers ----------------------------------------------------------------------------


async def test_latency_delays_a_correct_answer(sim: httpx.AsyncClient) -> None:
    await put(sim, latency_ms=150)
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await chat(sim, max_tokens=3)
    assert loop.time() - started >= 0.15
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 3
    async with stream(sim, 3) as response:
        assert [data async for data in events(response)][-1] == "[DONE]"
    assert await stats(sim) == {"requests": 2, "faulted": 0}

    # A client that leaves during the delay takes nothing with it.
    await put(sim, latency_ms=60_000)
    with pytest.raises(httpx.ReadTimeout):
        await chat(sim, http_timeout=SHORT)
    text = (await sim.get("/metrics")).text
    assert gauge(text, "vllm:num_requests_running") == 0


async def test_tokens_per_s_overrides_the_rate(sim: httpx.AsyncClient) -> None:
    await put(sim, tokens_per_s=50)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with stream(sim, 6) as response:
        received = [data async for data in events(response)]
    assert len(received) == 7 and loop.time() - started >= 5 / 50
    started = loop.time()
    assert (await chat(sim, max_tokens=6)).status_code == 200
    assert loop.time() - started >= 5 / 50
    assert await stats(sim) == {"requests": 2, "faulted": 0}


# ---- control ---------------------------------------------------------------------------------


async def test_control_endpoints(sim: httpx.AsyncClient) -> None:
    defaults = Faults().to_json()
    assert (await sim.get("/sim/faults")).json() == defaults
    response = await sim.put("/sim/faults", json={"error_status": 502, "latency_ms": 1})
    assert response.status_code == 200
    active = {**defaults, "error_status": 502, "latency_ms": 1.0}
    assert response.json() == active
    assert (await sim.get("/sim/faults")).json() == active
    await chat(sim)
    assert await stats(sim) == {"requests": 1, "faulted": 1}

    # A bad body is refused and changes nothing.
    for body in (
        b'{"nope": 1}',
        b'{"hang": "yes"}',
        b'{"error_status": "503"}',
        b'{"error_status": true}',
        b'{"error_status": 200}',
        b'{"error_rate": 2}',
        b'{"latency_ms": null}',
        b'{"cut_after_chunks": -1}',
        b'{"tokens_per_s": 1.5e999}',
        b"[]",
        b"{not json",
    ):
        response = await sim.put("/sim/faults", content=body)
        assert response.status_code == 400, body
        assert response.json()["error"]["code"] == 400
    assert (await sim.get("/sim/faults")).json() == active
    assert await stats(sim) == {"requests": 1, "faulted": 1}

    response = await sim.delete("/sim/faults")
    assert response.status_code == 200 and response.json() == defaults
    assert await stats(sim) == {"requests": 0, "faulted": 0}
    await chat(sim)
    await sim.post("/v1/embeddings", json={"input": "x"})
    assert await stats(sim) == {"requests": 2, "faulted": 0}  # counted without faults too

    response = await sim.post("/sim/faults", json={})
    assert response.status_code == 405 and response.headers["allow"] == "GET, PUT, DELETE"


async def test_health_status(sim: httpx.AsyncClient) -> None:
    await put(sim, health_status=503)
    assert (await sim.get("/health")).status_code == 503
    assert (await chat(sim)).status_code == 200  # requests still work
    await sim.delete("/sim/faults")
    assert (await sim.get("/health")).status_code == 200


async def test_faults_from_settings_apply_from_the_start() -> None:
    async with serve(SimSettings(faults=Faults(error_status=500, error_rate=0.5))) as client:
        assert [(await chat(client)).status_code for _ in range(4)] == [200, 500, 200, 500]
        assert (await client.get("/sim/faults")).json()["error_status"] == 500


async def test_command_line_faults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert settings_from_args(parser.parse_args(["--port", "1"])).faults == Faults()
    argv = [
        *("--port", "1", "--fault-status", "503", "--fault-rate", "0.25"),
        *("--fault-retry-after", "3", "--fault-latency-ms", "7", "--fault-hang"),
        *("--fault-reset", "--fault-cut-after", "4", "--fault-stall-after", "5"),
        *("--fault-error-event-first", "--fault-tokens-per-s", "9"),
        *("--fault-health-status", "500"),
    ]
    assert settings_from_args(parser.parse_args(argv)).faults == Faults(
        error_status=503,
        error_rate=0.25,
        retry_after_s=3,
        latency_ms=7,
        hang=True,
        reset=True,
        cut_after_chunks=4,
        stall_after_chunks=5,
        error_event_first=True,
        tokens_per_s=9,
        health_status=500,
    )
    # Out of range: refused before anything is served.
    assert run(parser.parse_args(["--port", "1", "--fault-rate", "2"])) == 2


async def test_vgate_sim_process(tmp_path: Path) -> None:
    """The command line as `vgate sim` serves it (uvloop, httptools): flags, reset, cut, hang."""
    process = await asyncio.to_thread(
        start_sim, tmp_path, models=(MODEL,), fault_status=500, fault_rate=0.5
    )
    try:
        async with httpx.AsyncClient(base_url=process.url, timeout=5) as client:
            assert [(await chat(client)).status_code for _ in range(4)] == [200, 500] * 2
            await put(client, reset=True)
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                await chat(client)
            await put(client, cut_after_chunks=2)
            with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
                async with stream(client, 8) as response:
                    await response.aread()
            await put(client, hang=True)
            with pytest.raises(httpx.ReadTimeout):
                await chat(client, http_timeout=SHORT)
            await metrics_until(client, lambda t: gauge(t, "vllm:num_requests_running") == 0)
            assert await stats(client) == {"requests": 1, "faulted": 1}
    finally:
        await asyncio.to_thread(process.stop)
    assert "ERROR" not in process.log() and "Traceback" not in process.log(), process.log()
