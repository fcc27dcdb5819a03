"""A drill's report: `<name>.json` (everything it recorded, for tools), `<name>.md` (for
people: the verdicts, the counts, what it did) and `<name>.png` (the timeline chart the
Markdown embeds); and the plain-text verdict table `make drill` prints over several drills."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from chaos.drill.results import DrillResult, Mark, Phase, RequestResult, Verdict
from chaos.drill.timeline import Counts, Second, count, per_second, progress_line

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "ReportFiles",
    "progress_line",
    "read_result",
    "report_document",
    "report_markdown",
    "verdict_table",
    "write_report",
]

REPORT_VERSION = 1  # the JSON's layout; bump it when a field changes meaning
PHASE_ORDER = ("before", "during", "after", "all")
TABLE_WIDTH = 120  # `make drill`'s table fits a CI log and a terminal


@dataclass(frozen=True, slots=True)
class ReportFiles:
    """Where write_report put a drill's report."""

    json: Path
    markdown: Path
    chart: Path


def write_report(result: DrillResult, out_dir: Path) -> ReportFiles:
    """Write `<name>.json`, `<name>.md` and `<name>.png` into out_dir (made if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(
        json=out_dir / f"{result.name}.json",
        markdown=out_dir / f"{result.name}.md",
        chart=out_dir / f"{result.name}.png",
    )
    seconds = per_second(result.requests, result.duration_s)
    files.json.write_bytes(
        orjson.dumps(report_document(result, seconds), option=orjson.OPT_INDENT_2)
    )
    files.markdown.write_text(report_markdown(result, chart=files.chart.name), encoding="utf-8")
    draw_chart(result, seconds, files.chart)
    return files


# --- JSON ---------------------------------------------------------------------------------


def requests_by_phase(result: DrillResult) -> dict[str, list[RequestResult]]:
    """The requests sent within each phase (a phase that recurs, as a second fault's
    "during", gathers all its spans) and over the whole drill ("all"), before ... all."""
    grouped: dict[str, list[RequestResult]] = {}
    for name in PHASE_ORDER[:-1]:
        spans = [phase for phase in result.phases if phase.name == name]
        if spans:
            grouped[name] = [r for r in result.requests if any(p.holds(r.started) for p in spans)]
    grouped["all"] = list(result.requests)
    return grouped


def phase_counts(result: DrillResult) -> dict[str, Counts]:
    """The counts per phase (requests by when they were sent) and over the whole drill."""
    return {name: count(requests) for name, requests in requests_by_phase(result).items()}


def report_document(result: DrillResult, seconds: list[Second] | None = None) -> dict[str, Any]:
    """Everything the drill recorded and concluded, as the JSON report holds it."""
    if seconds is None:
        seconds = per_second(result.requests, result.duration_s)
    return {
        "report_version": REPORT_VERSION,
        "name": result.name,
        "title": result.title,
        "file": result.file,
        "started_at": result.started_at,
        "duration_s": result.duration_s,
        "status": result.status,
        "passed": result.passed,
        "failures": failure_reasons(result),  # why it did not pass, in words; [] if it did
        "phases": result.phases,
        "marks": result.marks,
        "verdicts": result.verdicts,
        "counts": phase_counts(result),
        "timeline": seconds,
        "requests": result.requests,
    }


def read_result(path: Path) -> DrillResult:
    """The DrillResult a JSON report was written from (to redraw or compare a report)."""
    document = orjson.loads(path.read_bytes())
    return DrillResult(
        name=document["name"],
        title=document["title"],
        file=document["file"],
        started_at=document["started_at"],
        duration_s=document["duration_s"],
        status=document["status"],
        phases=[Phase(**phase) for phase in document["phases"]],
        marks=[Mark(**mark) for mark in document["marks"]],
        requests=[RequestResult(**request) for request in document["requests"]],
        verdicts=[Verdict(**verdict) for verdict in document["verdicts"]],
    )


# --- values as people read them -----------------------------------------------------------


def _percent(share: float) -> str:
    """A share as a percentage, rounded down: a measured 99.9996% must not read as a clean
    100% next to a 99.9999% target it missed. Three decimals near 100%, where the nines
    are the point; one below 99%, where more digits are noise."""
    decimals = 3 if share >= 0.99 else 1
    scale = 10**decimals
    floored = math.floor(share * 100 * scale + 1e-6) / scale
    text = f"{floored:.{decimals}f}".rstrip("0").rstrip(".")
    return f"{text}%"


def _is_count(verdict: Verdict) -> bool:
    # results.py: requests_lost is judged as a count (target: the count allowed, 0).
    return verdict.objective == "requests_lost"


def _value(verdict: Verdict, value: float | None) -> str:
    if value is None:
        return "—"
    if _is_count(verdict):
        return f"{value:g}"
    return _percent(value)


def _seconds(value: float) -> str:
    return f"{value:.1f} s"


def _ordered(verdicts: Sequence[Verdict]) -> list[Verdict]:
    """By objective (in the order the judge gave them), then phase (before ... all)."""
    objectives = list(dict.fromkeys(v.objective for v in verdicts))
    return sorted(
        verdicts, key=lambda v: (objectives.index(v.objective), PHASE_ORDER.index(v.phase))
    )


def _verdict_word(result: DrillResult) -> str:
    return "PASS" if result.passed else "FAIL"


def failure_reasons(result: DrillResult) -> list[str]:
    """Why DrillResult.passed is false, each reason as a short phrase (none if it passed)."""
    reasons = []
    if result.status != "completed":
        reasons.append(f"the run ended {result.status}")
    reasons += [
        f"{mark.kind} failed at {_seconds(mark.at)}: {mark.label}"
        for mark in sorted(result.marks, key=lambda m: m.at)
        if not mark.ok
    ]
    missed = [v for v in _ordered(result.verdicts) if not (v.holds or v.waived)]
    reasons += [f"missed: {v.description} ({v.phase})" for v in missed]
    return reasons


# --- Markdown -----------------------------------------------------------------------------


def report_markdown(result: DrillResult, chart: str) -> str:
    """The Markdown report; `chart` is the PNG's path relative to the Markdown file."""
    lines = [f"# Drill: {result.title}", ""]
    alt = _md_escape(result.title).replace("[", "(").replace("]", ")")  # brackets end alt text
    word = "✅ PASS" if result.passed else "❌ FAIL"
    lines += [
        f"**{word}** · Chaos Toolkit status: `{result.status}`",
        "",
        *(f"- {_md_escape(reason)}" for reason in failure_reasons(result)),
        *([""] if not result.passed else []),
        f"Started {result.started_at}, ran {_seconds(result.duration_s)}, "
        f"{len(result.requests)} requests. Drill file: `{result.file}`.",
        "",
        f"![{alt}: latency, errors and backends over time]({chart})",
        "",
        "## Verdicts",
        "",
    ]
    lines += _verdicts_markdown(result)
    lines += ["", "## Requests per phase", "", *_counts_markdown(result)]
    lines += ["", "## What the drill did", "", *_marks_markdown(result.marks), ""]
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _verdicts_markdown(result: DrillResult) -> list[str]:
    if not result.verdicts:
        return ["No objectives were judged."]
    rows = [
        "| Objective | Target | Phase | Measured | Requests | Result |",
        "|---|---|---|---:|---:|:---:|",
    ]
    for verdict in _ordered(result.verdicts):
        outcome = "waived" if verdict.waived else ("✅" if verdict.holds else "❌")
        rows.append(
            f"| `{verdict.objective}` | {_md_escape(verdict.description)} | {verdict.phase} "
            f"| {_value(verdict, verdict.measured)} | {verdict.requests} | {outcome} |"
        )
    return rows


