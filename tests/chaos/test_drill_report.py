"""A drill's report from synthetic results: the JSON round-trips with its counts and
verdicts, the Markdown holds the right rows, the chart is a real PNG, the verdict table and
the progress line say what happened."""

from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from matplotlib.image import imread

from chaos.drill.report import (
    ReportFiles,
    progress_line,
    read_result,
    verdict_table,
    write_report,
)
from chaos.drill.results import DrillResult, Mark, Phase, RequestKind, RequestResult, Verdict
from chaos.drill.timeline import per_second, percentile

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PHASES = [Phase("before", 0.0, 20.0), Phase("during", 20.0, 40.0), Phase("after", 40.0, 60.0)]


def outage_requests() -> list[RequestResult]:
    """60 s of load at 10 requests/s over two backends; from 20 s to 40 s backend b is down:
    everything answers from a, slower, with some 503s, two lost and a few 429s."""
    rng = random.Random(7)
    kinds: tuple[RequestKind, ...] = ("chat", "stream", "embed")
    requests: list[RequestResult] = []
    for index in range(600):
        started = index / 10
        during = 20.0 <= started < 40.0
        backend = "vllm-a" if during or index % 2 else "vllm-b"
        duration = rng.uniform(0.05, 0.3) * (4 if during else 1)
        kind = kinds[index % 3]
        answer = RequestResult(
            kind, "m", "m", started, duration, duration / 3 if kind == "stream" else None,
            200, "ok", backend=backend,
        )  # fmt: skip
        refused = replace(answer, ttft_s=None, backend=None, outcome="error")
        if during and index % 10 == 0:  # 20 refusals by the gateway (no backend left)
            requests.append(replace(refused, status=503, error="no_backend"))
        elif during and index in (251, 252):
            requests.append(replace(refused, status=None, outcome="lost", error="reset"))
        elif index % 100 == 5:  # the client's own quota: 6 of them, one per 10 s
            requests.append(replace(refused, status=429, error="quota"))
        else:
            requests.append(answer)
    return requests


def outage_drill() -> DrillResult:
    verdicts = [
        Verdict("availability", "before", "availability >= 99%", 0.99, 1.0, 198, True),
        Verdict("availability", "during", "availability >= 99%", 0.99, 0.89, 200, False),
        Verdict("availability", "after", "availability >= 99%", 0.99, 1.0, 198, True),
        Verdict("availability", "all", "availability >= 99%", 0.99, 0.963, 600, False),
        Verdict("chat_p99", "during", "p99 latency <= 1 s", 0.99, 0.9765, 200, False, True),
        Verdict("requests_lost", "during", "requests lost = 0", 0.0, 2.0, 200, False),
        Verdict("requests_lost", "all", "requests lost = 0", 0.0, 2.0, 600, False),
    ]
    return DrillResult(
        name="provider-outage",
        title="Provider outage: one of two backends down for 20 s",
        file="config/drills/provider-outage.yaml",
        started_at="2026-12-07T15:00:00Z",
        duration_s=60.0,
        status="completed",
        phases=list(PHASES),
        marks=[
            Mark(19.5, "steady state holds", "probe"),
            Mark(20.0, "stop backend vllm-b"),
            Mark(30.0, "reload config bad.yaml", ok=False),
            Mark(40.0, "start backend vllm-b", "rollback"),
        ],
        requests=outage_requests(),
        verdicts=verdicts,
    )


