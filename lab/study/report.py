"""How an analysed study is shown: a box + strip plot per condition and a Markdown report.

Every rating is drawn next to its condition's box, so a reader sees the spread and the outliers behind each
mean; the report states the method (scale, interval, screening, test, pairing) next to the numbers, so a
table pasted into a paper carries what it needs to be read correctly.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import plotly.graph_objects as go

from lab.study.analysis import condition_order
from lab.study.definition import REFERENCE, SCALES

if TYPE_CHECKING:
    from lab.study.analysis import Report

MEASURE = {"acr": "MOS (1-5)", "ab": "CMOS against full precision (-3..3)", "mushra": "MUSHRA score (0-100)"}


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


def to_markdown(report: Report) -> str:
    lines = [f"# Listening study `{report.study_id}` ({report.test_type.upper()})", "",
             f"Raters: {report.raters} with ratings, {len(report.kept)} kept, {len(report.exclusions)} excluded.", ""]
    if report.exclusions:
        lines += ["## Excluded raters", "", "| rater | reason |", "|---|---|"]
        lines += [f"| {e.rater_id} | {'; '.join(e.reasons)} |" for e in report.exclusions]
        lines.append("")
    lines += [f"## {MEASURE[report.test_type]} per condition", "",
              "| condition | n | mean | 95 % CI | pairs | p (Wilcoxon) | p (Holm) |", "|---|---:|---:|---|---:|---:|---:|"]
    for c in report.conditions:
        interval = f"[{_number(c.ci_low)}, {_number(c.ci_high)}]" if not math.isnan(c.ci_low) else "–"
        lines.append(f"| {c.condition} | {c.n} | {_number(c.mean)} | {interval} | {c.pairs or '–'} | "
                     f"{_p(c.p_value)} | {_p(c.p_holm)} |")
    conditions = condition_order({name for item in report.items for name in item.means})
    lines += ["", "## Mean score per item", "", "| item | prompt | " + " | ".join(conditions) + " |",
              "|---:|---|" + "---:|" * len(conditions)]
    for item in report.items:
        prompt = item.prompt.replace("|", "\\|")
        cells = [f"{_number(item.means[c])} ({item.counts[c]})" if c in item.means else "–" for c in conditions]
        lines.append(f"| {item.item} | {prompt} | " + " | ".join(cells) + " |")
    lines += ["", "## Method", "", _method(report.test_type), "", f"Plot: `{report.plot_path.name}`.", ""]
    return "\n".join(lines)


def _method(test_type: str) -> str:
    common = ("Intervals: mean ± t(0.975, n−1)·s/√n. Raters failing any attention check are excluded. "
              "p-values: two-sided Wilcoxon signed-rank test of each quantized condition against the reference, "
              "Holm-corrected over those conditions (the anchor is not tested). ")
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
