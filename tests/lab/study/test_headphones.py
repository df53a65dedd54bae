"""lab.study.headphones: Huggins-pitch stimuli that only headphones reveal, answers kept on the server, the result
recorded once with the rater and used by the analysis."""
import dataclasses
import io

import numpy as np
import pytest
from scipy.io import wavfile

from lab.study import headphones
from lab.study.analysis import screened
from lab.study.headphones import PASS_MARK, TRIALS, headphone_check, score_headphone_check
from lab.study.raters import RaterRefused, rater_record
from lab.study.store import RatingsStore
from tests.lab.study.crowd import Clock, enroll, rate_all, served_study


@pytest.fixture
def manifest(tmp_path):
    return served_study(tmp_path)


def channels(wav: bytes) -> np.ndarray:
    rate, data = wavfile.read(io.BytesIO(wav))
    assert rate == headphones.SAMPLE_RATE and data.shape == (int(rate * headphones.SECONDS), 2)
    return data.astype(np.float64).T


def tone_interval(trial) -> int:
    """The one interval whose channels differ (found from the audio, as a listener's brain does)."""
    differing = [k for k, wav in enumerate(trial.intervals) if np.abs(np.subtract(*channels(wav))).max() > 2]
    assert len(differing) == 1
    return differing[0]


def test_only_a_narrow_band_differs_between_the_ears(manifest):
    enroll(manifest, "hana")
    check = headphone_check(manifest, "hana")
    assert len(check.trials) == TRIALS and all(len(t.intervals) == 3 and "1, 2 or 3" in t.question for t in check.trials)
    assert {f.name for f in dataclasses.fields(check.trials[0])} == {"index", "intervals", "question"}  # no answer
    for trial in check.trials:
        left, right = channels(trial.intervals[tone_interval(trial)])
        spectrum = np.abs(np.fft.rfft(left - right))
        frequencies = np.fft.rfftfreq(left.size, 1 / headphones.SAMPLE_RATE)
        in_band = np.zeros_like(frequencies, dtype=bool)
        for pitch in headphones.PITCHES_HZ:
            in_band |= np.abs(frequencies - pitch) <= 0.08 * pitch
        assert (spectrum[in_band] ** 2).sum() > 0.95 * (spectrum ** 2).sum()  # the difference is the narrow band
        assert np.abs(np.fft.rfft(left + right)).mean() > 0  # and the mixed channels still sound like noise
    assert headphone_check(manifest, "hana") == check  # the same after a reload
    enroll(manifest, "ivan")
    assert headphone_check(manifest, "ivan").trials[0].intervals != check.trials[0].intervals


@pytest.mark.parametrize("wrong, passed", [(0, True), (TRIALS - PASS_MARK, True), (TRIALS - PASS_MARK + 1, False)])
def test_scoring_records_the_result_once(manifest, wrong, passed):
    enroll(manifest, "jo")
    right = [tone_interval(trial) + 1 for trial in headphone_check(manifest, "jo").trials]
    answers = [str(a) if k % 2 else a for k, a in enumerate(right)]  # a form sends text, an API numbers
    for k in range(wrong):
        answers[k] = right[k] % 3 + 1
    result = score_headphone_check(manifest, "jo", answers)
    assert (result.passed, result.correct, result.total) == (passed, TRIALS - wrong, TRIALS)
    assert rater_record(manifest.study_dir, "jo")["headphone_check"] == dataclasses.asdict(result)
    with pytest.raises(ValueError, match="already taken"):
        score_headphone_check(manifest, "jo", right)


@pytest.mark.parametrize("answers, message", [
    ([1, 2, 3], "all 6 questions"), ("123123", "all 6 questions"), ([1, 2, 3, 1, 2, 4], "1, 2 or 3"),
    ([1, 2, 3, 1, 2, True], "1, 2 or 3"), ([1, 2, 3, 1, 2, None], "1, 2 or 3"),
])
def test_bad_answers_are_refused_and_nothing_recorded(manifest, answers, message):
    enroll(manifest, "kim")
    with pytest.raises(ValueError, match=message):
        score_headphone_check(manifest, "kim", answers)
    assert rater_record(manifest.study_dir, "kim")["headphone_check"] is None
    with pytest.raises(RaterRefused):
        score_headphone_check(manifest, "unregistered", [1] * TRIALS)


def test_failed_check_excludes_the_rater_with_the_reason(manifest):
    clock = Clock()
    store = RatingsStore(manifest, clock=clock)
    for rater, passes in (("good", True), ("speakers", False)):
        enroll(manifest, rater, now=clock())
        right = [tone_interval(trial) + 1 for trial in headphone_check(manifest, rater).trials]
        score_headphone_check(manifest, rater, right if passes else [a % 3 + 1 for a in right])
        rate_all(store, rater, clock)
    _, _, exclusions, kept = screened(store.path)
    assert [(e.rater_id, e.reasons) for e in exclusions] == [("speakers", ("failed the headphone check (0 of 6 right)",))]
    assert {row["rater_id"] for row in kept} == {"good"}
