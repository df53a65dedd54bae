"""AdaRound weight rounding: lower output error than round-to-nearest on rows H never saw, never above its GPTQ
initialisation on the rows it was fitted to, codes in range for every format, both backends, files, bad values."""
import copy

import pytest
import torch
from torch import nn

import quant
import quant.adaround
from quant.adaround import _factor, _objective, adaround_codes
from quant.gptq import GPTQ_DAMP, gptq_codes, hessian_from_rows
from quant.primitives import (
    PROGRESSIVE_LOWEST,
    expand_group_scale,
    progressive_scales,
    progressive_step,
    qmax,
    quantize,
    sqnr,
    weight_scale,
)
from tests.quant.test_gptq import correlated_rows, weight
from tests.quant.test_progressive import PROGRESSIVE, uneven_weight

FAST = dict(iterations=100)  # enough to beat GPTQ on these small layers


def steps_of(w, fmt):
    """The float step of every weight: per output channel, float groups of 16, or progressive groups of 16."""
    if fmt == "progressive":
        channel, group = progressive_scales(w, 16)
        return progressive_step(group, channel, w.shape[1])
    return expand_group_scale(weight_scale(w, 4, 16 if fmt == "groups" else None), w.shape[1])


@pytest.mark.parametrize("fmt", ["channel", "groups", "progressive"])
def test_adaround_beats_nearest_on_held_out_rows_and_never_ends_above_gptq(fmt):
    x, held_out, w = correlated_rows(rows=128), correlated_rows(seed=5), weight()
    step = steps_of(w, fmt)
    hessian = hessian_from_rows(x)
    f, d = _factor(hessian, GPTQ_DAMP)

    def objective(codes):  # GPTQ's damped output error on the fitting rows
        return float(_objective(w - codes.float() * step, f, d))

    def held_out_error(codes):
        return float((held_out @ (w - codes.float() * step).t()).pow(2).mean())

    nearest, gptq = quantize(w, step, 4), gptq_codes(w, step, 4, hessian)
    codes = adaround_codes(w, step, 4, hessian, init=gptq, **FAST)
    assert objective(codes) <= objective(gptq)
    assert held_out_error(codes) < 0.8 * held_out_error(nearest)
    learned = adaround_codes(w, step, 4, hessian, init="nearest", **FAST)  # the learning itself, from nearest
    assert objective(learned) < 0.9 * objective(nearest)


def test_codes_stay_in_range_where_the_scales_clip():
    w = uneven_weight(out_features=32, in_features=64)  # progressive group scales clip some groups' largest weights
    step = steps_of(w, "progressive")
    assert (w / step).abs().max() > qmax(4)
    codes = adaround_codes(w, step, 4, hessian_from_rows(correlated_rows(channels=64)), lowest=PROGRESSIVE_LOWEST,
                           **FAST)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert codes.min() >= PROGRESSIVE_LOWEST and codes.max() <= qmax(4)


def test_a_spent_work_budget_returns_the_start_and_a_small_one_no_worse():
    x, w = correlated_rows(rows=128), weight()
    step = steps_of(w, "channel")
    hessian = hessian_from_rows(x)
    f, d = _factor(hessian, GPTQ_DAMP)
    start = gptq_codes(w, step, 4, hessian)
    assert torch.equal(adaround_codes(w, step, 4, hessian, init=start, work=0.0), start)
    codes = adaround_codes(w, step, 4, hessian, init=start, work=1e8)  # a few iterations
    assert _objective(w - codes.float() * step, f, d) <= _objective(w - start.float() * step, f, d)


@torch.no_grad()
def test_integer_backend_equals_the_simulated_one_and_files_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64)).eval()
    x = correlated_rows(rows=256)
    stats = quant.calibrate(model, lambda: model(x), sample_rows=256, progress=False)
    outputs = {}
    for backend in ("simulated", "integer"):
        recipe = quant.Recipe(name="ada", method="dynamic", backend=backend, weight_rounding="adaround", **PROGRESSIVE)
        quantized = quant.quantize_(copy.deepcopy(model), recipe, stats)
        outputs[backend] = quantized(x)
        quant.save(quantized, recipe, tmp_path / f"{backend}.safetensors")
        fresh = copy.deepcopy(model)
        assert quant.load(fresh, tmp_path / f"{backend}.safetensors", recipe=recipe) == recipe
        saved, loaded = quantized.state_dict(), fresh.state_dict()
        assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
        assert torch.equal(fresh(x), outputs[backend])
    assert sqnr(outputs["simulated"], outputs["integer"]) > 60


@pytest.mark.parametrize("fields, message", [
    (dict(w_bits=16, backend="simulated"), "weight_rounding='adaround' chooses weight codes, but w_bits=16"),
    (dict(w_bits=4, weight_rounding="adaroud"), "weight_rounding must be one of"),
])
def test_bad_values_are_refused_in_words(fields, message):
    with pytest.raises(ValueError, match=message):
        quant.Recipe(**{"method": "dynamic", "weight_rounding": "adaround", **fields})


def test_adaround_needs_calibration_rows_and_a_fitting_hessian():
    recipe = quant.Recipe(w_bits=4, method="dynamic", weight_rounding="adaround")
    assert recipe.needs_calibration and recipe.needs_samples and not recipe.calibrates_activations
    with pytest.raises(ValueError, match=r"\(AdaRound weight rounding\) needs calibration statistics"):
        quant.quantize_(nn.Sequential(nn.Linear(64, 48)), recipe)
    w = weight()
    with pytest.raises(ValueError, match="Hessian"):
        adaround_codes(w, steps_of(w, "channel"), 4, torch.eye(63))
    with pytest.raises(ValueError, match="init"):
        adaround_codes(w, steps_of(w, "channel"), 4, torch.eye(64), init="zero")
