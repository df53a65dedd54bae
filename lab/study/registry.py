"""The studies one app serves: every built study under one root folder, looked up by the id in a rater's link.

A study id comes from a URL, so it is checked against the id pattern before it touches the file system, and
an unknown id gets the same message whether the folder is missing, unfinished or not a study: a rater learns
nothing about which studies exist. Manifests are verified once when first served and kept with their stores.
"""
from __future__ import annotations

import threading
from pathlib import Path

from lab.study.blinding import opaque_id
from lab.study.build import build_study
from lab.study.definition import STUDY_ID, StudyDefinition
from lab.study.manifest import MANIFEST_FILE, Manifest, StudyError, load_manifest, study_path
from lab.study.store import RatingsStore

UNKNOWN_STUDY = "This study link is not valid. Check the link you were given, or ask the experimenter."


class Studies:
    def __init__(self, root: str | Path, *, dataset_repo: str | None = None, push_minutes: int = 5):
        self.root = Path(root)
        self.dataset_repo = dataset_repo
        self.push_minutes = push_minutes
        self._served: dict[str, tuple[Manifest, RatingsStore]] = {}
        self._lock = threading.Lock()

    def ids(self) -> list[str]:
        """The built studies (those with a manifest), by id."""
        if not self.root.is_dir():
            return []
        return sorted(path.parent.name for path in self.root.glob(f"*/{MANIFEST_FILE}")
                      if STUDY_ID.fullmatch(path.parent.name))

    def get(self, study_id: str) -> tuple[Manifest, RatingsStore]:
        """The verified manifest and ratings store of a built study; StudyError (a ValueError) otherwise."""
        study_id = str(study_id or "").strip()
        if not STUDY_ID.fullmatch(study_id):
            raise StudyError(UNKNOWN_STUDY)
        with self._lock:
            if study_id not in self._served:
                try:
                    manifest = load_manifest(study_path(self.root, study_id))
                except StudyError as err:
                    raise StudyError(UNKNOWN_STUDY) from err
                self._served[study_id] = (manifest, RatingsStore(manifest, dataset_repo=self.dataset_repo,
                                                                 push_minutes=self.push_minutes))
            return self._served[study_id]

    def build(self, definition: StudyDefinition, loaded, models, *, progress: bool = True) -> Manifest:
        """Build (or resume) a study under this root; it is served from then on."""
        manifest = build_study(definition, loaded, models, self.root, progress=progress)
        with self._lock:
            self._served.pop(definition.study_id, None)
        return manifest

    @staticmethod
    def completion_code(manifest: Manifest, rater_id: str) -> str:
        """A code a rater quotes to prove completion (e.g. to a recruiting platform); derived, not stored."""
        return opaque_id(manifest.secret(), "completion", rater_id, length=10).upper()
