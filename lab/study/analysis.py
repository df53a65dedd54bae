"""From the ratings CSV to the numbers a paper reports: per-condition means with 95 % Student-t intervals,
per-item scores, post-screening, and Wilcoxon signed-rank tests against the reference, Holm-corrected.

Why these choices:
- Student's t, not the normal approximation: listening tests have few ratings per condition;
- raters who fail any attention check are dropped entirely (they were not listening), and MUSHRA raters
  who rate the hidden reference below 90 in more than 15 % of their trials are dropped (ITU-R BS.1534-3
  post-screening): both are reported with the reason, never silently;
- Wilcoxon on paired differences, because scores are ordinal and raters differ in how they use the scale.
  MUSHRA pairs a condition with the hidden reference on the same page (rater, item); AB scores already are
  differences against the reference (one-sample test against 0); ACR raters hear each item in one
  condition only (Latin square), so ACR pairs are per rater: the rater's mean for the condition against
  their mean for the reference. The anchor is reported but left out of the tested family: it exists to
  calibrate the scale, and testing it would only weaken the Holm correction of the real conditions.
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats

from lab.study.definition import ANCHOR, HIDDEN_REFERENCE, REFERENCE

HIDDEN_REFERENCE_THRESHOLD = 90.0  # BS.1534-3: a hidden reference below this counts against the rater
HIDDEN_REFERENCE_MAX_SHARE = 0.15  # ... in more than this share of the rater's trials: excluded
CONFIDENCE = 0.95


@dataclass(frozen=True)
class ConditionResult:
    condition: str
    n: int  # ratings
    mean: float
    ci_low: float  # nan when n < 2
    ci_high: float
    pairs: int = 0  # paired differences in the Wilcoxon test (0: not tested)
    p_value: float | None = None  # two-sided, uncorrected
    p_holm: float | None = None  # Holm-adjusted over the tested conditions


@dataclass(frozen=True)
class ItemResult:
    item: int
    prompt: str
    means: dict[str, float]  # condition -> mean score
    counts: dict[str, int]


@dataclass(frozen=True)
class Exclusion:
    rater_id: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Report:
    study_id: str
    test_type: str
    raters: int  # raters with any rating
    kept: tuple[str, ...]  # rater ids whose ratings were analysed
    exclusions: tuple[Exclusion, ...]
    conditions: tuple[ConditionResult, ...]
    items: tuple[ItemResult, ...]
    markdown: str
    report_path: Path
    plot_path: Path
    figure: Any = None  # the plotly figure written to plot_path

    def condition(self, name: str) -> ConditionResult:
        return next(result for result in self.conditions if result.condition == name)


def mean_ci(scores: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): mean ± t((1+confidence)/2, n-1) · s / sqrt(n); the interval is nan for n < 2."""
    n = len(scores)
    if n == 0:
        raise ValueError("No scores to average.")
    mean = sum(scores) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((score - mean) ** 2 for score in scores) / (n - 1))
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def read_rows(csv_path: str | Path) -> list[dict]:
    path = Path(csv_path)
    if not path.is_file():
        raise ValueError(f"No ratings file at {path}: no rater has submitted yet.")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path} holds no ratings yet.")
    needed = {"rater_id", "trial_id", "test_type", "item", "condition", "score", "attention_target",
              "attention_passed"}
    missing = needed - set(rows[0])
    if missing:
        raise ValueError(f"{path} is not a study ratings file (missing columns: {', '.join(sorted(missing))}).")
    for line, row in enumerate(rows, start=2):
        try:
            row["score"], row["item"] = float(row["score"]), int(row["item"])
        except (TypeError, ValueError):
            raise ValueError(f"{path} line {line}: score {row['score']!r} / item {row['item']!r} are not numbers "
                             "(was the file edited by hand?).") from None
    return rows


def screen(rows: list[dict], test_type: str) -> tuple[Exclusion, ...]:
    """Raters to exclude: any failed attention check; for MUSHRA, BS.1534 hidden-reference post-screening."""
    checks, failed = defaultdict(set), defaultdict(set)
    hidden: dict[str, dict[str, float]] = defaultdict(dict)  # rater -> trial -> hidden reference score
    for row in rows:
        rater = row["rater_id"]
        if row["attention_target"] != "":
            checks[rater].add(row["trial_id"])
            if row["attention_passed"] != "true":
                failed[rater].add(row["trial_id"])
        elif row["condition"] == HIDDEN_REFERENCE:
            hidden[rater][row["trial_id"]] = row["score"]
    exclusions = []
    for rater in sorted({row["rater_id"] for row in rows}):
        reasons = []
        if failed[rater]:
            reasons.append(f"failed {len(failed[rater])} of {len(checks[rater])} attention checks")
        if test_type == "mushra" and hidden[rater]:
            low = sum(score < HIDDEN_REFERENCE_THRESHOLD for score in hidden[rater].values())
            share = low / len(hidden[rater])
            if share > HIDDEN_REFERENCE_MAX_SHARE:
                reasons.append(f"rated the hidden reference below {HIDDEN_REFERENCE_THRESHOLD:g} in {low} of "
                               f"{len(hidden[rater])} trials ({share:.0%} > {HIDDEN_REFERENCE_MAX_SHARE:.0%})")
        if reasons:
            exclusions.append(Exclusion(rater, tuple(reasons)))
    return tuple(exclusions)


