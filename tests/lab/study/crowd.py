"""A servable study on disk without a model (real WAV files, a verified manifest), a clock the test moves,
and a rater who does what a browser would: register, listen (streams counted), rate, finish."""
import dataclasses
import json
import time

import numpy as np

from lab.study import blinding, raters
from lab.study.assignment import slot_rules, trials_for
from lab.study.manifest import MANIFEST_FILE, Manifest, load_manifest
from tests.lab.study.fakes import fake_manifest

SAMPLE_RATE = 8000


class Clock:
    """Seconds since the epoch, moved by the test (`advance`), never by waiting."""

    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def served_study(root, **overrides) -> Manifest:
    """A study Studies can serve: every stimulus a real 1 s WAV, listed with its sha256 in manifest.json."""
    manifest = fake_manifest(root, **overrides)
    rng = np.random.default_rng(0)
    items = []
    for item in manifest.items:
        stimuli = []
        for stimulus in item.stimuli:
            data = blinding.wav_bytes(rng.uniform(-0.1, 0.1, (1, SAMPLE_RATE)), SAMPLE_RATE, b"")
            path = manifest.path(stimulus)
            blinding.write_file(path, data, manifest.created)
            stimuli.append(dataclasses.replace(stimulus, sha256=blinding.sha256_file(path)))
        items.append(dataclasses.replace(item, stimuli=tuple(stimuli)))
    on_disk = dataclasses.replace(manifest, items=tuple(items))
    (manifest.study_dir / MANIFEST_FILE).write_text(json.dumps(on_disk.to_dict()), encoding="utf-8")
    return load_manifest(manifest.study_dir)


def answer(trial):
    """Scores a careful rater gives: the instructed answer on attention checks, the reference on top (MUSHRA
    needs one clip at 100), the anchor clearly below it."""
    if trial.test_type == "mushra":
        target = trial.attention_target
        return {s.label: target if target is not None else {"hidden-reference": 100, "anchor": 20}.get(s.condition, 70)
                for s in trial.rated}
    if trial.is_attention_check:
        return trial.attention_target
    conditions = {s.condition for s in trial.stimuli}
    if trial.test_type == "ab":
        anchor_on_b = trial.stimuli[1].condition == "anchor"
        return (-2 if anchor_on_b else 2) if "anchor" in conditions else 1
    return 1 if "anchor" in conditions else 4


def rate(store, trial, rater_id, clock, **kwargs):
    """Submit one page the way the rater page does: every clip streamed, the page shown long enough ago."""
    kwargs.setdefault("presented_at", clock() - store.listening_seconds(trial) - 1)
    kwargs.setdefault("streamed", {s.label: 1 for s in trial.stimuli})
    return store.submit(trial, rater_id, kwargs.pop("scores", answer(trial)),
                        kwargs.pop("plays", {s.label: 1 for s in trial.stimuli}), **kwargs)


def rate_all(store, rater_id, clock, pages: int | None = None) -> int:
    """Rate the rater's pages in order (the first `pages` of them); the number rated."""
    trials = trials_for(store.manifest, rater_id, now=clock())
    for trial in trials[:pages]:
        rate(store, trial, rater_id, clock)
    return len(trials[:pages])


def enroll(manifest, rater_id: str, now: float | None = None):
    """Register `rater_id` as a platform id (what Studies.register does after its client checks)."""
    return raters.register(manifest.study_dir, manifest.secret(), {"rater": rater_id},
                           slot_rules(manifest.definition), time.time() if now is None else now)


def listing(manifest, rater_id: str):
    """The rater's trials, registering the rater first when new (as the web layer does before a first page)."""
    if rater_id not in raters.read_records(manifest.study_dir):
        enroll(manifest, rater_id)
    return trials_for(manifest, rater_id)
