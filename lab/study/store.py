"""The ratings of a study, in long format: one CSV row per (rater, trial, rated stimulus).

Why each precaution:
- a submission is validated completely before anything is written (the trial is the rater's, unrated, every
  clip streamed to the rater by the server, at least the clips' playing time spent on the page, every score
  on the scale and every MUSHRA slider moved), so a rejected page leaves no trace and the message says what
  to do. The page's own play counts are recorded but prove nothing: only the server's stream counts do;
- a thread lock plus an advisory file lock, append mode, flush and fsync: many browser tabs and app
  processes submit at once, and an acknowledged rating must be on disk, whole, even if the server dies next;
  "one rating per trial" is checked under the same locks, against rows other processes appended;
- text cells are bounded and cells a spreadsheet would run as a formula (= + - @ tab CR) get a leading
  apostrophe (OWASP's advice against CSV injection); numbers are written as they are;
- on a Hugging Face Space the disk is wiped on restart: `dataset_repo` pushes the CSV (and the rater
  registry) with `huggingface_hub.CommitScheduler`, off by default.

The columns are lab.study.schema's. When a rater's last page is stored, the rater is marked finished
(lab.study.raters), which keeps their design slot from being given to someone else.

AB rows: the rater answers once (CCR, B against A, -3..3); the B row gets that score and the A row its
negation, so every row's score says how its stimulus fared against the other one on the page.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lab.resources import app_version
from lab.study.assignment import Trial, attention_passed, trials_for
from lab.study.manifest import RATERS_FILE, RATINGS_FILE, Manifest
from lab.study.raters import clean_rater_id, mark_finished
from lab.study.schema import COLUMNS

MAX_COMMENT_CHARS = 500
MAX_CELL_CHARS = 600  # prompts are at most 500
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class Submission:
    rows: int  # rows written
    message: str | None = None  # something the rater should know, e.g. that the comment was cut


@dataclass(frozen=True)
class Progress:
    done: frozenset[str]  # trial ids already rated
    total: int
    remaining: tuple[Trial, ...]  # in presentation order: remaining[0] is the page to show next

    @property
    def complete(self) -> bool:
        return not self.remaining


def cell(value) -> str | int | float:
    """A CSV cell: numbers as they are, text on one line, bounded and formula-proof."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return value
    text = " ".join(("" if value is None else str(value)).split())[:MAX_CELL_CHARS]
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