def quiet_drill() -> DrillResult:
    """A drill whose load never got a request through (none sent at all)."""
    return DrillResult(
        name="quiet",
        title="Nothing sent",
        file="config/drills/quiet.yaml",
        started_at="2026-12-07T15:05:00Z",
        duration_s=12.5,
        status="completed",
        phases=[Phase("before", 0, 4), Phase("during", 4, 8), Phase("after", 8, 12.5)],
        marks=[Mark(4.0, "start experiment slow-a"), Mark(8.0, "stop experiment", "rollback")],
        verdicts=[Verdict("availability", "during", "availability >= 99%", 0.99, None, 0, True)],
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"  # the first chunk, which holds width and height
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# --- the files --------------------------------------------------------------------------


def test_the_report_is_three_files_named_after_the_drill_in_a_new_directory(
    tmp_path: Path,
) -> None:
    out = tmp_path / "reports" / "nested"
    files = write_report(outage_drill(), out)
    assert files == ReportFiles(
        json=out / "provider-outage.json",
        markdown=out / "provider-outage.md",
        chart=out / "provider-outage.png",
    )
    assert all(path.stat().st_size > 0 for path in (files.json, files.markdown, files.chart))


def test_the_json_round_trips_to_the_same_drill(tmp_path: Path) -> None:
    drill = outage_drill()
    files = write_report(drill, tmp_path)
    again = read_result(files.json)
    assert again == drill
    assert again.passed is False


def test_the_json_counts_each_phase_by_outcome_kind_status_and_backend(tmp_path: Path) -> None:
    document = orjson.loads(write_report(outage_drill(), tmp_path).json.read_bytes())
    assert document["passed"] is False
    assert document["status"] == "completed"
    assert document["failures"][0] == "action failed at 30.0 s: reload config bad.yaml"
    assert len(document["failures"]) == 5  # the action, and four verdicts missed
    counts = document["counts"]
    assert list(counts) == ["before", "during", "after", "all"]
    assert counts["all"]["requests"] == 600
    assert counts["all"]["outcome"] == {"ok": 572, "error": 26, "lost": 2}
    assert counts["all"]["kind"] == {"chat": 200, "embed": 200, "stream": 200}
    assert counts["all"]["status"] == {"200": 572, "429": 6, "503": 20, "none": 2}
    assert counts["during"]["outcome"] == {"ok": 176, "error": 22, "lost": 2}
    assert counts["during"]["backend"] == {"none": 24, "vllm-a": 176}
    assert counts["during"]["errors"] == {"no_backend": 20, "quota": 2, "reset": 2}
    assert counts["before"]["backend"] == {"none": 2, "vllm-a": 98, "vllm-b": 100}
    assert counts["after"]["outcome"] == {"ok": 198, "error": 2, "lost": 0}
    verdicts = {(v["objective"], v["phase"]): v for v in document["verdicts"]}
    assert verdicts["requests_lost", "during"]["measured"] == 2.0
    assert verdicts["chat_p99", "during"]["waived"] is True
    assert [m["label"] for m in document["marks"]][1] == "stop backend vllm-b"


def test_the_json_timeline_has_every_second_with_its_latency_and_errors(
    tmp_path: Path,
) -> None:
    document = orjson.loads(write_report(outage_drill(), tmp_path).json.read_bytes())
    timeline = document["timeline"]
    assert [second["at"] for second in timeline] == list(range(61))  # a request ends at 60.x
    assert sum(second["requests"] for second in timeline) == 600
    assert sum(second["lost"] for second in timeline) == 2
    assert sum(second["errors_5xx"] for second in timeline) == 20
    assert sum(second["errors_4xx"] for second in timeline) == 6
    calm, faulted = timeline[10], timeline[30]
    assert set(calm["backends"]) == {"vllm-a", "vllm-b"}
    assert set(faulted["backends"]) == {"vllm-a"}
    assert faulted["p99_s"] > calm["p99_s"]
    assert calm["ttft_p99_s"] is not None
    assert len(document["requests"]) == 600


# --- the Markdown -------------------------------------------------------------------------


def test_the_markdown_has_the_verdict_rows_counts_marks_and_chart(tmp_path: Path) -> None:
    text = write_report(outage_drill(), tmp_path).markdown.read_text(encoding="utf-8")
    assert text.startswith("# Drill: Provider outage: one of two backends down for 20 s\n")
    assert "**❌ FAIL**" in text
    assert "![" in text and "](provider-outage.png)" in text
    assert "| `availability` | availability >= 99% | before | 100% | 198 | ✅ |" in text
    assert "| `availability` | availability >= 99% | during | 89% | 200 | ❌ |" in text
    assert "| `availability` | availability >= 99% | all | 96.3% | 600 | ❌ |" in text
    assert "| `chat_p99` | p99 latency <= 1 s | during | 97.6% | 200 | waived |" in text
    assert "| `requests_lost` | requests lost = 0 | during | 2 | 200 | ❌ |" in text
    assert (
        "| during | 20.0-40.0 s | 200 | 176 | 22 (429: 2, 503: 20) | **2** (reset: 2) "
        "| none: 24, vllm-a: 176 |"
    ) in text
    assert "| all | whole drill | 600 | 572 | 26 (429: 6, 503: 20) | **2** (reset: 2) |" in text
    assert "| 20.0 s | action | stop backend vllm-b | ✅ |" in text
    assert "| 30.0 s | action | reload config bad.yaml | ❌ failed |" in text
    assert "| 40.0 s | rollback | start backend vllm-b | ✅ |" in text
    # The verdicts in order: by objective, then before, during, after, all.
    rows = re.findall(r"^\| `(\w+)` \|[^|]*\| (\w+) \|", text, re.M)
    assert [phase for _, phase in rows] == [
        "before", "during", "after", "all", "during", "during", "all"
    ]  # fmt: skip


def passing(drill: DrillResult) -> DrillResult:
    drill.verdicts = [v for v in drill.verdicts if v.holds or v.waived]
    drill.marks = [m for m in drill.marks if m.ok]
    return drill


def test_a_failing_drill_says_why(tmp_path: Path) -> None:
    text = write_report(outage_drill(), tmp_path).markdown.read_text(encoding="utf-8")
    assert "\n- action failed at 30.0 s: reload config bad.yaml\n" in text
    assert "\n- missed: availability >= 99% (during)\n" in text
    assert "\n- missed: requests lost = 0 (all)\n" in text
    assert "p99 latency" not in text.split("## Verdicts")[0]  # waived: no reason to fail


def test_a_passing_drill_says_pass(tmp_path: Path) -> None:
    text = write_report(passing(outage_drill()), tmp_path).markdown.read_text(encoding="utf-8")
    assert "**✅ PASS**" in text
    assert "\n- " not in text.split("## Verdicts")[0]


# --- the chart ----------------------------------------------------------------------------


def test_the_chart_is_a_png_about_a_thousand_pixels_wide(tmp_path: Path) -> None:
    chart = write_report(outage_drill(), tmp_path).chart
    width, height = png_size(chart)
    assert 900 <= width <= 1200
    assert 600 <= height <= 1000
    pixels = imread(chart)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.05  # something was drawn on it


def test_a_drill_without_requests_still_gets_all_three_files(tmp_path: Path) -> None:
    drill = quiet_drill()
    files = write_report(drill, tmp_path)
    width, _ = png_size(files.chart)
    assert width >= 900
    document = orjson.loads(files.json.read_bytes())
    assert document["counts"]["all"]["outcome"] == {"ok": 0, "error": 0, "lost": 0}
    assert len(document["timeline"]) == 13  # 12.5 s: every second, empty ones too
    assert all(second["p99_s"] is None for second in document["timeline"])
    text = files.markdown.read_text(encoding="utf-8")
    assert "| `availability` | availability >= 99% | during | — | 0 | ✅ |" in text
    assert read_result(files.json) == drill


def test_a_drill_of_no_length_with_no_marks_nor_phases_draws(tmp_path: Path) -> None:
    drill = DrillResult("empty", "Empty", "e.yaml", "2026-12-07T15:05:00Z", 0.0, "aborted")
    files = write_report(drill, tmp_path)
    png_size(files.chart)
    text = files.markdown.read_text(encoding="utf-8")
    assert "No objectives were judged." in text
    assert "Nothing was recorded." in text


def test_seconds_with_gaps_and_several_during_phases_draw(tmp_path: Path) -> None:
    """Two faults, load only in a few seconds, three backends."""
    ok = [
        RequestResult("chat", "m", "m", at, 0.2, None, 200, "ok", backend=f"b{at % 3}")
        for at in (1, 2, 9, 15)
    ]
    drill = DrillResult(
        "two-faults", "Two faults", "t.yaml", "2026-12-07T15:10:00Z", 20.0, "completed",
        phases=[
            Phase("before", 0, 5), Phase("during", 5, 8), Phase("after", 8, 12),
            Phase("during", 12, 16), Phase("after", 16, 20),
        ],
        requests=ok,
    )  # fmt: skip
    files = write_report(drill, tmp_path)
    png_size(files.chart)
    document = orjson.loads(files.json.read_bytes())
    assert document["counts"]["during"]["requests"] == 1  # the one sent at 15 s
    assert document["counts"]["after"]["requests"] == 1  # the one sent at 9 s
    assert "| during | 5.0-8.0 s, 12.0-16.0 s | 1 |" in files.markdown.read_text("utf-8")


def test_names_are_drawn_as_written_not_as_mathematics(tmp_path: Path) -> None:
    """matplotlib reads `$...$` as mathtext, where `$\\frac$` fails to parse."""
    drill = outage_drill()
    drill.title = "Budget [beta] $\\frac$"
    drill.marks = [Mark(10.0, "set budget $\\sqrt$")]
    drill.requests = [replace(r, backend="$\\alpha_{$") for r in drill.requests]
    files = write_report(drill, tmp_path)
    png_size(files.chart)
    assert "![Budget (beta) $\\frac$: latency" in files.markdown.read_text("utf-8")


# --- the verdict table --------------------------------------------------------------------


def test_the_verdict_table_has_a_row_per_objective_and_a_verdict_per_drill() -> None:
    spike = passing(outage_drill())
    spike.name = "latency-spike"
    interrupted = quiet_drill()
    interrupted.status = "interrupted"
    table = verdict_table([outage_drill(), spike, interrupted])
    lines = table.splitlines()
    assert all(len(line) <= 120 for line in lines)
    assert lines[0].split() == ["drill", "objective", "before", "during", "after", "all", "result"]
    cells = {line.split()[0]: line for line in lines[2:] if line.strip()}
    outage = cells["provider-outage"]
    assert outage.split() == ["provider-outage", "availability", "100%", "✓", "89%", "✗",
                              "100%", "✓", "96.3%", "✗", "FAIL"]  # fmt: skip
    chat_p99 = next(line for line in lines if "chat_p99" in line)
    assert chat_p99.split() == ["chat_p99", "97.6%", "—"]  # waived: the value, no verdict
    lost = next(line for line in lines if "requests_lost" in line)
    assert lost.split() == ["requests_lost", "2", "✗", "2", "✗"]
    assert cells["latency-spike"].split()[-1] == "PASS"
    assert cells["quiet"].split() == ["quiet", "availability", "—", "FAIL"]  # no data
    assert any(line.split() == ["run:", "interrupted"] for line in lines)
    assert any(line.split() == ["action", "failed:", "reload", "config", "bad.yaml"]
               for line in lines)  # fmt: skip
    assert lines[-1].startswith("1 of 3 drills passed.")


def test_the_verdict_table_columns_line_up_and_long_names_are_cut() -> None:
    drill = quiet_drill()
    drill.name = "a-drill-name-far-too-long-to-fit-in-its-column-" * 3
    drill.verdicts = [
        Verdict("an_objective_with_a_very_long_name_" * 3, "all", "d", 0.99, 0.995, 10, True),
    ]
    table = verdict_table([drill, outage_drill()])
    lines = table.splitlines()
    assert all(len(line) <= 120 for line in lines)
    assert "…" in lines[2]
    starts = {line.index("99.5%") for line in lines if "99.5%" in line}
    assert starts == {lines[0].index("all")}


def test_an_empty_list_of_drills_gives_a_header() -> None:
    assert verdict_table([]).splitlines()[-1].startswith("0 of 0 drills passed.")


# --- the timeline and the progress line ---------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([], 99, None), ([3.0], 99, 3.0), ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
     ([float(v) for v in range(1, 101)], 99, 99.0), ([5.0, 1.0], 100, 5.0)],
)  # fmt: skip
def test_percentiles_are_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == expected


