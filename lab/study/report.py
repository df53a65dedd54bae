"""How an analysed study is shown: `analyse` computes (lab.study.analysis) and writes, into one folder,
`report.md`, `exclusions.csv` and `scores.html` (a box + strip plot per condition, with `plotly.min.js`
beside it, so the plot opens offline).

Every rating is drawn next to its condition's box, so a reader sees the spread and the outliers behind each
mean; the report states the method (scale, interval, screening, test, pairing) next to the numbers, so a
table pasted into a paper carries what it needs to be read correctly. The exclusion table is always
written, also when every rater was excluded: that is when it matters most.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go

from lab.study.analysis import GOLD_MARGINS, PACING_MARGIN, Results, condition_order, results
from lab.study.definition import REFERENCE, SCALES

REPORT_FILE = "report.md"
PLOT_FILE = "scores.html"
EXCLUSIONS_FILE = "exclusions.csv"
MEASURE = {"acr": "MOS (1-5)", "ab": "CMOS against full precision (-3..3)", "mushra": "MUSHRA score (0-100)"}


@dataclass(frozen=True)
class Report:
    results: Results
    markdown: str
    report_path: Path
    plot_path: Path
    exclusions_path: Path
    figure: go.Figure  # the plot written to plot_path


def analyse(csv_path: str | Path, out_dir: str | Path, raters_path: str | Path | None = None) -> Report:
    """Analyse a study's ratings CSV (and raters file: default raters.json beside it) into `out_dir`."""
    computed = results(csv_path, raters_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = scores_figure(list(computed.analysed_rows), computed.test_type, title=computed.study_id)
    plot_path = out_dir / PLOT_FILE
    figure.write_html(plot_path, include_plotlyjs="directory")  # plotly.min.js beside it: works offline
    exclusions_path = out_dir / EXCLUSIONS_FILE
    with open(exclusions_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("rater_id", "reasons"))
        writer.writerows((exclusion.rater_id, "; ".join(exclusion.reasons)) for exclusion in computed.exclusions)
    report_path = out_dir / REPORT_FILE
    markdown = to_markdown(computed, plot_path.name)
    report_path.write_text(markdown, encoding="utf-8")
    return Report(computed, markdown, report_path, plot_path, exclusions_path, figure)


def scores_figure(rows: list[dict], test_type: str, title: str = "") -> go.Figure:
    """One box per condition with every rating as a jittered point beside it."""
    scores: dict[str, list[float]] = {}
    for row in rows:
        if test_type == "ab" and row["condition"] == REFERENCE:
            continue
        scores.setdefault(row["condition"], []).append(row["score"])
    figure = go.Figure()
    for condition in condition_order(scores):
        figure.add_trace(go.Box(y=scores[condition], name=condition, boxpoints="all", jitter=0.4, pointpos=-1.6,
                                marker={"size": 4, "opacity": 0.6}, boxmean=True))
    scale = SCALES[test_type]
    pad = (scale.maximum - scale.minimum) * 0.05
    figure.update_layout(title=title, yaxis_title=MEASURE[test_type], showlegend=False, template="plotly_white",
                         yaxis_range=[scale.minimum - pad, scale.maximum + pad])
    return figure


def _number(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def to_markdown(report: Results, plot_name: str = PLOT_FILE) -> str:
    lines = [f"# Listening study `{report.study_id}` ({report.test_type.upper()})", "",
             f"Raters: {report.raters} with ratings, {len(report.kept)} kept, {len(report.exclusions)} excluded.", ""]
    if not report.kept:
        lines += ["**Every rater was excluded: there are no ratings to analyse.** The reasons are below and in "
                  f"`{EXCLUSIONS_FILE}`.", ""]
    if report.exclusions:
        lines += ["## Excluded raters", "", "| rater | reason |", "|---|---|"]
        lines += [f"| {_cell(e.rater_id)} | {_cell('; '.join(e.reasons))} |" for e in report.exclusions]
        lines.append("")
    if report.conditions:
        lines += _results_tables(report)
    lines += _listening_lines(report) + _pacing_lines(report) + _questionnaire_lines(report)
    lines += ["## Method", "", _method(report.test_type), "", f"Plot: `{plot_name}`.", ""]
    return "\n".join(lines)


def _results_tables(report: Results) -> list[str]:
    lines = [f"## {MEASURE[report.test_type]} per condition", "",
             "| condition | n | mean | 95 % CI | pairs | p (Wilcoxon) | p (Holm) |", "|---|---:|---:|---|---:|---:|---:|"]
    for c in report.conditions:
        interval = f"[{_number(c.ci_low)}, {_number(c.ci_high)}]" if not math.isnan(c.ci_low) else "–"
        lines.append(f"| {c.condition} | {c.n} | {_number(c.mean)} | {interval} | {c.pairs or '–'} | "
                     f"{_p(c.p_value)} | {_p(c.p_holm)} |")
    conditions = condition_order({name for item in report.items for name in item.means})
    lines += ["", "## Mean score per item", "", "| item | prompt | " + " | ".join(conditions) + " |",
              "|---:|---|" + "---:|" * len(conditions)]
    for item in report.items:
        cells = [f"{_number(item.means[c])} ({item.counts[c]})" if c in item.means else "–" for c in conditions]
        lines.append(f"| {item.item} | {_cell(item.prompt)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _listening_lines(report: Results) -> list[str]:
    heard = report.listening
    if not heard.pages:
        return []
    return ["## Listening", "", f"Over the {heard.pages} analysed pages (medians): "
            f"{_number(heard.time_on_page_s, 1)} s on a page for {_number(heard.listening_s, 1)} s of clips; "
            f"{_number(heard.plays_per_clip, 1)} plays per clip as the page reported them, "
            f"{_number(heard.streams_per_clip, 1)} complete transfers per clip as the server counted them.", ""]


def _pacing_lines(report: Results) -> list[str]:
    """Per rater, time on page as a multiple of the page's listening time; flagged: never more than the margin."""
    if not report.pacing:
        return []
    flagged = [p.rater_id for p in report.pacing if p.flagged]
    lines = ["## Pacing (every rater with ratings)", "",
             f"Time on page divided by the page's listening time (the server refuses a page under 1). Flagged: "
             f"every page within {PACING_MARGIN:.0%} of the minimum, as a script that waits out the listening time "
             f"would be; flagged raters are not excluded ({len(flagged)} flagged).", "",
             "| rater | pages | median | minimum | flagged |", "|---|---:|---:|---:|---|"]
    lines += [f"| {_cell(p.rater_id)} | {p.pages} | {_number(p.median_ratio)} | {_number(p.min_ratio)} | "
              f"{'yes' if p.flagged else ''} |" for p in report.pacing]
    return lines + [""]


def _questionnaire_lines(report: Results) -> list[str]:
    if not report.questionnaire:
        return []
    lines = ["## Questionnaire (raters with ratings)", "", "| question | answers |", "|---|---|"]
    for question, counts in report.questionnaire.items():
        lines.append(f"| {question} | " + ", ".join(f"{_cell(answer)}: {n}" for answer, n in counts.items()) + " |")
    return lines + [""]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _method(test_type: str) -> str:
    common = ("Intervals: mean ± t(0.975, n−1)·s/√n. Raters are excluded, with the reason, when they fail any "
              "attention check, any gold check (the low-pass anchor rated at least "
              f"{GOLD_MARGINS[test_type]:g} below the reference on the same item), or the headphone check (or did "
              "not take it), were released by the experimenter, or did not finish. p-values: two-sided Wilcoxon signed-rank test of each quantized condition against the "
              "reference, Holm-corrected over those conditions (the anchor is not tested). ")
    pairing = {
        "acr": "ACR (ITU-T P.800, 1 Bad … 5 Excellent). Each rater hears an item in one condition (Latin square), "
               "so pairs are per rater: the rater's mean for the condition minus their mean for the reference.",
        "ab": "CCR (ITU-T P.800, −3 … +3): each score is the condition judged against full precision (positive = "
              "better), so the test is one-sample against 0 over the (rater, item) scores.",
        "mushra": "MUSHRA (ITU-R BS.1534, 0–100) with hidden reference and low-pass anchor. Post-screening excludes "
                  "raters who rate the hidden reference below 90 in more than 15 % of their trials. Pairs: "
                  "condition minus hidden reference on the same page (rater, item).",
    }[test_type]
    return pairing + " " + common
