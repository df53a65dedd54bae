"""Mixed precision under a memory budget: the layers whose 4-bit weights cost the most output error per byte keep
8 bits, the whole stays within the budget, files keep the choice."""
import copy

import pytest
import torch
from torch import nn

import quant
from quant.mixed import eight_bit_layers, stored_bytes
from quant.primitives import sqnr
from tests.tiny_models import dit_inputs, dit_timestep_loop, tiny_dit


def held_fraction(model, recipe) -> float:
    """Stored bytes of the quantized layers over their fp32 weight bytes (what the budget bounds)."""
    layers = quant.quantized_layers(model)
    held = sum(sum(layer.held_bytes()[k] for k in ("weight", "scales", "smoothing", "lowrank"))
               for layer in layers.values())
    return held / sum(4 * layer.in_features * layer.out_features for layer in layers.values())


@pytest.fixture(scope="module")
def calibrated():
    dit = tiny_dit()
    x, _, kwargs = dit_inputs()
    stats = quant.calibrate(dit, dit_timestep_loop(dit, x, kwargs, (0.9, 0.6, 0.3, 0.1)), progress=False)
    return dit, stats, x, kwargs


@torch.no_grad()
def test_a_larger_budget_keeps_more_layers_at_8_bits_and_never_exceeds_it(calibrated):
    dit, stats, x, kwargs = calibrated
    t = torch.full((x.shape[0],), 0.5)
    reference = dit(x, t, **kwargs)
    counts, snrs = [], []
    for budget in (0.14, 0.2, 0.26):
        recipe = quant.Recipe(name="mixed", w_bits=4, a_bits=8, method="dynamic", memory_budget=budget)
        model = quant.quantize_(copy.deepcopy(dit), recipe, stats)
        assert held_fraction(model, recipe) <= budget
        counts.append(sum(layer.recipe.w_bits == 8 for layer in quant.quantized_layers(model).values()))
        snrs.append(sqnr(reference, model(x, t, **kwargs)))
    assert counts[0] < counts[1] < counts[2]
    assert snrs[0] < snrs[2]


def test_the_layer_with_the_larger_4_bit_error_is_kept_at_8_bits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight[:, :4] *= 50  # a few huge input columns: per-channel 4-bit rounding loses the rest
    x = torch.randn(256, 64)
    stats = quant.calibrate(model, lambda: model(x), progress=False)
    recipe = quant.Recipe(w_bits=4, a_bits=8, method="dynamic", skip=())
    one_layer = (stored_bytes(model[0], recipe.eight_bit_layer) + stored_bytes(model[1], recipe)) / (4 * 2 * 64 * 64)
    chosen = eight_bit_layers(quant.quantization_targets(model, recipe), recipe.replace(memory_budget=one_layer),
                              stats, [])
    assert chosen == {"1"}


@torch.no_grad()
def test_files_keep_which_layers_hold_8_bits(calibrated, tmp_path):
    dit, stats, x, kwargs = calibrated
    recipe = quant.Recipe(name="mixed", w_bits=4, a_bits=8, method="dynamic", memory_budget=0.2,
                          group_size=32, weight_groups="progressive")
    model = quant.quantize_(copy.deepcopy(dit), recipe, stats)
    quant.save(model, recipe, tmp_path / "mixed.safetensors")
    fresh = copy.deepcopy(dit)
    assert quant.load(fresh, tmp_path / "mixed.safetensors", recipe=recipe) == recipe
    bits = {name: layer.recipe.w_bits for name, layer in quant.quantized_layers(model).items()}
    assert {name: layer.recipe.w_bits for name, layer in quant.quantized_layers(fresh).items()} == bits
    assert set(bits.values()) == {4, 8}
    t = torch.full((x.shape[0],), 0.5)
    assert torch.equal(fresh(x, t, **kwargs), model(x, t, **kwargs))


def test_a_budget_below_the_4_bit_floor_and_bad_values_are_refused(calibrated):
    dit, stats, _, _ = calibrated
    with pytest.raises(ValueError, match="above its memory_budget 0.05"):
        quant.quantize_(copy.deepcopy(dit), quant.Recipe(w_bits=4, method="dynamic", memory_budget=0.05), stats)
    with pytest.raises(ValueError, match="memory budget's choice"):
        quant.quantize_(copy.deepcopy(dit), quant.Recipe(w_bits=4, method="dynamic", memory_budget=0.2))
    for value in (0, 1.5, "half", True):
        with pytest.raises(ValueError, match="memory_budget must be"):
            quant.Recipe(w_bits=4, method="dynamic", memory_budget=value)
    with pytest.raises(ValueError, match="needs w_bits=4"):
        quant.Recipe(w_bits=8, method="dynamic", memory_budget=0.2)
