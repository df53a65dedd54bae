"""Progressive group quantization (QServe): 4-bit codes with integer group scales, multiplied by the int8 GEMM as
q4 x g with one float scale per output channel. Both backends, files, error against per-channel rounding."""
import copy

import pytest
import torch
from torch import nn

import quant
from quant.linear import QuantLinear
from quant.primitives import (
    PROGRESSIVE_GROUP_MAX,
    PROGRESSIVE_LOWEST,
    dequantize,
    fake_quant_weight,
    progressive_codes,
    progressive_quantize_weight,
    sqnr,
)
from tests.tiny_models import dit_inputs, dit_timestep_loop, tiny_dit

PROGRESSIVE = dict(w_bits=4, a_bits=8, group_size=32, weight_groups="progressive")


def uneven_weight(out_features=96, in_features=256, seed=0):
    """A weight whose input channels differ in scale by orders of magnitude, as trained layers' do."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g) * torch.rand(1, in_features, generator=g).pow(4) * 4


def test_codes_stay_int8_and_rebuild_the_weight_they_stand_for():
    w = uneven_weight()
    codes, group_scale, channel_scale = progressive_quantize_weight(w, 32)
    assert codes.min() == PROGRESSIVE_LOWEST == -8 and codes.max() == 7 and group_scale.dtype == torch.uint8
    assert 1 <= group_scale.min() and group_scale.max() <= PROGRESSIVE_GROUP_MAX
    gemm_codes = progressive_codes(codes, group_scale)
    assert gemm_codes.dtype == torch.int8 and gemm_codes.abs().max() <= -PROGRESSIVE_LOWEST * PROGRESSIVE_GROUP_MAX <= 127
    assert torch.equal(fake_quant_weight(w, 4, 32, progressive=True), dequantize(gemm_codes, channel_scale))
    # each group's integer scale is the best of 1..15 for its own rounding error, on a finer step than
    # per-channel rounding's: the error is below per-channel's
    error = (fake_quant_weight(w, 4, 32, progressive=True) - w).pow(2).sum()
    assert error < (fake_quant_weight(w, 4) - w).pow(2).sum()


@torch.no_grad()
def test_lowers_the_output_error_of_the_demo_models_layers_on_held_out_rows(demo_model):
    dit = quant.find_dit(demo_model.model)
    layers = [m for m in dit.modules() if isinstance(m, nn.Linear) and m.in_features % 32 == 0
              and m.in_features >= 128][:6]
    assert layers
    gains = []
    for index, linear in enumerate(layers):
        g = torch.Generator().manual_seed(100 + index)  # rows nothing was fitted on
        x = torch.randn(256, linear.in_features, generator=g) * torch.rand(linear.in_features, generator=g) * 3
        reference = linear(x)
        per_channel = QuantLinear.from_float(linear, quant.Recipe(w_bits=4, a_bits=8, method="dynamic"))
        progressive = QuantLinear.from_float(linear, quant.Recipe(method="dynamic", **PROGRESSIVE))
        gains.append(sqnr(reference, progressive(x)) - sqnr(reference, per_channel(x)))
    assert min(gains) > 0, gains


def calibrated_dit():
    dit = tiny_dit()
    x, _, kwargs = dit_inputs()
    stats = quant.calibrate(dit, dit_timestep_loop(dit, x, kwargs, (0.9, 0.6, 0.3, 0.1)), progress=False)
    return dit, stats, (x, kwargs)


RECIPES = {
    "dynamic": dict(method="dynamic"),
    "static-rot-groups": dict(method="static", rotation=32, timestep_groups=2),
    "sqd-gptq+lora": dict(method="sqd", smoothing="max", rotation=32, weight_rounding="gptq", lora_rank=4),
}


@pytest.mark.parametrize("name", RECIPES)
@torch.no_grad()
def test_integer_backend_equals_the_simulated_one_and_files_round_trip(name, tmp_path):
    dit, stats, (x, kwargs) = calibrated_dit()
    outputs, layers = {}, {}
    for backend in ("simulated", "integer"):
        recipe = quant.Recipe(name=name, backend=backend, **PROGRESSIVE, **RECIPES[name])
        model = quant.quantize_(copy.deepcopy(dit), recipe, stats)
        outputs[backend] = model(x, torch.full((x.shape[0],), 0.5), **kwargs)
        layers[backend] = quant.quantized_layers(model)
        quant.save(model, recipe, tmp_path / f"{backend}.safetensors")
        fresh = copy.deepcopy(dit)
        assert quant.load(fresh, tmp_path / f"{backend}.safetensors", recipe=recipe) == recipe
        saved, loaded = model.state_dict(), fresh.state_dict()
        assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
        assert torch.equal(fresh(x, torch.full((x.shape[0],), 0.5), **kwargs), outputs[backend])
    rows = torch.randn(16, max(layer.in_features for layer in layers["integer"].values()),
                       generator=torch.Generator().manual_seed(3))
    for layer_name, simulated in layers["simulated"].items():  # the same input: the same codes, float rounding apart
        integer = layers["integer"][layer_name]
        assert sqnr(simulated(rows[:, :simulated.in_features]), integer(rows[:, :integer.in_features])) > 100
    # through the whole DiT, an activation that float rounding puts on the other side of a rounding boundary in one
    # backend moves one code by one step, and that propagates
    assert sqnr(outputs["simulated"], outputs["integer"]) > 50


def test_the_group_scales_are_stored_two_per_byte_and_counted():
    linear = nn.Linear(256, 64)
    layer = QuantLinear.from_float(linear, quant.Recipe(method="dynamic", **PROGRESSIVE))
    assert layer.weight_group_scale.shape == (1, 64, 256 // 32 // 2) and layer.weight_scale.shape == (1, 64, 1)
    plain = QuantLinear.from_float(linear, quant.Recipe(w_bits=4, a_bits=8, method="dynamic"))
    assert layer.held_bytes()["scales"] == plain.held_bytes()["scales"] + 64 * 256 // 32 // 2
    _, group_scale, _ = progressive_quantize_weight(linear.weight.detach(), 32)
    assert torch.equal(layer._group_scale(0), group_scale)


@torch.no_grad()
def test_an_odd_number_of_groups_is_packed_with_a_padding_nibble(tmp_path):
    model = nn.Sequential(nn.Linear(96, 48)).eval()  # 3 groups of 32 per row
    recipe = quant.Recipe(name="odd", method="dynamic", **PROGRESSIVE)
    quantized = quant.quantize_(copy.deepcopy(model), recipe)
    layer = quantized[0]
    assert layer.weight_group_scale.shape == (1, 48, 2)
    assert torch.equal(layer._group_scale(0), progressive_quantize_weight(model[0].weight, 32)[1])
    quant.save(quantized, recipe, tmp_path / "odd.safetensors")
    fresh = copy.deepcopy(model)
    quant.load(fresh, tmp_path / "odd.safetensors")
    x = torch.randn(5, 96)
    assert torch.equal(fresh(x), quantized(x))


@pytest.mark.parametrize("fields, message", [
    (dict(w_bits=4, group_size=32), "weight_groups='progressive'"),
    (dict(w_bits=4, weight_groups="progressive"), "group_size"),
    (dict(w_bits=8, group_size=32, weight_groups="progressive"), "w_bits=4"),
    (dict(w_bits=4, a_bits=16, method="weight-only", group_size=32, weight_groups="progressive"), "quantized activ"),
    (dict(w_bits=4, group_size=32, weight_groups="qserve"), "weight_groups must be one of"),
])
def test_bad_values_are_refused_in_words(fields, message):
    with pytest.raises(ValueError, match=message):
        quant.Recipe(**{"method": "dynamic", **fields})
