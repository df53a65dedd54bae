"""The ratings store: one CSV row per rated clip, safe under concurrent submissions.

Why each precaution:
- a process-wide lock plus an advisory file lock, append mode, flush and fsync: many browser sessions submit
  at once, and a rating that was acknowledged must be on disk, whole, even if the Space restarts next;
- the header is written once, by whoever finds the file empty while holding the lock;
- free text is length-bounded and cells that a spreadsheet would run as a formula (= + - @) are prefixed
  with an apostrophe (OWASP's advice against CSV injection);
- on a Hugging Face Space the disk is wiped on restart, so the CSV's folder can be pushed to a dataset repo
  with `huggingface_hub.CommitScheduler` (it commits in the background every few minutes).
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

COLUMNS = (
    "timestamp", "rater_id", "session_id", "trial_id", "prompt", "negative_prompt", "seed", "steps", "cfg",
    "sampler", "model_id", "system", "precision", "method", "recipe", "recipe_hash", "a_system",
    "presentation_order", "clip_label", "score", "preference", "time_to_rate_s", "attention_check",
    "app_version",
)
MAX_TEXT = {"prompt": 500, "negative_prompt": 500, "rater_id": 64}
DEFAULT_MAX_TEXT = 128
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
SYSTEMS = ("full precision", "quantized")
ACR_LABELS = {5: "Excellent", 4: "Good", 3: "Fair", 2: "Poor", 1: "Bad"}


def neutralise(value) -> str | int | float:
    """A cell value safe for CSV and spreadsheets: numbers as they are, text bounded and formula-proof."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return value
    return "" if value is None else str(value)


def _clean_text(column: str, value) -> str | int | float:
    value = neutralise(value)
    if not isinstance(value, str):
        return value
    text = " ".join(value.split())  # newlines and tabs become single spaces: one row stays one line
    text = text[: MAX_TEXT.get(column, DEFAULT_MAX_TEXT)]
    if text.startswith(FORMULA_PREFIXES):
        text = "'" + text
    return text


@dataclass(frozen=True)
class Trial:
    """One blind A/B presentation: what was generated and which system is behind label A."""
    trial_id: str
    session_id: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    cfg: float
    sampler: str
    model_id: str
    recipe: str  # quant recipe name, e.g. "w8a8-sqd+lora"
    recipe_hash: str
    precision: str  # of the quantized system, e.g. "W8A8"
    method: str  # of the quantized system, e.g. "sqd+lora"
    a_system: str  # "full precision" or "quantized"
    presented_at: float  # time.time() when the pair was shown

    @property
    def systems(self) -> dict[str, str]:
        """Blind label -> system."""
        other = SYSTEMS[1] if self.a_system == SYSTEMS[0] else SYSTEMS[0]
        return {"A": self.a_system, "B": other}

    def rows(self, *, rater_id: str, scores: dict[str, int], preference: str = "", attention_check: str = "",
             app_version: str = "", now: float) -> list[dict]:
        """One CSV row per rated clip. scores: {"A": 1..5, "B": 1..5}; preference "A", "B" or ""."""
        if self.a_system not in SYSTEMS:
            raise ValueError(f"a_system must be one of {SYSTEMS}")
        if set(scores) != {"A", "B"} or any(not (isinstance(v, int) and 1 <= v <= 5) for v in scores.values()):
            raise ValueError("Rate both clips, A and B, on the 1-5 scale.")
        if preference not in ("", "A", "B"):
            raise ValueError("Preference must be A, B or none.")
        common = {
            "timestamp": utc_now(), "rater_id": rater_id, "session_id": self.session_id,
            "trial_id": self.trial_id, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
            "seed": self.seed, "steps": self.steps, "cfg": self.cfg, "sampler": self.sampler,
            "model_id": self.model_id, "recipe": self.recipe, "recipe_hash": self.recipe_hash,
            "a_system": self.a_system, "presentation_order": ";".join(self.systems.values()),
            "preference": self.systems[preference] if preference else "",
            "time_to_rate_s": round(now - self.presented_at, 3), "attention_check": attention_check,
            "app_version": app_version,
        }
        rows = []
        for label, system in self.systems.items():
            quantized = system == "quantized"
            rows.append({**common, "system": system, "clip_label": label, "score": scores[label],
                         "precision": self.precision if quantized else "FP32",
                         "method": self.method if quantized else "none"})
        return rows


class RatingsStore:
    """Append-only CSV of ratings. `append(rows)` writes all rows of one submission atomically together."""

    def __init__(self, path: str | Path, *, dataset_repo: str | None = None, push_minutes: int = 5):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._scheduler = None
        if dataset_repo:
            from huggingface_hub import CommitScheduler

            self._scheduler = CommitScheduler(repo_id=dataset_repo, repo_type="dataset",
                                              folder_path=self.path.parent, path_in_repo="ratings",
                                              every=push_minutes, token=os.environ.get("HF_TOKEN") or None,
                                              allow_patterns=[self.path.name])

    def append(self, rows: Iterable[dict]) -> int:
        """Append rows (dicts keyed by COLUMNS; unknown keys are an error) and return how many were written."""
        cleaned = []
        for row in rows:
            unknown = set(row) - set(COLUMNS)
            if unknown:
                raise ValueError(f"Unknown rating columns: {sorted(unknown)}")
            cleaned.append({column: _clean_text(column, row.get(column)) for column in COLUMNS})
        if not cleaned:
            return 0
        scheduler_lock = self._scheduler.lock if self._scheduler else contextlib.nullcontext()
        with self._lock, scheduler_lock, open(self.path, "a", newline="", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # other processes writing the same file
            try:
                writer = csv.DictWriter(handle, fieldnames=COLUMNS)
                if handle.tell() == 0:
                    writer.writeheader()
                writer.writerows(cleaned)
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return len(cleaned)

    def read(self) -> list[dict]:
        return read_ratings(self.path)


def read_ratings(path: str | Path) -> list[dict]:
    """All rows of a ratings CSV as dicts of strings (empty list when the file does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")

