"""The crowd fields of a study definition: defaults per test type, JSON round trip, errors that name the fix."""
import pytest

from lab.study.definition import StudyDefinition

BASE = dict(study_id="crowd", title="Crowd", prompts=["rain"], seeds=[1, 2], conditions=["w4a16"])


def make(**overrides) -> StudyDefinition:
    return StudyDefinition(**{"test_type": "mushra", **BASE, **overrides})


def test_defaults_and_round_trip():
    mushra, acr = make(), make(test_type="acr")
    assert mushra.require_max_rating is True and acr.require_max_rating is False  # BS.1534 asks for one 100
    assert (mushra.headphone_check, mushra.questionnaire, mushra.gold_pages, mushra.abandon_minutes) == (True, True, 0, 60)
    assert mushra.completion_url is None and mushra.max_raters is None
    full = make(completion_url="https://app.prolific.com/submissions/complete?cc={code}", max_raters=40,
                abandon_minutes=45, headphone_check=False, questionnaire=False, gold_pages=2)
    assert StudyDefinition.from_json(full.to_json()) == full


@pytest.mark.parametrize("overrides, message", [
    (dict(completion_url="prolific.com/done"), "completion_url must be an http"),
    (dict(completion_url="https://x.org/a b"), "completion_url must be an http"),
    (dict(max_raters=0), "max_raters must be a whole number >= 1"),
    (dict(max_raters=2.5), "max_raters must be a whole number >= 1"),
    (dict(abandon_minutes=0.5), "abandon_minutes must be a number from 1"),
    (dict(abandon_minutes="60"), "abandon_minutes must be a number from 1"),
    (dict(headphone_check="yes"), "headphone_check must be true or false"),
    (dict(test_type="acr", require_max_rating=True), "require_max_rating applies to MUSHRA only"),
    (dict(gold_pages=-1), "gold_pages must be a whole number from 0 to 10"),
    (dict(gold_pages=1, anchor=None), "gold_pages needs an anchor"),
    (dict(gold_pages=3), "only 2 items"),
])
def test_invalid_crowd_fields_say_what_is_wrong(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)
