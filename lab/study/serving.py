"""The audio raters receive: per-rater URL tokens, per-rater copies from verified bytes, a served log, and the
count of complete transfers the ratings store asks for before it accepts a page.

- A URL token is HMAC(secret, rater, page, label) (`blinding.audio_token`) and is looked up for the rater who
  asks: another rater's token answers exactly like a random one, so URLs cannot be compared or shared.
- Every stimulus is read once, checked against the manifest's sha256 and kept in memory: a file changed or
  truncated on disk while the app runs is never served; a mismatch stops the whole study (the caller answers
  503) with a log line naming the file, because some raters would otherwise hear other audio than the rest.
- A rater receives `blinding.presented_copy` of a stimulus: same size as every other file of the study, its own
  dither, so no two files of a page are byte-identical. `served.jsonl` in the study folder records what was
  sent (rater, page, label, condition, sha256 of the bytes, whether every byte was written to the connection).
- A clip counts as streamed for a rater's page only when its last byte has been written to the connection
  (the response generator has yielded it and the server sent it on): a page that asks the server to count
  plays streams nothing. That is all a server can know: a client that drops the bytes it received, or aborts
  after the last chunk left the server, still counts.
- The table of issued URL tokens is bounded (MAX_ISSUED, the least recently issued forgotten first): a
  forgotten token answers "not found" and the page's reload issues it again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lab.study.blinding import audio_token, presented_copy
from lab.study.manifest import Manifest

log = logging.getLogger(__name__)
SERVED_LOG = "served.jsonl"
CHUNK_BYTES = 64 * 1024
MAX_ISSUED = 200_000  # URL tokens remembered (about 100 MB at most); far more than the clips raters hold open
UNAVAILABLE = ("This study is paused: one of its audio files failed a check. The experimenter has been told; "
               "please try again later.")


class StudyUnavailable(RuntimeError):
    """A study's stimuli failed verification: nothing of it is served (the message is for the rater)."""


@dataclass(frozen=True)
class Clip:
    """One clip as one rater receives it on one page. `condition` and `file` never leave the server."""
    study_id: str
    rater_id: str
    page: str  # a trial id, "familiarisation" or "headphones-<n>"
    label: str
    condition: str
    file: str | None = None  # a stimulus under stimuli/ (served as a per-rater copy)
    generate: Callable[[], bytes] | None = None  # generated audio (a headphone-check interval), made on request


class AudioServer:
    """What every rater of the app's studies was given, and what was written to their connections. Thread-safe."""

    def __init__(self, max_issued: int = MAX_ISSUED):
        self.max_issued = max_issued
        self._verified: dict[tuple[str, str, str], bytes] = {}  # (study, file, sha256) -> checked bytes
        self._damaged: dict[str, Manifest] = {}  # study -> the manifest a file failed (a rebuild brings a new one)
        self._issued: OrderedDict[tuple[str, str], Clip] = OrderedDict()  # (study, token) -> clip, oldest first
        self._streamed: dict[tuple[str, str, str], Counter] = {}  # (study, rater, page) -> label -> transfers
        self._lock = threading.Lock()

    def issue(self, manifest: Manifest, clip: Clip) -> str:
        """The URL token of `clip` (the same on every call), remembered for its rater."""
        token = audio_token(manifest.secret(), clip.rater_id, clip.page, clip.label)
        with self._lock:
            self._issued[(clip.study_id, token)] = clip
            self._issued.move_to_end((clip.study_id, token))
            while len(self._issued) > self.max_issued:
                self._issued.popitem(last=False)
        return token

    def clip(self, study_id: str, rater_id: str, token: str) -> Clip | None:
        """The clip behind `token` if it was issued to `rater_id`; None otherwise (unknown or someone else's)."""
        with self._lock:
            clip = self._issued.get((study_id, token))
        return clip if clip is not None and clip.rater_id == rater_id else None

    def check_available(self, manifest: Manifest) -> None:
        """Raise StudyUnavailable once any stimulus of this build of the study has failed verification."""
        if self._damaged.get(manifest.study_id) is manifest:
            raise StudyUnavailable(UNAVAILABLE)

    def body(self, manifest: Manifest, clip: Clip) -> bytes:
        """The exact bytes `clip`'s rater receives."""
        if clip.generate is not None:
            return clip.generate()
        return presented_copy(self.verified(manifest, clip.file), manifest.secret(), clip.rater_id, clip.page,
                              clip.label)

    def verified(self, manifest: Manifest, file: str) -> bytes:
        """A stimulus' bytes, read and checked against the manifest once, then served from memory."""
        self.check_available(manifest)
        expected = next((s.sha256 for item in manifest.items for s in item.stimuli if s.file == file), None)
        key = (manifest.study_id, file, expected)
        with self._lock:
            if key in self._verified:
                return self._verified[key]
        try:
            data = manifest.path(file).read_bytes()
        except OSError:
            data = b""
        if expected is None or hashlib.sha256(data).hexdigest() != expected:
            log.error("study %s: stimulus %s is missing or differs from its manifest sha256; the study is no "
                      "longer served (rebuild it with the same command to restore the file)", manifest.study_id,
                      manifest.path(file))
            with self._lock:
                self._damaged[manifest.study_id] = manifest
            raise StudyUnavailable(UNAVAILABLE)
        with self._lock:
            return self._verified.setdefault(key, data)

    def stream(self, manifest: Manifest, clip: Clip, body: bytes) -> Iterator[bytes]:
        """Yield `body` in chunks; count the transfer for the rater's page only once the last chunk has been
        written to the connection (the server asks for the next one after sending it), and log either way."""
        complete = False
        try:
            for start in range(0, len(body), CHUNK_BYTES):
                yield body[start:start + CHUNK_BYTES]
            complete = True
            with self._lock:
                self._streamed.setdefault((clip.study_id, clip.rater_id, clip.page), Counter())[clip.label] += 1
        finally:
            self._log(manifest, clip, body, complete)

    def streamed(self, study_id: str, rater_id: str, page: str) -> dict[str, int]:
        """label -> transfers of that clip to `rater_id` for `page` written to the connection in full."""
        with self._lock:
            return dict(self._streamed.get((study_id, rater_id, page), {}))

    def _log(self, manifest: Manifest, clip: Clip, body: bytes, complete: bool) -> None:
        record = {"time": round(time.time(), 3), "rater": clip.rater_id, "page": clip.page, "label": clip.label,
                  "condition": clip.condition, "file": clip.file, "sha256": hashlib.sha256(body).hexdigest(),
                  "bytes": len(body), "complete": complete}
        with self._lock, open(manifest.study_dir / SERVED_LOG, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
