"""Listening studies of quantized models: definition -> build (stimuli + manifest) -> registration and
balanced assignment per rater -> ratings store -> analysis.

    definition = StudyDefinition.from_json(Path("study.json").read_text())
    manifest = build_study(definition, loaded, QuantizedModels(loaded, ...), "runs/studies")
    studies = Studies("runs/studies")
    registration = studies.register(study_id, platform={"PROLIFIC_PID": pid}, client=address)
    rater = studies.resume(study_id, registration.token).rater_id   # every later request carries the token
    check = headphone_check(manifest, rater)                         # then score_headphone_check(...)
    trials = trials_for(manifest, rater)                             # server side: conditions included
    view = rater_view(trials[0])                                     # what the browser may see
    RatingsStore(manifest).submit(trials[0], rater, scores, plays, presented_at=shown_at, streamed=streamed)
    report = analyse(manifest.study_dir / "ratings.csv", manifest.study_dir / "analysis")

Raters get stimuli only through `lab.study.serving` (per-rater copies); the study folder also holds the secret.
"""
from lab.study.analysis import ConditionResult, Exclusion, ItemResult, Results
from lab.study.assignment import RaterView, Trial, TrialStimulus, rater_view, trials_for
from lab.study.build import build_study
from lab.study.definition import ANCHORS, SCALES, TEST_TYPES, Scale, StudyDefinition
from lab.study.headphones import HeadphoneCheck, HeadphoneResult, headphone_check, score_headphone_check
from lab.study.manifest import Item, Manifest, Stimulus, StudyError, load_manifest
from lab.study.raters import QUESTIONNAIRE, RaterRefused, Registration, rater_record, record_questionnaire
from lab.study.registry import Completion, Studies
from lab.study.report import Report, analyse
from lab.study.schema import COLUMNS
from lab.study.store import Progress, RatingsStore, Submission

__all__ = [
    "ANCHORS", "COLUMNS", "Completion", "ConditionResult", "Exclusion", "HeadphoneCheck", "HeadphoneResult", "Item",
    "ItemResult", "Manifest", "Progress", "QUESTIONNAIRE", "RaterRefused", "RaterView", "RatingsStore",
    "Registration", "Report", "Results", "SCALES", "Scale", "Stimulus", "Studies", "StudyDefinition", "StudyError",
    "Submission", "TEST_TYPES", "Trial", "TrialStimulus", "analyse", "build_study", "headphone_check",
    "load_manifest", "rater_record", "rater_view", "record_questionnaire", "score_headphone_check", "trials_for",
]
