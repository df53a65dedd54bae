"""From the ratings CSV to the numbers a paper reports: per-condition means with 95 % Student-t intervals,
per-item scores, post-screening, and Wilcoxon signed-rank tests against the reference, Holm-corrected.
Rendering (plot, Markdown, files) is lab.study.report's; this module only computes.

Why these choices:
- Student's t, not the normal approximation: listening tests have few ratings per condition;
- raters are excluded whole, always with the reason, never silently, when they: fail any attention check
  (they were not listening); fail any gold page (GOLD_MARGINS: the low-pass anchor not rated clearly below
  the reference); fail the headphone check (lab.study.headphones), or did not take it in a study that has
  one; were released by the experimenter (lab.study.raters.release); rate the MUSHRA hidden reference below 90
  in more than 15 % of their pages (ITU-R BS.1534-3 post-screening); or did not finish (an abandoned design
  slot goes to another rater, whose ratings keep the Latin square balanced: counting both would unbalance it,
  so analyse a closed study, or read the in-progress raters' exclusions as such);
- Wilcoxon on paired differences, because scores are ordinal and raters differ in how they use the scale.
  MUSHRA pairs a condition with the hidden reference on the same page (rater, item); AB scores already are
  differences against the reference (one-sample test against 0); ACR raters hear each item in one
  condition only (Latin square), so ACR pairs are per rater: the rater's mean for the condition against
  their mean for the reference. The anchor is reported but left out of the tested family: it exists to
  calibrate the scale, and testing it would only weaken the Holm correction of the real conditions;
- pacing per rater (time on page over the page's listening time) is reported, and a rater whose every page
  was submitted within PACING_MARGIN of the minimum is flagged, not excluded: a script that waits out the
  listening time looks like that, and so does a quick, attentive listener; the experimenter decides.
"""
from __future__ import annotations

import csv
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from scipy import stats

from lab.study.definition import ANCHOR, HIDDEN_REFERENCE, REFERENCE
from lab.study.manifest import MANIFEST_FILE, RATERS_FILE, STUDY_FILE, read_json
from lab.study.raters import QUESTIONNAIRE, read_records_file
from lab.study.schema import ANALYSED, ATTENTION, GOLD, NUMBERS, REGULAR

HIDDEN_REFERENCE_THRESHOLD = 90.0  # BS.1534-3: a hidden reference below this counts against the rater
HIDDEN_REFERENCE_MAX_SHARE = 0.15  # ... in more than this share of the rater's trials: excluded
CONFIDENCE = 0.95
PACING_MARGIN = 0.10  # every page within 10 % above its listening time: flagged
# Gold pages: the anchor must score at least this much below the reference on the same item (MUSHRA: the
# hidden reference; AB: the anchor row is the answer against the reference, so 2 means "slightly worse" or less).
GOLD_MARGINS = {"mushra": 20.0, "acr": 1.0, "ab": 2.0}


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
class Listening:
    """How the analysed pages were listened to (medians over pages; per clip for plays and streams)."""
    pages: int
    time_on_page_s: float | None
    listening_s: float | None  # the clips' playing time per page
    plays_per_clip: float | None  # as the pages reported them
    streams_per_clip: float | None  # as the server counted them


@dataclass(frozen=True)
class Pacing:
    """How long one rater stayed on their pages, as a multiple of each page's listening time."""
    rater_id: str
    pages: int
    median_ratio: float
    min_ratio: float
    flagged: bool  # every page within PACING_MARGIN of its listening time


@dataclass(frozen=True)
class Results:
    study_id: str
    test_type: str
    raters: int  # raters with any rating
    kept: tuple[str, ...]  # rater ids whose ratings were analysed
    exclusions: tuple[Exclusion, ...]
    conditions: tuple[ConditionResult, ...]  # empty when every rater was excluded
    items: tuple[ItemResult, ...]
    listening: Listening
    questionnaire: dict[str, dict[str, int]]  # question -> answer -> raters (with ratings), "not answered" too
    pacing: tuple[Pacing, ...]  # per rater with ratings
    analysed_rows: tuple[dict, ...]  # the regular pages of the kept raters

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
    missing = set(ANALYSED) - set(rows[0])
    if missing:
        raise ValueError(f"{path} is not a study ratings file (missing columns: {', '.join(sorted(missing))}).")
    for line, row in enumerate(rows, start=2):
        try:
            row["score"], row["item"] = float(row["score"]), int(row["item"])
        except (TypeError, ValueError):
            raise ValueError(f"{path} line {line}: score {row['score']!r} / item {row['item']!r} are not numbers "
                             "(was the file edited by hand?).") from None
        row.setdefault("check", REGULAR)
        for column in NUMBERS[1:]:
            row[column] = float(row[column]) if row.get(column) not in (None, "") else None
    return rows