def _counts_markdown(result: DrillResult) -> list[str]:
    windows: dict[str, list[str]] = {}
    for phase in result.phases:
        windows.setdefault(phase.name, []).append(f"{phase.start:.1f}-{phase.end:.1f} s")
    rows = [
        "| Phase | Sent | Requests | ok | error (by status) | lost | Backends |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for name, chosen in requests_by_phase(result).items():
        counts = count(chosen)
        window = ", ".join(windows.get(name, ["whole drill"]))
        rows.append(
            f"| {name} | {window} | {counts.requests} "
            f"| {counts.outcome['ok']} | {_errors_by_status(chosen)} | {_lost(chosen)} "
            f"| {_tally(counts.backend)} |"
        )
    return rows


def _tally(counter: dict[str, int]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in counter.items()) or "—"


def _errors_by_status(requests: Sequence[RequestResult]) -> str:
    statuses = Counter(
        "stream error event" if r.status is None else str(r.status)
        for r in requests
        if r.outcome == "error"
    )
    total = sum(statuses.values())
    return f"{total} ({_tally(dict(sorted(statuses.items())))})" if total else "0"


def _lost(requests: Sequence[RequestResult]) -> str:
    reasons = Counter(r.error or "unknown" for r in requests if r.outcome == "lost")
    total = sum(reasons.values())
    # Bold: the one outcome a drill never tolerates should not hide in a table.
    return f"**{total}** ({_tally(dict(sorted(reasons.items())))})" if total else "0"


def _marks_markdown(marks: Sequence[Mark]) -> list[str]:
    if not marks:
        return ["Nothing was recorded."]
    rows = ["| At | Kind | What | |", "|---:|---|---|:---:|"]
    for mark in sorted(marks, key=lambda m: m.at):
        rows.append(
            f"| {_seconds(mark.at)} | {mark.kind} | {_md_escape(mark.label)} "
            f"| {'✅' if mark.ok else '❌ failed'} |"
        )
    return rows


# --- the verdict table `make drill` prints ------------------------------------------------


def verdict_table(results: list[DrillResult]) -> str:
    """One row per drill and objective, a column per phase with the measured value and
    ✓ (holds), ✗ (missed) or — (waived, or no requests to judge), and PASS/FAIL per drill."""
    header = ("drill", "objective", *PHASE_ORDER, "result")
    rows: list[tuple[str, ...]] = []
    for result in results:
        rows += _table_rows(result)
    cells = 12
    fixed = len(PHASE_ORDER) * (cells + 2) + len("result") + 2
    room = TABLE_WIDTH - fixed - 2
    drill_width = min(max((len(row[0]) for row in [header, *rows]), default=5), room // 2)
    objective_width = min(max(len(row[1]) for row in [header, *rows]), room - drill_width)
    widths = (drill_width, objective_width, *([cells] * len(PHASE_ORDER)), len("result"))

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(_fit(text, width) for text, width in zip(row, widths, strict=True))

    passed = sum(1 for result in results if result.passed)
    out = [line(header), "  ".join("-" * width for width in widths)]
    out += [line(row) for row in rows]
    out += [
        "",
        f"{passed} of {len(results)} drills passed.  ✓ holds  ✗ missed  — waived or no data",
    ]
    return "\n".join(text.rstrip() for text in out)


def _table_rows(result: DrillResult) -> list[tuple[str, ...]]:
    by_objective: dict[str, dict[str, Verdict]] = {}
    for verdict in _ordered(result.verdicts):
        by_objective.setdefault(verdict.objective, {})[verdict.phase] = verdict
    rows = [
        (objective, *(_table_cell(phases.get(phase)) for phase in PHASE_ORDER))
        for objective, phases in by_objective.items()
    ]
    if result.status != "completed":
        # Chaos Toolkit did not complete the run: that alone fails the drill.
        rows.append((f"run: {result.status}", *([""] * len(PHASE_ORDER))))
    # So does an action or probe that failed (the fault it should have made never was).
    rows += [
        (f"{mark.kind} failed: {mark.label}", *([""] * len(PHASE_ORDER)))
        for mark in sorted(result.marks, key=lambda m: m.at)
        if not mark.ok
    ]
    if not rows:
        rows.append(("(no objectives)", *([""] * len(PHASE_ORDER))))
    word = _verdict_word(result)
    return [
        (result.name if index == 0 else "", *row, word if index == 0 else "")
        for index, row in enumerate(rows)
    ]


def _table_cell(verdict: Verdict | None) -> str:
    if verdict is None:
        return ""  # not judged in this phase at all
    if verdict.measured is None:
        return "—"
    sign = "—" if verdict.waived else ("✓" if verdict.holds else "✗")
    return f"{_value(verdict, verdict.measured)} {sign}"


def _fit(text: str, width: int) -> str:
    return text.ljust(width) if len(text) <= width else text[: width - 1] + "…"


# --- the timeline chart -------------------------------------------------------------------

_MARK_STYLES = {  # kind: (colour, line style)
    "action": ("#1f4e99", "-"),
    "probe": ("#6b6b6b", ":"),
    "rollback": ("#8e44ad", "--"),
}
_FAILED_MARK = "#c0392b"
_LOST = "#7b0000"
_DURING = "#f5b041"  # the fault's window, shaded on every panel
# Legends right of the panels: inside, they would hide the first seconds' data or marks.
_OUTSIDE: dict[str, Any] = {"loc": "upper left", "bbox_to_anchor": (1.01, 1), "fontsize": 8}


def draw_chart(result: DrillResult, seconds: Sequence[Second], path: Path) -> None:
    """The timeline: latency percentiles, error rate and lost requests, each backend's
    share of answers, per second; fault windows shaded, marks drawn. About 1000 px wide."""
    # matplotlib is imported here, not at the top: the runner imports this module for its
    # progress line at start-up, and matplotlib (with numpy) takes a while to import.
    # Figure without pyplot: no global figure registry, no GUI backend (png is Agg's).
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    figure = Figure(figsize=(10, 8.4), dpi=100, layout="constrained")
    latency, errors, shares = figure.subplots(
        3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2, 2]}
    )
    span = len(seconds)
    x = [second.at + 0.5 for second in seconds]  # each second at its middle
    dot = "o" if span <= 120 else None  # a dot per second shows a lone second, until crowded

    def nan(value: float | None) -> float:
        return math.nan if value is None else value

    lines = {"p50": "p50_s", "p99": "p99_s", "p99 TTFT (streams)": "ttft_p99_s"}
    for label, name in lines.items():
        values = [nan(getattr(second, name)) for second in seconds]
        latency.plot(x, values, "-", marker=dot, ms=2, lw=1.2, label=label)
    latency.set_ylabel("latency (s)")
    latency.set_ylim(bottom=0)

    errors.plot(x, [100 * nan(s.share_5xx) for s in seconds], "-", color="#c0392b", label="5xx")
    errors.plot(x, [100 * nan(s.share_4xx) for s in seconds], "-", color="#e67e22", label="4xx")
    errors.set_ylabel("errors (% of requests)")
    errors.yaxis.set_major_formatter(PercentFormatter())
    errors.set_ylim(bottom=0, top=max(5.0, errors.get_ylim()[1]))
    lost_axis = errors.twinx()
    lost_at = [(second.at + 0.5, second.lost) for second in seconds if second.lost]
    # Bars at least a few pixels wide: one lost request in a 10-minute drill must show.
    lost_axis.bar(
        [at for at, _ in lost_at],
        [n for _, n in lost_at],
        width=max(0.9, span / 250),
        color=_LOST,
        alpha=0.8,
    )
    lost_axis.set_ylabel("lost (count)", color=_LOST)
    lost_axis.set_ylim(0, max([1, *(n for _, n in lost_at)]) * 1.15)
    lost_axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    # A proxy, not the bars' own handle: with no bars at all that one has no colour.
    lost_handle = Patch(facecolor=_LOST, alpha=0.8, label="lost (count)")
    handles = [*errors.get_legend_handles_labels()[0], lost_handle]
    errors.legend(handles=handles, **{**_OUTSIDE, "bbox_to_anchor": (1.08, 1)})

    _draw_shares(shares, seconds)

    for axes in (latency, errors, shares):
        # Over the backends' stack (which fills its panel), under the other panels' lines.
        _draw_phases(axes, result.phases, above=axes is shares)
        _draw_marks(axes, result.marks)
        axes.grid(True, alpha=0.3)
        axes.set_xlim(0, span)
    _label_phases(latency, result.phases, span)
    _label_marks(latency, result.marks, span)
    kinds = sorted({mark.kind for mark in result.marks})
    mark_handles = [
        Line2D([], [], color=_MARK_STYLES[kind][0], ls=_MARK_STYLES[kind][1], lw=1, label=kind)
        for kind in kinds
    ]
    latency.legend(
        handles=latency.get_legend_handles_labels()[0] + mark_handles, **_OUTSIDE,
    )  # fmt: skip
    shares.set_xlabel("seconds since the drill started")
    word = _verdict_word(result)
    figure.suptitle(
        f"{_plain(result.title)} — {word}",
        fontsize=13,
        fontweight="bold",
        color="#1e8449" if result.passed else "#c0392b",
    )
    figure.savefig(path, format="png")


