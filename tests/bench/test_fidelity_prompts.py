"""The benchmark's prompt sets: held-out fidelity prompts disjoint from calibration, both spanning the caption
grammar; and the held-out gap each row reports."""
import math

import pytest

from bench import config
from bench.fidelity import (
    calibration_like_prompts,
    calibration_prompts,
    fidelity_prompts,
    prepare_fidelity,
    worst_family,
)
from demo_model import corpus
from lab.resources import CALIBRATION_PROMPTS, read_prompts


def captions(prompts):
    return [corpus.parse_caption(p) for p in prompts]


def test_held_out_prompts_share_none_with_calibration_and_cover_every_family():
    every_held_out = fidelity_prompts(per_family=100)
    assert not set(every_held_out) & set(read_prompts(CALIBRATION_PROMPTS))
    held_out = captions(fidelity_prompts(config.BenchConfig().prompts_per_family))
    assert {c.family for c in held_out} == set(corpus.FAMILIES)
    assert {c.level for c in held_out} == {"soft", None, "loud"}
    assert {c.direction for c in held_out if c.family == "sweep"} == set(corpus.DIRECTIONS)
    assert {c.instrument for c in held_out if c.family == "rhythm"} == set(corpus.INSTRUMENTS)


def test_any_count_of_prompts_spans_the_families_in_turn():
    assert [corpus.parse_caption(p).family for p in fidelity_prompts(1)] == list(corpus.FAMILIES)
    assert len(fidelity_prompts(2, limit=3)) == 3


def test_calibration_prompts_are_stratified_by_family_level_and_sound():
    chosen = captions(calibration_prompts(config.BenchConfig().calibration_prompts))
    assert len(chosen) == config.BenchConfig().calibration_prompts
    assert {c.family for c in chosen} == set(corpus.FAMILIES)
    for family in ("tone", "chord", "pluck", "rhythm"):  # the families with prompts at every level in the file
        assert {c.level for c in chosen if c.family == family} == {"soft", None, "loud"}, family
    assert {c.instrument for c in chosen if c.family == "rhythm"} == set(corpus.INSTRUMENTS)
    six = captions(calibration_prompts(6))
    assert [c.family for c in six] == list(corpus.FAMILIES)
    every = calibration_prompts(1000)
    assert len(every) == len(set(every)) and set(every) == set(read_prompts(CALIBRATION_PROMPTS))


def test_calibration_like_prompts_come_from_calibration():
    calibration = calibration_prompts(12)
    like = calibration_like_prompts(calibration, 1)
    assert set(like) <= set(calibration) and {c.family for c in captions(like)} == set(corpus.FAMILIES)


def test_worst_family_counts_a_diverged_family_as_the_worst():
    assert worst_family({"tone": {"snr_db": 20.0}, "noise": {"snr_db": 12.0}}) == ("noise", 12.0)
    name, snr = worst_family({"tone": {"snr_db": 20.0}, "sweep": {"snr_db": math.nan}})
    assert name == "sweep" and math.isnan(snr)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_each_row_reports_its_held_out_gap_and_worst_family():
    cfg = config.BenchConfig.quick_defaults(progress=False)
    context = prepare_fidelity(cfg)
    assert not set(context.prompts) & set(context.calibration)
    assert set(context.calibration_like) <= set(context.calibration)
    fp, _ = context.evaluate("fp32", with_gap=True)
    assert fp["fidelity"]["held_out_gap_db"] == 0.0  # full precision against itself: 120 dB on both sets
    quantized, _ = context.evaluate("w4a8-static", with_gap=True)
    fidelity = quantized["fidelity"]
    like = fidelity["calibration_like"]
    assert fidelity["held_out_gap_db"] == pytest.approx(like["snr_db"] - fidelity["snr_db"])
    assert math.isfinite(like["snr_db"]) and like["snr_db"] < 120.0
    assert fidelity["worst_family_snr_db"] == min(f["snr_db"] for f in fidelity["per_family"].values())
    assert "calibration_like" not in context.evaluate("w8a8-dynamic")[0]["fidelity"]  # the studies skip the gap
