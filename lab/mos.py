"""Mean opinion score per (precision, method) with a 95 % confidence interval, from the ratings CSV.

The interval is mean ± t(0.975, n-1) · s / sqrt(n) (Student's t: listening tests have few ratings per
condition, where the normal approximation is too narrow). Raters who failed the attention check in a trial
are left out of that trial by default, as P.800-style post-screening does.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from scipy import stats

from lab.ratings import read_ratings


@dataclass(frozen=True)
class MosRow:
    precision: str
    method: str
    n: int
    mos: float
    ci_low: float  # nan when n < 2
    ci_high: float

    @property
    def ci_half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2


def mean_ci(scores: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high); the interval is nan for fewer than two scores."""
    n = len(scores)
    if n == 0:
        raise ValueError("No scores to average.")
    mean = sum(scores) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1))
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def mos_table(rows: list[dict], *, exclude_failed_attention: bool = True) -> list[MosRow]:
    """MOS per (precision, method), full precision first, then by descending MOS."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        if exclude_failed_attention and row.get("attention_check") == "failed":
            continue
        try:
            score = float(row["score"])
        except (KeyError, ValueError):
            continue  # a row that is not a rating (never written by the store, but CSVs get edited)
        groups[(row.get("precision", ""), row.get("method", ""))].append(score)
    table = [MosRow(precision, method, len(scores), *mean_ci(scores))
             for (precision, method), scores in groups.items()]
    return sorted(table, key=lambda r: (r.method != "none", -r.mos, r.precision, r.method))


def mos_from_csv(path: str | Path, **kwargs) -> list[MosRow]:
    return mos_table(read_ratings(path), **kwargs)