def condition_order(conditions) -> list[str]:
    """References first, quantized conditions alphabetically, the anchor last."""
    def key(name: str):
        return (0 if name in (REFERENCE, HIDDEN_REFERENCE) else 2 if name == ANCHOR else 1, name)
    return sorted(set(conditions), key=key)


def paired_differences(rows: list[dict], test_type: str, condition: str) -> list[float]:
    """Differences condition - reference for the Wilcoxon test (see the module docstring for the pairing)."""
    if test_type == "ab":
        return [row["score"] for row in rows if row["condition"] == condition]
    reference = HIDDEN_REFERENCE if test_type == "mushra" else REFERENCE
    by_unit: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        unit = (row["rater_id"], row["item"]) if test_type == "mushra" else (row["rater_id"],)
        by_unit[unit][row["condition"]].append(row["score"])
    return [sum(s[condition]) / len(s[condition]) - sum(s[reference]) / len(s[reference])
            for s in by_unit.values() if s[condition] and s[reference]]


def wilcoxon_p(differences: list[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value; 1.0 when every difference is zero, None without pairs."""
    if not differences:
        return None
    if all(d == 0 for d in differences):
        return 1.0
    return float(stats.wilcoxon(differences).pvalue)


def summarise(rows: list[dict], test_type: str) -> tuple[ConditionResult, ...]:
    """Mean, interval and (Holm-corrected) test per condition of the kept, non-attention rows."""
    scores = defaultdict(list)
    for row in rows:
        scores[row["condition"]].append(row["score"])
    if test_type == "ab":
        scores.pop(REFERENCE, None)  # the mirror of every condition's score, not a condition of its own
    reference = {"acr": REFERENCE, "mushra": HIDDEN_REFERENCE, "ab": None}[test_type]
    tested = [name for name in condition_order(scores) if name not in (reference, ANCHOR)]
    differences = {name: paired_differences(rows, test_type, name) for name in tested}
    raw = {name: wilcoxon_p(differences[name]) for name in tested}
    with_p = [name for name in tested if raw[name] is not None]
    adjusted = dict(zip(with_p, holm([raw[name] for name in with_p])))
    return tuple(ConditionResult(name, len(scores[name]), *mean_ci(scores[name]),
                                 pairs=len(differences.get(name, [])), p_value=raw.get(name),
                                 p_holm=adjusted.get(name))
                 for name in condition_order(scores))


def per_item(rows: list[dict]) -> tuple[ItemResult, ...]:
    grouped: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    prompts = {}
    for row in rows:
        grouped[row["item"]][row["condition"]].append(row["score"])
        prompts[row["item"]] = row.get("prompt", "")
    return tuple(ItemResult(item, prompts[item],
                            {c: sum(grouped[item][c]) / len(grouped[item][c]) for c in condition_order(grouped[item])},
                            {c: len(grouped[item][c]) for c in condition_order(grouped[item])})
                 for item in sorted(grouped))


def screened(csv_path: str | Path) -> tuple[list[dict], str, tuple[Exclusion, ...], list[dict]]:
    """(all rows, test type, exclusions, the rows analysed): excluded raters and attention-check pages out."""
    rows = read_rows(csv_path)
    test_types = {row["test_type"] for row in rows}
    if len(test_types) != 1:
        raise ValueError(f"{csv_path} mixes test types {sorted(test_types)}: analyse one study at a time.")
    test_type = test_types.pop()
    exclusions = screen(rows, test_type)
    excluded = {exclusion.rater_id for exclusion in exclusions}
    kept_rows = [row for row in rows if row["rater_id"] not in excluded and row["attention_target"] == ""]
    if not kept_rows:
        raise ValueError("Every rater was excluded by post-screening: there is nothing left to analyse.")
    return rows, test_type, exclusions, kept_rows


def analyse(csv_path: str | Path, out_dir: str | Path) -> Report:
    """Analyse a study's ratings CSV; writes `report.md` and `scores.html` into `out_dir`."""
    rows, test_type, exclusions, kept_rows = screened(csv_path)
    raters = sorted({row["rater_id"] for row in rows})
    excluded = {exclusion.rater_id for exclusion in exclusions}
    conditions = summarise(kept_rows, test_type)
    items = per_item([row for row in kept_rows if not (test_type == "ab" and row["condition"] == REFERENCE)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_id = rows[0].get("study_id", "")
    plot_path = out_dir / "scores.html"
    from lab.study.report import scores_figure, to_markdown

    figure = scores_figure(kept_rows, test_type, title=study_id)
    figure.write_html(plot_path, include_plotlyjs="cdn")  # as the benchmark's chart: small files
    report = Report(study_id=study_id, test_type=test_type, raters=len(raters),
                    kept=tuple(r for r in raters if r not in excluded), exclusions=exclusions,
                    conditions=conditions, items=items, markdown="", report_path=out_dir / "report.md",
                    plot_path=plot_path, figure=figure)
    markdown = to_markdown(report)
    report.report_path.write_text(markdown, encoding="utf-8")
    return Report(**{**report.__dict__, "markdown": markdown})