def _plain(text: str) -> str:
    """Text as written: matplotlib reads a pair of `$` as mathematics (and fails on some)."""
    return text.replace("$", r"\$")


def _draw_shares(axes: Axes, seconds: Sequence[Second]) -> None:
    """Each backend's share of the whole answers, stacked, one flat step per second (a
    second without answers is a gap)."""
    from matplotlib.ticker import PercentFormatter

    backends = sorted({name for second in seconds for name in second.backends})
    if backends:
        edges = [float(second.at) for second in seconds] + [float(len(seconds))]
        stacks = []
        for name in backends:
            shares = [100 * s.backends.get(name, 0) / s.ok if s.ok else 0.0 for s in seconds]
            stacks.append([*shares, shares[-1]])  # step="post" draws up to the last edge
        axes.stackplot(edges, stacks, labels=[_plain(b) for b in backends], alpha=0.85, step="post")
        # The top of the stack first, as the eye reads it.
        handles, labels = axes.get_legend_handles_labels()
        axes.legend(handles[::-1], labels[::-1], **_OUTSIDE)
    else:
        axes.text(0.5, 0.5, "no answered requests", ha="center", transform=axes.transAxes)
    axes.set_ylabel("answers by backend")
    axes.set_ylim(0, 100)
    axes.yaxis.set_major_formatter(PercentFormatter())