def test_requests_go_to_the_second_they_ended_in() -> None:
    requests = [
        RequestResult("chat", "m", "m", 0.5, 0.2, None, 200, "ok", backend="a"),
        RequestResult("chat", "m", "m", 0.5, 2.0, None, 200, "ok", backend="b"),
        RequestResult("stream", "m", "m", 1.1, 0.1, None, None, "error", error="upstream"),
        RequestResult("chat", "m", "m", 1.0, 30.0, None, None, "lost", error="timeout"),
    ]
    seconds = per_second(requests, duration_s=3.0)
    assert len(seconds) == 32  # the lost request outlived the drill: its second is shown
    assert (seconds[0].ok, seconds[0].backends, seconds[0].p99_s) == (1, {"a": 1}, 0.2)
    assert (seconds[1].errors_5xx, seconds[1].share_5xx) == (1, 1.0)  # a stream's error event
    assert (seconds[2].ok, seconds[2].backends) == (1, {"b": 1})
    assert seconds[31].lost == 1
    assert seconds[5].requests == 0 and seconds[5].p50_s is None and seconds[5].share_4xx is None


def test_the_progress_line_shows_the_recent_rate_totals_and_p99() -> None:
    requests = outage_requests()
    at = 30.0
    seen = [r for r in requests if r.ended <= at]
    line = progress_line(at, seen, "during")
    assert len(line) < 100
    assert line.startswith("  30.0 s  during ")
    rate = float(re.search(r"([\d.]+) req/s", line).group(1))  # type: ignore[union-attr]
    assert 8.0 <= rate <= 12.0  # 10 requests/s were sent
    assert "lost 2" in line
    expected = {"ok": sum(r.outcome == "ok" for r in seen), "error": 0}
    expected["error"] = sum(r.outcome == "error" for r in seen)
    assert f"ok {expected['ok']}  error {expected['error']}" in line
    assert re.search(r"p99 \d+\.\d\d s$", line)


def test_the_progress_line_at_the_start_has_nothing_to_show_yet() -> None:
    assert progress_line(0.0, [], "before") == (
        "   0.0 s  before     0.0 req/s  ok 0  error 0  lost 0  p99 -"
    )


@pytest.mark.parametrize(
    ("measured", "shown"),
    [(0.999996, "99.999% ✗"), (1.0, "100% ✓"), (0.99, "99% ✗"), (0.98765, "98.7% ✗"),
     (0.0, "0% ✗")],
)  # fmt: skip
def test_shares_are_rounded_down_so_a_miss_never_reads_as_the_target(
    measured: float, shown: str
) -> None:
    drill = quiet_drill()
    drill.verdicts = [
        Verdict("availability", "all", "availability >= 99.9999%", 0.999999, measured, 10,
                measured >= 0.999999),
    ]  # fmt: skip
    row = verdict_table([drill]).splitlines()[2]
    assert row.split()[2:4] == shown.split()
