"""bench.sensitivity's building blocks on a tiny random SAT DiT: recording DiT calls, per-layer / per-block
sensitivity, the mixed-precision recipe and the equal-memory low-rank rank."""
import math

import pytest
import torch
from torch import nn

import quant
from bench import sensitivity
from tests.tiny_models import dit_inputs, tiny_dit


@pytest.fixture(scope="module")
def dit_and_calls():
    dit = tiny_dit()
    x, _, kwargs = dit_inputs()
    calls = sensitivity.record_dit_calls(dit, lambda: [dit(x, torch.full((2,), t), **kwargs) for t in (0.2, 0.5, 0.8)],
                                         keep=2)
    return dit, calls


def test_record_dit_calls_keeps_evenly_spread_calls(dit_and_calls):
    _, calls = dit_and_calls
    assert [float(call.args[1][0]) for call in calls] == pytest.approx([0.2, 0.8])


def test_layer_sensitivity_quantizes_one_layer_at_a_time(dit_and_calls):
    dit, calls = dit_and_calls
    recipe = quant.get_recipe("w4a8-dynamic")
    ranking = sensitivity.layer_sensitivity(dit, recipe, calls, progress=False)
    assert {s.name for s in ranking} == set(quant.linear_layers(dit))
    assert [s.snr_db for s in ranking] == sorted(s.snr_db for s in ranking)
    assert all(math.isfinite(s.snr_db) and s.snr_db < 120 for s in ranking)
    one = sensitivity.quantize_only(dit, recipe, {ranking[0].name})
    assert list(quant.quantized_layers(one)) == [ranking[0].name]
    blocks = sensitivity.block_sensitivity(dit, recipe, calls, progress=False)
    assert sorted(b.name for b in blocks) == ["transformer.layers.0", "transformer.layers.1"]


def test_mixed_precision_keeps_chosen_layers_at_8_bit():
    model = tiny_dit()
    high = ["transformer.layers.0.ff.ff.2", "transformer.layers.1.self_attn.to_qkv"]
    sensitivity.mixed_precision_(model, quant.get_recipe("w4a8-dynamic"), quant.get_recipe("w8a8-dynamic"), high)
    bits = {name: layer.recipe.w_bits for name, layer in quant.quantized_layers(model).items()}
    assert {name for name, b in bits.items() if b == 8} == set(high)
    assert set(bits) == set(quant.quantization_targets(tiny_dit(), quant.get_recipe("w4a8-dynamic")))
    assert isinstance(model.get_submodule("transformer.project_in"), nn.Linear)  # default skip stays float
    x, t, kwargs = dit_inputs()
    assert torch.isfinite(model(x, t, **kwargs)).all()


def test_mixed_precision_rejects_bad_input():
    w4, static = quant.get_recipe("w4a8-dynamic"), quant.get_recipe("w8a8-static")
    with pytest.raises(ValueError, match="no calibration"):
        sensitivity.mixed_precision_(tiny_dit(), w4, static, ["transformer.layers.0.ff.ff.2"])
    with pytest.raises(ValueError, match="no linear layers named"):
        sensitivity.mixed_precision_(tiny_dit(), w4, quant.get_recipe("w8a8-dynamic"), ["transformer.nope"])


def test_equal_memory_lora_rank_spends_the_same_bytes():
    base = quant.get_recipe("w4a8-dynamic")
    uniform = quant.quantize_(tiny_dit(), base)
    mixed = sensitivity.mixed_precision_(tiny_dit(), base, quant.get_recipe("w8a8-dynamic"),
                                         ["transformer.layers.0.ff.ff.0.proj", "transformer.layers.1.ff.ff.0.proj"])
    extra = quant.memory_report(mixed).linear_bytes - quant.memory_report(uniform).linear_bytes
    rank = sensitivity.equal_memory_lora_rank(tiny_dit(), base, extra)
    lora = quant.quantize_(tiny_dit(), base.replace(lora_rank=rank))
    lora_extra = quant.memory_report(lora).linear_bytes - quant.memory_report(uniform).linear_bytes
    per_rank = lora_extra / rank
    assert abs(lora_extra - extra) <= per_rank / 2 + 1
