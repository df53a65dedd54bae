"""The studies one app serves: every built study under one root folder, looked up by the id in a rater's link.

A study id comes from a URL, so it is checked against the id pattern before it touches the file system, and
an unknown id gets the same message whether the folder is missing, unfinished or not a study: a rater learns
nothing about which studies exist. Manifests are verified once when first served and kept with their stores.

Registration is where a crowd study is defended: a signed token per rater (lab.study.raters), the study's
cap on raters, at most `unfinished_per_client` live unfinished places per client address and study (kept in
raters.json, so every process sees them), and a sliding window of registrations per client address (in
memory, per app process, bounded), so a script cannot fill a study with made-up raters.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from lab.study import raters
from lab.study.assignment import slot_rules
from lab.study.blinding import opaque_id
from lab.study.build import build_study
from lab.study.definition import STUDY_ID, StudyDefinition
from lab.study.manifest import MANIFEST_FILE, Manifest, StudyError, load_manifest, study_path
from lab.study.raters import RaterRefused, Registration
from lab.study.store import RatingsStore

log = logging.getLogger(__name__)
MAX_TRACKED_CLIENTS = 10_000  # addresses in the registration window kept in memory; the oldest go first
TOO_MANY = "Too many registrations from your network in a short time: wait a few minutes and try again."


@dataclass(frozen=True)
class Completion:
    code: str  # what the rater quotes to the platform
    redirect_url: str | None  # the platform's completion link with the code, if the study has one

UNKNOWN_STUDY = "This study link is not valid. Check the link you were given, or ask the experimenter."


class Studies:
    def __init__(self, root: str | Path, *, dataset_repo: str | None = None, push_minutes: int = 5,
                 registrations_per_client: int = 10, registration_window_s: float = 600.0,
                 unfinished_per_client: int | None = 2, clock: Callable[[], float] = time.time):
        self.root = Path(root)
        self.dataset_repo = dataset_repo
        self.push_minutes = push_minutes
        self.registrations_per_client = registrations_per_client
        self.registration_window_s = registration_window_s
        self.unfinished_per_client = unfinished_per_client
        self.clock = clock  # seconds; tests pass a fake one to simulate hours of a study
        self._served: dict[str, tuple[Manifest, RatingsStore]] = {}
        self._lock = threading.Lock()
        self._recent: dict[str, deque[float]] = {}  # client -> registration times in the window, oldest first

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
                                                                 push_minutes=self.push_minutes, clock=self.clock))
            return self._served[study_id]

    def build(self, definition: StudyDefinition, loaded, models, *, progress: bool = True) -> Manifest:
        """Build (or resume) a study under this root; it is served from then on (the build logs the other
        studies of this root that share items with it: lab.study.build.shared_items)."""
        manifest = build_study(definition, loaded, models, self.root, progress=progress)
        with self._lock:
            self._served.pop(definition.study_id, None)
        return manifest

    def register(self, study_id: str, *, platform: Mapping[str, str], client: str) -> Registration:
        """A new rater of a study. `platform`: the link's parameters among raters.PLATFORM_KEYS (empty: an
        anonymous rater); `client`: the address the request came from. RaterRefused (message for the rater)
        when the platform id already started, the study is full or `client` registered too often lately."""
        manifest, _ = self.get(study_id)
        now = self.clock()
        with self._lock:
            recent = self._recent_registrations(str(client), now)
            if len(recent) >= self.registrations_per_client:
                raise RaterRefused(TOO_MANY)
            recent.append(now)
        slots = dataclasses.replace(slot_rules(manifest.definition), unfinished_per_client=self.unfinished_per_client)
        return raters.register(manifest.study_dir, manifest.secret(), platform, slots, now, client=str(client))

    def _recent_registrations(self, client: str, now: float) -> deque[float]:
        """`client`'s registration times inside the window (moved to the end of the table, which forgets the
        clients with none left and, past MAX_TRACKED_CLIENTS, the longest quiet). Call under the lock."""
        recent = self._recent.pop(client, deque())
        while recent and recent[0] <= now - self.registration_window_s:
            recent.popleft()
        for other in [key for key, times in self._recent.items() if not times or times[-1] <= now - self.registration_window_s]:
            del self._recent[other]
        while len(self._recent) >= MAX_TRACKED_CLIENTS:
            del self._recent[next(iter(self._recent))]
        self._recent[client] = recent
        return recent

    def release(self, study_id: str, rater_id: str) -> dict:
        """Free a rater's id and slot (lab.study.raters.release); the experimenter's command."""
        manifest, _ = self.get(study_id)
        return raters.release(manifest.study_dir, rater_id, self.clock())

    def resume(self, study_id: str, token: str) -> Registration:
        """The registration behind a token; RaterRefused if forged, unknown or expired."""
        manifest, _ = self.get(study_id)
        return raters.resume(manifest.study_dir, manifest.secret(), token, slot_rules(manifest.definition),
                             self.clock())

    def completion(self, study_id: str, rater_id: str) -> Completion:
        """The completion code (and the platform link carrying it) of a rater who rated every page."""
        manifest, store = self.get(study_id)
        if not store.progress(rater_id).complete:
            raise RaterRefused("You have not finished the study yet: rate the remaining pages first.")
        code = self.completion_code(manifest, rater_id)
        return Completion(code, completion_link(manifest.definition.completion_url, code))

    @staticmethod
    def completion_code(manifest: Manifest, rater_id: str) -> str:
        """A code a rater quotes to prove completion (e.g. to a recruiting platform); derived, not stored."""
        return opaque_id(manifest.secret(), "completion", rater_id, length=10).upper()


def completion_link(url: str | None, code: str) -> str | None:
    """`url` with `{code}` replaced by the code, else with `cc=<code>` added to its query."""
    if not url:
        return None
    if "{code}" in url:
        return url.replace("{code}", quote(code))
    return f"{url}{'&' if urlsplit(url).query else '?'}cc={quote(code)}"