class RatingsStore:
    """Append-only ratings CSV of one study (default `<study>/ratings.csv`)."""

    def __init__(self, manifest: Manifest, *, path: str | Path | None = None, dataset_repo: str | None = None,
                 push_minutes: int = 5, clock: Callable[[], float] = time.time):
        self.manifest = manifest
        self.clock = clock
        self._seconds = {stimulus.file: stimulus.seconds for item in manifest.items for stimulus in item.stimuli}
        self.path = Path(path) if path else manifest.study_dir / RATINGS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.app_version = app_version()
        self._lock = threading.Lock()
        self._done: set[tuple[str, str]] = set()  # (rater_id cell, trial_id) seen in the file
        self._offset = 0  # bytes of the file already read into _done
        self._scheduler = None
        if dataset_repo:
            from huggingface_hub import CommitScheduler

            patterns = [self.path.name] + ([RATERS_FILE] if self.path.parent == manifest.study_dir else [])
            self._scheduler = CommitScheduler(repo_id=dataset_repo, repo_type="dataset", folder_path=self.path.parent,
                                              path_in_repo=f"studies/{manifest.study_id}", every=push_minutes,
                                              token=os.environ.get("HF_TOKEN") or None, allow_patterns=patterns)

    def submit(self, trial: Trial | str, rater_id: str, scores: float | Mapping[str, float | None],
               plays: Mapping[str, int], *, presented_at: float, session_id: str = "", comment: str = "",
               streamed: Mapping[str, int] | None = None) -> Submission:
        """Validate and store one page's ratings.

        trial: the page, or its id: either way the rater's own list, computed here once, decides what it is.
        scores: ACR one number (1..5), AB one number (-3..3: B against A), MUSHRA {label: 0..100 or None for a
        slider not moved} for every rated clip. plays: {label: plays} as the page reports them (recorded).
        streamed: {label: complete transfers of the clip to this rater for this page}, counted by the server
        (the reference too). presented_at: the server's time when the page was shown. Raises ValueError,
        writing nothing, when the page cannot be stored."""
        rater_id = clean_rater_id(rater_id)
        now = self.clock()
        trials = trials_for(self.manifest, rater_id, now=now)
        wanted = trial if isinstance(trial, str) else trial.trial_id
        trial = next((t for t in trials if t.trial_id == wanted), None)  # the server's copy decides
        if trial is None:
            raise ValueError("This page is not in your list: reload the study to continue where you left off.")
        unheard = [s.label for s in trial.stimuli if not _count(streamed or {}, s.label)]
        if unheard:
            raise ValueError(f"Listen to every clip before rating; not played yet: {', '.join(unheard)}.")
        if not (_is_number(presented_at) and presented_at <= now + 1):
            raise ValueError("The page's presentation time is missing or in the future: reload the page.")
        listening = self.listening_seconds(trial)
        if now - presented_at < listening:
            raise ValueError(f"The clips on this page take {math.ceil(listening)} s to play: listen to each of them "
                             "to the end before rating.")
        answers = _answers(trial, scores, self.manifest.definition.require_max_rating)
        text = " ".join(str(comment or "").split())
        message = None
        if len(text) > MAX_COMMENT_CHARS:
            text = text[:MAX_COMMENT_CHARS]
            message = f"Your comment was cut to its first {MAX_COMMENT_CHARS} characters."
        rows = self._rows(trial, rater_id, answers, {"plays": plays, "streamed": streamed},
                          (presented_at, now, listening), session_id, text)
        if self._append(rater_id, trial.trial_id, rows, [t.trial_id for t in trials]):
            mark_finished(self.manifest.study_dir, rater_id, now)
        return Submission(rows=len(rows), message=message)

    def listening_seconds(self, trial: Trial) -> float:
        """The page's playing time: each distinct clip once (MUSHRA's open reference included)."""
        return sum(self._seconds[file] for file in {stimulus.file for stimulus in trial.stimuli})

    def _append(self, rater_id: str, trial_id: str, rows: list[dict], trial_ids: list[str]) -> bool:
        """Append a page's rows (refused if the page is already stored); whether the rater is now finished."""
        rater = cell(rater_id)
        scheduler_lock = self._scheduler.lock if self._scheduler else contextlib.nullcontext()
        with self._lock, scheduler_lock, open(self.path, "a", newline="", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # other processes append to the same file
            try:
                self._sync()
                if (rater, trial_id) in self._done:
                    raise ValueError("You have already rated this page; continue with the next one.")
                writer = csv.DictWriter(handle, fieldnames=COLUMNS)
                if handle.tell() == 0:
                    writer.writeheader()
                writer.writerows(rows)
                handle.flush()
                os.fsync(handle.fileno())
                self._done.add((rater, trial_id))
                return all((rater, other) in self._done for other in trial_ids)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def progress(self, rater_id: str) -> Progress:
        """Which of the rater's trials are rated, and what comes next (for resuming after a reload)."""
        rater_id = clean_rater_id(rater_id)
        trials = trials_for(self.manifest, rater_id, now=self.clock())
        with self._lock:
            self._sync()
            done = frozenset(t.trial_id for t in trials if (cell(rater_id), t.trial_id) in self._done)
        return Progress(done=done, total=len(trials), remaining=tuple(t for t in trials if t.trial_id not in done))

    def read(self) -> list[dict]:
        """Every row as a dict of strings."""
        if not self.path.exists():
            return []
        with open(self.path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    def _sync(self) -> None:
        """Read rows appended since the last call (by any process) into the set of rated (rater, trial)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        data = data[:data.rfind(b"\n") + 1]  # whole lines only: cells never hold a newline
        lines = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
        if self._offset == 0 and lines:
            header = tuple(lines.pop(0))
            if header != COLUMNS:
                raise ValueError(f"{self.path} was written with other columns; give this study a new ratings file.")
        rater, trial = COLUMNS.index("rater_id"), COLUMNS.index("trial_id")
        self._done.update((line[rater], line[trial]) for line in lines if len(line) == len(COLUMNS))
        self._offset += len(data)

    def _rows(self, trial: Trial, rater_id: str, answers: dict[str, float], counts: dict[str, Mapping | None],
              times: tuple[float, float, float], session_id: str, comment: str) -> list[dict]:
        presented_at, now, listening = times
        raw = list(answers.values()) if trial.test_type == "mushra" else [answers["B" if "B" in answers else "A"]]
        passed = attention_passed(trial, raw) if trial.is_attention_check else ""
        common = {"study_id": self.manifest.study_id, "rater_id": rater_id, "session_id": session_id,
                  "trial_id": trial.trial_id, "trial_index": trial.index, "test_type": trial.test_type,
                  "check": trial.check, "item": trial.item, "prompt": trial.prompt,
                  "time_on_page_s": round(now - presented_at, 3), "listening_s": round(listening, 3),
                  "presented_at": _iso(presented_at), "submitted_at": _iso(now),
                  "attention_target": "" if trial.attention_target is None else trial.attention_target,
                  "attention_passed": passed, "comment": comment, "app_version": self.app_version}
        rows = []
        for stimulus in trial.rated:
            score = answers[stimulus.label]
            answer = score if trial.test_type == "mushra" else raw[0]
            rows.append({**common, "condition": stimulus.condition, "stimulus_id": stimulus.file,
                         "label": stimulus.label, "score": score,
                         "play_count": _count(counts["plays"] or {}, stimulus.label),
                         "stream_count": _count(counts["streamed"] or {}, stimulus.label),
                         "attention_answer": answer if trial.is_attention_check else ""})
        return [{column: cell(row[column]) for column in COLUMNS} for row in rows]


def _answers(trial: Trial, scores, require_max_rating: bool) -> dict[str, float]:
    """label -> score of every rated clip, or ValueError saying what is wrong in the rater's words."""
    scale = trial.scale
    span = f"{scale.minimum} to {scale.maximum}"
    if trial.test_type == "mushra":
        if not isinstance(scores, Mapping):
            raise ValueError("Rate every clip on its slider.")
        labels = [s.label for s in trial.rated]
        if set(scores) - set(labels):
            raise ValueError("Some ratings are for clips that are not on this page: reload the page.")
        unmoved = [label for label in labels if scores.get(label) is None]
        if unmoved:
            raise ValueError(f"Move every slider before going on; not moved yet: {', '.join(unmoved)}.")
        bad = [label for label in labels if not scale.contains(scores[label])]
        if bad:
            raise ValueError(f"Ratings must be numbers from {span}; check clip {', '.join(bad)}"
                             f"{_got(scores[bad[0]])}.")
        answers = {label: _number(scores[label]) for label in labels}
        if require_max_rating and not trial.is_attention_check and max(answers.values()) < scale.maximum:
            raise ValueError(f"Rate at least one clip {scale.maximum}: one of them is the reference itself.")
        return answers
    if isinstance(scores, Mapping) or not scale.contains(scores):
        kind = "a whole number" if scale.integer else "a number"
        raise ValueError(f"Choose one rating: {kind} from {span}{_got(scores)}.")
    score = _number(scores)
    return {"A": score} if trial.test_type == "acr" else {"A": -score, "B": score}


def _got(value) -> str:
    """What was wrong with a rating that is not a number, for the message."""
    if isinstance(value, str):
        return f" (got the text {value[:20]!r}, not a number)"
    if _is_number(value) or isinstance(value, Mapping):
        return ""
    return f" (got {type(value).__name__}, not a number)"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(float(value), 3)


def _count(plays: Mapping[str, int], label: str) -> int:
    value = plays.get(label, 0) if isinstance(plays, Mapping) else 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
