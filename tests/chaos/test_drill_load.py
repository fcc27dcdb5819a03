"""The drill's load classifies every request's end: an answer, a clean refusal, or lost.

Pointed straight at real simulated workers (they speak the OpenAI API too), each made to
fail one way, so the load meets the real wire behaviour of each failure.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos.drill.load import Load, LoadMix, LoadSpec, LoadTarget
from chaos.drill.results import RequestResult
from tests.servers import Process, poll_until, start_sim


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("drill-load")


@pytest.fixture
def sims(logs: Path) -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for sim in started:
        sim.stop()


def run_load(url: str, mix: LoadMix, count: int, **spec: object) -> list[RequestResult]:
    clock = itertools.count()
    load = Load(
        LoadTarget(url, "sk-unused"),
        LoadSpec.model_validate({"clients": 2, "mix": mix, "model": "tiny-llama", **spec}),
        lambda: float(next(clock)),
        {"tiny-llama": "tiny-llama", "tiny-embed": "tiny-embed"}.get,
    )
    load.start()
    try:
        poll_until(lambda: len(load.results) >= count)
    finally:
        load.stop()
    return load.snapshot()


def test_whole_answers_of_every_kind_are_ok_with_their_time_to_first_token(
    logs: Path, sims: list[Process]
) -> None:
    sims.append(start_sim(logs, ttft_ms=5))
    results = run_load(sims[0].url, LoadMix(chat=1, stream=1, embed=1), 12)
    assert {r.outcome for r in results} == {"ok"}
    assert {r.kind for r in results} == {"chat", "stream", "embed"}
    assert all(r.status == 200 and r.error is None for r in results)
    streams = [r for r in results if r.kind == "stream"]
    assert all(r.ttft_s is not None and 0 < r.ttft_s <= r.duration_s for r in streams)
    assert all(r.tpot_s is not None and r.tpot_s >= 0 for r in streams)  # 16 tokens each
    assert all(r.ttft_s is None for r in results if r.kind != "stream")
    assert len({r.started for r in results}) == len(results)  # the drill's clock, at each start


def test_an_error_status_with_an_openai_body_is_a_clean_error(
    logs: Path, sims: list[Process]
) -> None:
    sims.append(start_sim(logs, fault_status=503, fault_rate=1))
    results = run_load(sims[0].url, LoadMix(chat=1, stream=1, embed=0), 6)
    assert {(r.outcome, r.status) for r in results} == {("error", 503)}
    assert all(r.failed for r in results)


def test_a_reset_connection_is_lost(logs: Path, sims: list[Process]) -> None:
    sims.append(start_sim(logs, fault_reset=True, fault_rate=1))
    results = run_load(sims[0].url, LoadMix(chat=1, stream=1, embed=0), 6)
    assert {r.outcome for r in results} == {"lost"}
    assert all(r.status is None and (r.error or "").startswith("connection") for r in results)


def test_a_stream_cut_before_its_end_is_lost_not_ok(logs: Path, sims: list[Process]) -> None:
    sims.append(start_sim(logs, fault_cut_after=2, fault_rate=1))
    results = run_load(sims[0].url, LoadMix(chat=0, stream=1, embed=0), 4, max_tokens=32)
    assert {r.outcome for r in results} == {"lost"}
    assert all(r.status == 200 for r in results)  # it began well


def test_no_answer_within_the_request_timeout_is_lost_and_stopping_waits_for_it(
    logs: Path, sims: list[Process]
) -> None:
    sims.append(start_sim(logs, fault_hang=True, fault_rate=1))
    results = run_load(sims[0].url, LoadMix(chat=1, stream=0, embed=0), 2, request_timeout_s=0.5)
    assert {r.outcome for r in results} == {"lost"}
    assert all("timeout" in (r.error or "") for r in results)