def _draw_phases(axes: Axes, phases: Sequence[Phase], above: bool) -> None:
    for phase in phases:
        if phase.name == "during":
            if above:  # hatched, not tinted: a tint would change the backends' colours
                axes.axvspan(
                    phase.start, phase.end, facecolor="none", edgecolor=(0, 0, 0, 0.3),
                    hatch="//", lw=0, zorder=2.5,
                )  # fmt: skip
            else:
                axes.axvspan(phase.start, phase.end, color=_DURING, alpha=0.22, lw=0, zorder=0)
    for boundary in sorted({p.start for p in phases} | {p.end for p in phases}):
        axes.axvline(boundary, color="#555555", lw=0.8, ls=(0, (2, 2)), zorder=1)


def _label_phases(axes: Axes, phases: Sequence[Phase], span: float) -> None:
    """Each phase's name above the top panel, over its middle; the fault's window first,
    then the others where they would not run into a label already placed (a short phase
    in a long drill: its boundaries and the Markdown's table still show it)."""
    top = axes.get_xaxis_transform()  # x in data, y in axes fraction
    per_char = span * 0.0085  # a 9 pt character on a panel about 830 px wide
    placed: list[tuple[float, float]] = []
    for phase in sorted(phases, key=lambda p: p.name != "during"):
        middle = (phase.start + phase.end) / 2
        half = per_char * (len(phase.name) + 1) / 2
        extent = (middle - half, middle + half)
        if any(extent[0] < right and left < extent[1] for left, right in placed):
            continue
        placed.append(extent)
        axes.text(
            middle, 1.01, phase.name, transform=top, ha="center", va="bottom", fontsize=9,
            fontweight="bold" if phase.name == "during" else "normal",
        )  # fmt: skip


