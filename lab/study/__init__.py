"""Listening studies of quantized models: definition -> build (stimuli + manifest) -> balanced assignment
per rater -> ratings store -> analysis.

    definition = StudyDefinition.from_json(Path("study.json").read_text())
    manifest = build_study(definition, loaded, QuantizedModels(loaded, ...), "runs/studies")
    trials = trials_for(manifest, rater_id)              # server side: conditions included
    view = rater_view(trials[0])                         # what the browser may see
    RatingsStore(manifest).submit(trials[0], rater_id, scores, plays, presented_at=shown_at)
    report = analyse(manifest.study_dir / "ratings.csv", manifest.study_dir / "analysis")

Serve only `manifest.stimuli_dir`: the study folder also holds the secret that names the files.
"""
from lab.study.analysis import ConditionResult, Exclusion, ItemResult, Report, analyse
from lab.study.assignment import RaterView, Trial, TrialStimulus, rater_view, trials_for
from lab.study.build import build_study
from lab.study.definition import ANCHORS, SCALES, TEST_TYPES, Scale, StudyDefinition
from lab.study.manifest import Item, Manifest, Stimulus, StudyError, load_manifest
from lab.study.store import COLUMNS, Progress, RatingsStore, Submission

__all__ = [
    "ANCHORS", "COLUMNS", "ConditionResult", "Exclusion", "Item", "ItemResult", "Manifest", "Progress", "RaterView",
    "RatingsStore", "Report", "SCALES", "Scale", "Stimulus", "StudyDefinition", "StudyError", "Submission",
    "TEST_TYPES", "Trial", "TrialStimulus", "analyse", "build_study", "load_manifest", "rater_view", "trials_for",
]