def screen(rows: list[dict], test_type: str, records: dict[str, dict] | None = None,
           headphone_check: bool = False) -> tuple[Exclusion, ...]:
    """Raters to exclude, each with every reason (see the module docstring); `records` from raters.json,
    `headphone_check`: whether the study has one."""
    records = records or {}
    pages: dict[str, set] = defaultdict(set)
    for row in rows:
        pages[row["rater_id"]].add(row["trial_id"])
    found = [_attention_failures(rows), _gold_failures(rows, test_type)]
    if test_type == "mushra":
        found.append(_hidden_reference_failures(rows))
    exclusions = []
    for rater in sorted(pages):
        reasons = [reasons[rater] for reasons in found if rater in reasons]
        reasons += _record_reasons(records.get(rater), headphone_check, len(pages[rater]))
        if reasons:
            exclusions.append(Exclusion(rater, tuple(reasons)))
    return tuple(exclusions)


def _record_reasons(record: dict | None, headphone_check: bool, pages: int) -> list[str]:
    """What raters.json says against a rater: the headphone check, a release, an unfinished study."""
    if not record:
        return []
    reasons = []
    check = record.get("headphone_check")
    if check is None and headphone_check:
        reasons.append("did not take the headphone check")
    elif check and check.get("passed") is False:
        reasons.append(f"failed the headphone check ({check['correct']} of {check['total']} right)")
    if record.get("withdrawn"):
        reasons.append("released by the experimenter")
    if record.get("finished_at") is None:
        reasons.append(f"did not finish ({pages} pages rated)")
    return reasons


def pacing(rows: list[dict]) -> tuple[Pacing, ...]:
    """Per rater: time on page / listening time over their pages (median, minimum), flagged when every page
    sits within PACING_MARGIN of the minimum listening time."""
    ratios: dict[str, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row["time_on_page_s"] is not None and row["listening_s"]:
            ratios[row["rater_id"]][row["trial_id"]] = row["time_on_page_s"] / row["listening_s"]
    return tuple(Pacing(rater, len(by_page), statistics.median(by_page.values()), min(by_page.values()),
                        flagged=max(by_page.values()) <= 1 + PACING_MARGIN)
                 for rater, by_page in sorted(ratios.items()))


def _attention_failures(rows: list[dict]) -> dict[str, str]:
    checks, failed = defaultdict(set), defaultdict(set)
    for row in rows:
        if row["check"] == ATTENTION:
            checks[row["rater_id"]].add(row["trial_id"])
            if row["attention_passed"] != "true":
                failed[row["rater_id"]].add(row["trial_id"])
    return {rater: f"failed {len(failed[rater])} of {len(checks[rater])} attention checks" for rater in failed}


def gold_passed(scores: dict[str, float], test_type: str) -> bool | None:
    """Whether one gold check (condition -> score on one item) rates the anchor clearly below the reference;
    None when the pages of the check are not all rated."""
    reference = scores.get(HIDDEN_REFERENCE if test_type == "mushra" else REFERENCE)
    if reference is None or ANCHOR not in scores:
        return None
    return scores[ANCHOR] <= reference - GOLD_MARGINS[test_type]


def _gold_failures(rows: list[dict], test_type: str) -> dict[str, str]:
    checks: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)  # (rater, item) -> condition -> score
    for row in rows:
        if row["check"] == GOLD:
            checks[row["rater_id"], row["item"]][row["condition"]] = row["score"]
    outcomes: dict[str, list[bool]] = defaultdict(list)
    for (rater, _), scores in checks.items():
        passed = gold_passed(scores, test_type)
        if passed is not None:
            outcomes[rater].append(passed)
    return {rater: f"rated the low-pass anchor not clearly below the reference on {results.count(False)} of "
                   f"{len(results)} gold checks" for rater, results in outcomes.items() if not all(results)}


