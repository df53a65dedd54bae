"""Whether a built study is whole, told to the experimenter in full.

A rater's link to a damaged study only says "not valid" (lab.study.registry keeps which studies exist and what is
wrong with them from raters); the experimenter's views (the console's Studies and Results, `python -m lab.study
show`) need the files that are missing or changed, and what to do about them.

The console checks every study each time it shows them, so hashing is skipped for a study whose stimulus files
all have the size and modification time they had when they last verified: a file rewritten in place changes its
modification time (the build stamps every file with the study's creation time).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from lab.study.manifest import Manifest, StudyError, load_manifest, study_path, verify_files

_VERIFIED: set[tuple[str, str]] = set()  # (study folder, files_state) of studies whose every file verified


@dataclass(frozen=True)
class StudyHealth:
    study_id: str
    manifest: Manifest | None  # None when the study cannot be read at all
    problem: str  # '' when every stimulus file has its recorded sha256; else the files and what to do

    @property
    def ok(self) -> bool:
        return not self.problem


def check_study(root: str | Path, study_id: str) -> StudyHealth:
    """Verify every stimulus file of `root/<study_id>` against its manifest (now, not when it was first served)."""
    try:
        manifest = load_manifest(study_path(root, study_id), verify=False)
    except StudyError as err:
        return StudyHealth(study_id, None, str(err))
    state = (str(manifest.study_dir), files_state(manifest))
    if state not in _VERIFIED:
        try:
            verify_files(manifest)
            manifest.secret()  # raters cannot be served without it
        except ValueError as err:
            return StudyHealth(study_id, manifest, str(err))
        _VERIFIED.add(state)
    return StudyHealth(study_id, manifest, "")


def files_state(manifest: Manifest) -> str:
    """Id of the size and modification time of every stimulus file of `manifest` (missing ones included)."""
    digest = hashlib.sha256()
    for item in manifest.items:
        for stimulus in item.stimuli:
            path = manifest.path(stimulus)
            stat = path.stat() if path.is_file() else None
            digest.update(f"{stimulus.file}:{stat and stat.st_size}:{stat and stat.st_mtime_ns};".encode())
    return digest.hexdigest()
