"""GPTQ weight rounding: lower output error than round-to-nearest on correlated inputs, the same scales and stored
format, round-to-nearest again when inputs are uncorrelated, and recipes that use it from calibration rows."""
import copy

import pytest
import torch
from torch import nn

import quant
from quant.gptq import gptq_codes, hessian_from_rows
from quant.primitives import (
    PROGRESSIVE_LOWEST,
    dequantize_weight,
    expand_group_scale,
    progressive_quantize_weight,
    progressive_step,
    qmax,
    quantize_weight,
    weight_scale,
)


def correlated_rows(rows=1024, channels=64, seed=0):
    """Inputs whose channels are mixed (what a transformer's activations look like to a linear): the case
    where spreading one column's rounding error onto the others pays."""
    mixing = torch.randn(channels, channels, generator=torch.Generator().manual_seed(100)) / channels ** 0.5
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, channels, generator=g) @ (mixing + torch.eye(channels))


def weight(out_features=48, in_features=64, seed=1):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def gptq_quantize_weight(w, bits, hessian, group_size=None):
    """Codes and scale as `quantize_weight` returns them, the codes chosen by GPTQ (what `QuantLinear` stores)."""
    scale = weight_scale(w, bits, group_size)
    return gptq_codes(w, expand_group_scale(scale, w.shape[1]), bits, hessian), scale


def output_error(x, w, codes, scale):
    return float((x @ (w - dequantize_weight(codes, scale)).t()).pow(2).mean())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
def test_gptq_lowers_the_output_error_on_held_out_rows(bits, group_size):
    x, w = correlated_rows(), weight()
    held_out = correlated_rows(seed=5)
    nearest = quantize_weight(w, bits, group_size)
    gptq = gptq_quantize_weight(w, bits, hessian_from_rows(x), group_size)
    assert output_error(held_out, w, *gptq) < 0.8 * output_error(held_out, w, *nearest)


def test_gptq_rounds_progressive_groups_under_their_integer_scales():
    x, w = correlated_rows(), weight()
    held_out = correlated_rows(seed=5)
    codes, group_scale, channel_scale = progressive_quantize_weight(w, 16)
    step = progressive_step(group_scale, channel_scale, w.shape[1])
    chosen = gptq_codes(w, step, 4, hessian_from_rows(x), lowest=PROGRESSIVE_LOWEST)
    assert chosen.min() >= PROGRESSIVE_LOWEST and chosen.max() <= qmax(4)
    def error(c):
        return float((held_out @ (w - c.float() * step).t()).pow(2).mean())
    assert error(chosen) < 0.8 * error(codes)


@pytest.mark.parametrize("bits, group_size", [(4, None), (8, None), (4, 16)])
def test_gptq_keeps_the_round_to_nearest_scales_and_code_range(bits, group_size):
    w = weight()
    codes, scale = gptq_quantize_weight(w, bits, hessian_from_rows(correlated_rows()), group_size)
    assert torch.equal(scale, quantize_weight(w, bits, group_size)[1])
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert int(codes.abs().max()) <= qmax(bits)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    w = weight()
    diagonal = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(2)).double() + 0.5)
    codes, _ = gptq_quantize_weight(w, 4, diagonal)
    nearest, _ = quantize_weight(w, 4)
    assert (codes != nearest).float().mean() < 1e-3  # no error to spread; ties may round apart in float64


def test_channels_calibration_never_saw_do_not_break_gptq():
    x = correlated_rows()
    x[:, 5] = 0.0
    codes, scale = gptq_quantize_weight(weight(), 4, hessian_from_rows(x))
    assert torch.isfinite(dequantize_weight(codes, scale)).all()
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize_weight(weight(), 4, torch.eye(63))


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_gptq_recipe_quantizes_a_layer_with_less_output_error(lora_rank):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128)).eval()
    x = correlated_rows()
    stats = quant.calibrate(model, lambda: model(x), sample_rows=512, progress=False)
    held_out = correlated_rows(seed=5)
    errors = {}
    for rounding in ("nearest", "gptq"):
        recipe = quant.Recipe(w_bits=4, method="dynamic", weight_rounding=rounding, lora_rank=lora_rank)
        q = quant.quantize_(copy.deepcopy(model), recipe, stats if recipe.needs_calibration else None)
        with torch.no_grad():
            errors[rounding] = float((q(held_out) - model(held_out)).pow(2).mean())
    assert errors["gptq"] < 0.9 * errors["nearest"]


@torch.no_grad()
def test_gptq_fits_too_few_rows_and_holds_with_more_rows_than_inputs():
    """Why the calibration plan keeps as many rows as its memory budget allows: with fewer rows than inputs GPTQ
    fits them (worse than round-to-nearest on other rows); with more it is well below both."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128)).eval()
    x, held_out = correlated_rows(seed=10), correlated_rows(seed=5)
    def held_out_error(recipe, stats=None):
        quantized = quant.quantize_(copy.deepcopy(model), recipe, stats)
        return float((quantized(held_out) - model(held_out)).pow(2).mean())
    gptq = quant.Recipe(w_bits=4, method="dynamic", weight_rounding="gptq")
    errors = {rows: held_out_error(gptq, quant.calibrate(model, lambda: model(x), sample_rows=rows, progress=False))
              for rows in (8, 256)}
    nearest = held_out_error(quant.Recipe(w_bits=4, method="dynamic"))
    assert errors[8] > nearest and errors[256] < 0.8 * min(errors[8], nearest)


def test_gptq_recipes_need_calibration_rows():
    model = nn.Sequential(nn.Linear(64, 48)).eval()
    recipe = quant.get_recipe("w4a8-dynamic-gptq")
    assert recipe.needs_calibration and recipe.needs_samples and not recipe.calibrates_activations
    with pytest.raises(ValueError, match=r"\(GPTQ weight rounding\) needs calibration statistics"):
        quant.quantize_(model, recipe)
    x = correlated_rows()
    no_rows = quant.calibrate(model, lambda: model(x), sample_rows=0, progress=False)
    with pytest.raises(ValueError, match="sample rows"):
        quant.quantize_(model, recipe, no_rows)
