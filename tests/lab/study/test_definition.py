"""lab.study.definition: valid studies round-trip through JSON, invalid ones fail with a message that names the fix."""
import pytest

import quant
from lab.study.definition import SCALES, StudyDefinition

BASE = dict(study_id="w8-vs-fp", title="W8A8 against full precision", test_type="mushra",
            prompts=["sine tone at a4", "white noise"], seeds=[1, 2], conditions=["w8a8-dynamic", "w4a16"])


def make(**overrides) -> StudyDefinition:
    return StudyDefinition(**{**BASE, **overrides})


def test_defaults_and_json_round_trip():
    definition = make(steps=8, cfg_scale=5.0, seconds=2.0, trials_per_rater=3, attention_checks=1)
    assert definition.anchor == "lowpass-3.5k"  # MUSHRA's default anchor
    assert definition.prompts == ("sine tone at a4", "white noise") and definition.n_items == 4
    assert definition.items[1] == ("sine tone at a4", 2)
    assert definition.stimulus_keys == ("reference", "hidden-reference", "w8a8-dynamic", "w4a16", "anchor")
    again = StudyDefinition.from_json(definition.to_json())
    assert again == definition and again.to_dict()["prompts"] == list(BASE["prompts"])


@pytest.mark.parametrize("test_type, anchor, keys", [
    ("acr", None, ("reference", "w8a8-dynamic", "w4a16")),
    ("acr", "lowpass-7k", ("reference", "w8a8-dynamic", "w4a16", "anchor")),  # an anchor in ACR is fine
    ("ab", "lowpass-3.5k", ("reference", "w8a8-dynamic", "w4a16", "anchor")),  # AB's reference is always there
    ("mushra", None, ("reference", "hidden-reference", "w8a8-dynamic", "w4a16")),
])
def test_anchor_and_stimuli_per_test_type(test_type, anchor, keys):
    definition = make(test_type=test_type, anchor=anchor)
    assert definition.anchor == anchor and definition.stimulus_keys == keys
    assert make(test_type=test_type).anchor == ("lowpass-3.5k" if test_type == "mushra" else None)
    assert definition.scale is SCALES[test_type]


@pytest.mark.parametrize("overrides, message", [
    (dict(conditions=[]), "conditions is empty"),
    (dict(conditions=["w9a9"]), "Unknown condition 'w9a9'.*w8a8-dynamic"),
    (dict(conditions=["full-precision"]), "Full precision is always included"),
    (dict(conditions=["w4a16", "w8a8-dynamic", "w4a16"]), "conditions lists 'w4a16' more than once"),
    (dict(conditions="w4a16"), "conditions must be a list"),
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=["ok", "  "]), "non-empty"),
    (dict(prompts=["x" * 501]), "at most 500"),
    (dict(prompts=["a", "a"]), "prompts lists 'a' more than once"),
    (dict(seeds=[]), "seeds is empty"),
    (dict(seeds=[-1]), "Seeds must be whole numbers"),
    (dict(seeds=[True]), "Seeds must be whole numbers"),
    (dict(seeds=[1.5]), "Seeds must be whole numbers"),
    (dict(seeds=[4, 4]), "seeds lists 4 more than once"),
    (dict(test_type="abx"), "test_type 'abx' is not one of acr, ab, mushra"),
    (dict(study_id="My Study"), "study_id 'My Study' must be"),
    (dict(study_id="../etc"), "study_id"),
    (dict(study_id="-x"), "study_id"),
    (dict(study_id="a" * 41), "study_id"),
    (dict(study_id=""), "study_id"),
    (dict(title=" "), "title"),
    (dict(anchor="lowpass-1k"), "anchor 'lowpass-1k' is not one of"),
    (dict(steps=2.5), "steps must be a whole number"),  # values: checked against the model at build time
    (dict(cfg_scale=float("nan")), "cfg_scale must be a number"),
    (dict(sampler_type=3), "sampler_type must be a sampler's name"),
    (dict(seconds="2"), "seconds must be a number"),
    (dict(trials_per_rater=0), "trials_per_rater must be"),
    (dict(trials_per_rater=5), "trials_per_rater is 5 but the design has only 4 items"),
    (dict(attention_checks=-1), "attention_checks"),
    (dict(instructions=None), "instructions"),
])
def test_invalid_definitions_say_what_is_wrong(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)


def test_unknown_preset_error_lists_every_valid_one():
    with pytest.raises(ValueError) as error:
        make(conditions=["w8a8"])
    assert all(name in str(error.value) for name in quant.PRESETS)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"study_id": "x", "title": "t", "test_type": "acr", "prompts": ["p"], "seeds": [1]}', "missing: conditions"),
    ('{"study_id": "x", "title": "t", "test_type": "acr", "prompts": ["p"], "seeds": [1], "conditions": ["w4a16"],'
     ' "steps_count": 3}', "Unknown study definition fields: steps_count"),
])
def test_bad_json(text, message):
    with pytest.raises(ValueError, match=message):
        StudyDefinition.from_json(text)


def test_scales_accept_only_their_values():
    acr, ab, mushra = SCALES["acr"], SCALES["ab"], SCALES["mushra"]
    assert acr.contains(1) and acr.contains(5.0) and not acr.contains(0) and not acr.contains(3.5)
    assert not acr.contains(True) and not acr.contains("3") and not acr.contains(float("nan"))
    assert ab.contains(-3) and ab.contains(0) and not ab.contains(4)
    assert mushra.contains(0) and mushra.contains(72.5) and mushra.contains(100) and not mushra.contains(100.5)
