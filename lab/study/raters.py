"""Raters numbered in order of arrival: the Latin-square rotation gives rater k the k-th block of the design,
so the numbers must be dense, unique and permanent, even when many browser tabs (threads) and app
workers (processes) register at once. `raters.json` holds the ids in arrival order; it is changed under a
thread lock plus an advisory file lock and replaced atomically, so readers never see half a file.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
import threading
from pathlib import Path

from lab.study.manifest import RATERS_FILE

MAX_RATER_ID_CHARS = 64
LOCK_FILE = ".raters.lock"
_lock = threading.Lock()


def clean_rater_id(rater_id: object) -> str:
    """A rater id as stored: trimmed, one line, bounded; ValueError with a message the rater can act on."""
    text = " ".join(str(rater_id or "").split())
    if not text:
        raise ValueError("Enter your participant id to start.")
    if len(text) > MAX_RATER_ID_CHARS:
        raise ValueError(f"Your participant id is {len(text)} characters long; at most {MAX_RATER_ID_CHARS}.")
    return text


def rater_number(study_dir: str | Path, rater_id: str) -> int:
    """The arrival number (0, 1, ...) of `rater_id` in this study, registering the rater on first sight."""
    study_dir = Path(study_dir)
    rater_id = clean_rater_id(rater_id)
    known = read_raters(study_dir)
    if rater_id in known:  # fast path: the file is only ever replaced whole
        return known.index(rater_id)
    with _lock, open(study_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            raters = read_raters(study_dir)
            if rater_id not in raters:
                raters.append(rater_id)
                _write(study_dir / RATERS_FILE, raters)
            return raters.index(rater_id)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_raters(study_dir: str | Path) -> list[str]:
    """Registered rater ids in arrival order (empty before the first rater)."""
    path = Path(study_dir) / RATERS_FILE
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["raters"])
    except FileNotFoundError:
        return []


def _write(path: Path, raters: list[str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"raters": raters}, handle, ensure_ascii=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