def _draw_marks(axes: Axes, marks: Sequence[Mark]) -> None:
    for mark in marks:
        colour, style = _MARK_STYLES[mark.kind]
        axes.axvline(mark.at, color=colour if mark.ok else _FAILED_MARK, ls=style, lw=0.9)


def _label_marks(axes: Axes, marks: Sequence[Mark], span: float) -> None:
    """Each mark's label along its line, left of it; a mark too close to the one before
    (two actions half a second apart) gets its label on the right, so neither hides."""
    top = axes.get_xaxis_transform()
    too_close = span * 0.015  # about one rotated line of 7 pt text at 1000 px
    previous: tuple[float, str] | None = None
    for mark in sorted(marks, key=lambda m: m.at):
        side = "right"  # matplotlib's ha: the text ends at the line
        if previous is not None and mark.at - previous[0] < too_close and previous[1] == "right":
            side = "left"
        previous = (mark.at, side)
        colour = _MARK_STYLES[mark.kind][0] if mark.ok else _FAILED_MARK
        label = _plain(mark.label if len(mark.label) <= 32 else mark.label[:31] + "…")
        axes.text(
            mark.at, 0.97, f"{label}{'' if mark.ok else ' (failed)'}", transform=top,
            rotation=90, ha=side, va="top", fontsize=7, color=colour, zorder=5,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.75, "pad": 1},
        )  # fmt: skip