def _hidden_reference_failures(rows: list[dict]) -> dict[str, str]:
    hidden: dict[str, dict[str, float]] = defaultdict(dict)  # rater -> trial -> hidden reference score
    for row in rows:
        if row["check"] != ATTENTION and row["condition"] == HIDDEN_REFERENCE:
            hidden[row["rater_id"]][row["trial_id"]] = row["score"]
    failures = {}
    for rater, scores in hidden.items():
        low = sum(score < HIDDEN_REFERENCE_THRESHOLD for score in scores.values())
        share = low / len(scores)
        if share > HIDDEN_REFERENCE_MAX_SHARE:
            failures[rater] = (f"rated the hidden reference below {HIDDEN_REFERENCE_THRESHOLD:g} in {low} of "
                               f"{len(scores)} trials ({share:.0%} > {HIDDEN_REFERENCE_MAX_SHARE:.0%})")
    return failures


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


def screened(csv_path: str | Path, raters_path: str | Path | None = None
             ) -> tuple[list[dict], str, tuple[Exclusion, ...], list[dict]]:
    """(all rows, test type, exclusions, the rows analysed: kept raters' regular pages). The raters file
    (default: raters.json beside the CSV, if any) adds the headphone and did-not-finish exclusions."""
    return _screened(csv_path, *_records(csv_path, raters_path))


def _screened(csv_path: str | Path, records: dict[str, dict], headphone_check: bool = False
              ) -> tuple[list[dict], str, tuple[Exclusion, ...], list[dict]]:
    rows = read_rows(csv_path)
    test_types = {row["test_type"] for row in rows}
    if len(test_types) != 1:
        raise ValueError(f"{csv_path} mixes test types {sorted(test_types)}: analyse one study at a time.")
    test_type = test_types.pop()
    exclusions = screen(rows, test_type, records, headphone_check)
    excluded = {exclusion.rater_id for exclusion in exclusions}
    kept_rows = [row for row in rows if row["rater_id"] not in excluded and row["check"] == REGULAR]
    return rows, test_type, exclusions, kept_rows


def results(csv_path: str | Path, raters_path: str | Path | None = None) -> Results:
    """Everything the report shows, computed from the ratings CSV (and the raters file)."""
    records, headphone_check = _records(csv_path, raters_path)
    rows, test_type, exclusions, kept_rows = _screened(csv_path, records, headphone_check)
    raters = sorted({row["rater_id"] for row in rows})
    excluded = {exclusion.rater_id for exclusion in exclusions}
    shown = [row for row in kept_rows if not (test_type == "ab" and row["condition"] == REFERENCE)]
    return Results(study_id=rows[0].get("study_id", ""), test_type=test_type, raters=len(raters),
                   kept=tuple(r for r in raters if r not in excluded), exclusions=exclusions,
                   conditions=summarise(kept_rows, test_type) if kept_rows else (), items=per_item(shown),
                   listening=listening(kept_rows), questionnaire=questionnaire_counts(records, raters),
                   pacing=pacing(rows),
                   analysed_rows=tuple(kept_rows))


def listening(rows: list[dict]) -> Listening:
    """Medians of time on page and playing time per page, and of plays and streams per clip."""
    pages = {(row["rater_id"], row["trial_id"]): row for row in rows}.values()

    def median(values) -> float | None:
        values = [value for value in values if value is not None]
        return statistics.median(values) if values else None

    return Listening(pages=len(pages), time_on_page_s=median(row["time_on_page_s"] for row in pages),
                     listening_s=median(row["listening_s"] for row in pages),
                     plays_per_clip=median(row["play_count"] for row in rows),
                     streams_per_clip=median(row["stream_count"] for row in rows))


def questionnaire_counts(records: dict[str, dict], raters: list[str]) -> dict[str, dict[str, int]]:
    """question -> answer -> how many of `raters` gave it (empty without a raters file)."""
    if not records:
        return {}
    answers = [records.get(rater, {}).get("questionnaire") or {} for rater in raters]
    return {question: dict(Counter(given.get(question, "not answered") for given in answers))
            for question in QUESTIONNAIRE}


def _records(csv_path: str | Path, raters_path: str | Path | None) -> tuple[dict[str, dict], bool]:
    """(the raters file's records, whether the study beside it has a headphone check)."""
    path = Path(raters_path) if raters_path else Path(csv_path).parent / RATERS_FILE
    if raters_path and not path.is_file():
        raise ValueError(f"No raters file at {path}.")
    if not path.is_file():
        return {}, False
    study = next((path.parent / name for name in (MANIFEST_FILE, STUDY_FILE) if (path.parent / name).is_file()), None)
    headphone_check = bool(read_json(study).get("definition", {}).get("headphone_check")) if study else False
    return read_records_file(path), headphone_check
