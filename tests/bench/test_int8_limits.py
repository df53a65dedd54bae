"""The int8 limit a processor kind implies: the float forward's linear and attention shares, the bounds they give
at the kind's int8 peak, and how close each recipe comes."""
import pytest

from bench import report, shape, targets
from bench.config import QUICK_DIT as QUICK_SHAPE
from bench.random_models import random_dit


def test_time_shares_split_linears_from_the_attention_around_them_and_remove_their_hooks():
    dit = random_dit(QUICK_SHAPE)
    x, t, kwargs = shape.forward_inputs(QUICK_SHAPE, 16, 4)
    assert len(shape.attention_modules(dit)) == 2 * QUICK_SHAPE["depth"]  # self- and cross-attention per block
    shares = shape.time_shares(dit, lambda: dit(x, t, **kwargs), reps=2)
    assert 0 < shares["linear"] < 1 and 0 < shares["attention"] < 1
    assert shares["linear"] + shares["attention"] < 1
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in dit.modules())


def rows_with(linear_share, attention_share, profile_base="bf16"):
    return {"fp32": {"speed": {"float_s": 4.0, "linear_share": 0.9, "attention_share": 0.05}},
            profile_base: {"speed": {"float_s": 2.0, "linear_share": linear_share,
                                     "attention_share": attention_share}},
            "w8a8-static": {"speed": {"integer_s": 1.25}},
            "w8a16": {"speed": {"integer_s": 2.5}}}


def test_int8_limits_follow_the_shares_and_the_kinds_peak():
    # bf16 kinds: int8 peaks at 2x bf16; linears 60 % and attention 20 % of the bf16 forward
    limits = targets.int8_limits(rows_with(0.6, 0.2), "vnni-bf16")
    assert limits["base"] == "bf16" and limits["peak"] == 2.0
    assert limits["linears_at_peak"] == pytest.approx(1 / (0.4 + 0.3))
    assert limits["linears_free"] == pytest.approx(2.5)
    assert limits["linears_attention_at_peak"] == pytest.approx(1 / (0.2 + 0.4))
    assert limits["linears_attention_free"] == pytest.approx(5.0)
    static = limits["recipes"]["w8a8-static"]
    assert static["x_base"] == pytest.approx(1.6) and static["of_limit"] == pytest.approx(1.6 * 0.7)
    assert limits["recipes"]["w8a16"]["x_base"] == pytest.approx(0.8)
    # VNNI without native bf16: the fp32 forward and 4x fp32
    vnni = targets.int8_limits(rows_with(0.6, 0.2), "vnni")
    assert vnni["base"] == "fp32" and vnni["linears_at_peak"] == pytest.approx(1 / (0.1 + 0.9 / 4))
    assert vnni["eight_bit_weight_passes"] == 1
    # AVX2: 2x fp32, which 8-bit weights reach at half (two exact passes)
    avx2 = targets.int8_limits(rows_with(0.6, 0.2, "fp32"), "avx2")
    assert (avx2["base"], avx2["peak"], avx2["eight_bit_weight_passes"]) == ("fp32", 2.0, 2)
    assert targets.int8_limits(rows_with(0.6, 0.2), "generic") is None  # no int8 dot product: no limit to state
    assert targets.int8_limits({"bf16": {"speed": {"float_s": 1.0}}}, "amx") is None  # no shares measured


def test_the_report_prints_the_limit_of_the_runs_processor_kind():
    machine = {"cpu_profile": "vnni-bf16, detected: VNNI yes, native bf16 yes, AMX no"}
    assert targets.profile_name(machine) == "vnni-bf16"
    text = "\n".join(report._int8_limit_lines(rows_with(0.6, 0.2), machine))
    assert "vnni-bf16" in text and "60.0%" in text and "20.0%" in text and "1.43x" in text
    assert "passes" not in text
    avx2 = "\n".join(report._int8_limit_lines(rows_with(0.6, 0.2, "fp32"), {"cpu_profile": "avx2, detected"}))
    assert "2 passes" in avx2 and "W8A8 linears peak at 1x fp32" in avx2
    assert "| w8a8-static | 1.60 | 112% |" in text
    assert report._int8_limit_lines(rows_with(0.6, 0.2), {"cpu_profile": "generic, detected: VNNI no"}) == []
