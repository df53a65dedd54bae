"""Int8 attention: close to float attention, integer equal to simulated to float rounding, K's offset removed by
smoothing, swapped into stable-audio-tools' attention modules found by what they are, refused where it does not fit."""
import copy

import pytest
import torch
import torch.nn.functional as F

import quant
from quant.attention import Int8Attention, attention_modules, int8_attention, quantize_attention_, restore_attention_
from quant.primitives import sqnr
from tests.tiny_models import TINY_DIT, dit_inputs, tiny_dit


def qkv(seed=0, batch=2, heads=3, n_q=40, n_k=56, dim=32, key_offset=0.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g) for n in (n_q, n_k, n_k))
    return q, k + key_offset * torch.randn(dim, generator=g), v


@pytest.mark.parametrize("backend", ["integer", "simulated"])
def test_int8_attention_is_close_to_float_attention(backend):
    q, k, v = qkv()
    assert sqnr(F.scaled_dot_product_attention(q, k, v), int8_attention(q, k, v, backend)) > 30


def test_integer_equals_simulated_to_float_rounding():
    q, k, v = qkv(seed=1)
    assert sqnr(int8_attention(q, k, v, "simulated"), int8_attention(q, k, v, "integer")) > 60


def test_smoothing_takes_ks_offset_out_of_its_scales():
    """A channel offset shared by every key leaves softmax unchanged; smoothed K drops it before quantizing, so a
    30x offset (which would set each key's per-token scale on its own) changes the int8 result by rounding only."""
    q, k, _ = qkv(seed=2)
    _, k_offset, v = qkv(seed=2, key_offset=30.0)
    offset = k_offset - k
    reference = F.scaled_dot_product_attention(q, k, v)
    shifted = int8_attention(q, k + offset, v)
    assert sqnr(int8_attention(q, k, v), shifted) > 50
    assert sqnr(reference, shifted) > 30


def test_the_dits_attention_modules_are_swapped_and_restored():
    dit = tiny_dit()
    x, t, kwargs = dit_inputs()
    modules = attention_modules(dit)
    assert len(modules) == 2 * TINY_DIT["depth"]  # self- and cross-attention per block
    with torch.no_grad():
        y_float = dit(x, t, **kwargs)
        int8 = copy.deepcopy(dit)
        assert quantize_attention_(int8) == len(modules)
        assert all(isinstance(m.apply_attn, Int8Attention) for m in attention_modules(int8))
        y_int8 = int8(x, t, **kwargs)
        assert 20 < sqnr(y_float, y_int8) < 200  # changed, and close
        assert restore_attention_(int8) == len(modules)
        assert torch.equal(int8(x, t, **kwargs), y_float)


def test_refusals_say_what_does_not_fit():
    with pytest.raises(ValueError, match="no stable-audio-tools attention"):
        quantize_attention_(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    q, k, v = qkv()
    with pytest.raises(ValueError, match="causal"):
        Int8Attention(3, 3)(q, k, v, causal=True)
    with pytest.raises(ValueError, match="head dim"):
        int8_attention(q, k[..., :16], v)
    with pytest.raises(ValueError, match="backend"):
        int8_attention(q, k, v, "fp8")
    with pytest.raises(ValueError, match="Recipe.attention"):
        quant.Recipe(attention="fp8")


def test_a_recipe_with_int8_attention_quantizes_saves_and_loads_it(tmp_path):
    """`attention="int8"` goes through quant.quantize_ and comes back from quant.load with the file's recipe."""
    recipe = quant.Recipe("w8a8-dynamic-attn8", 8, 8, "dynamic", attention="int8")
    x, t, kwargs = dit_inputs()
    model = quant.quantize_(tiny_dit(), recipe)
    assert all(isinstance(m.apply_attn, Int8Attention) for m in attention_modules(model))
    path = tmp_path / "attn8.safetensors"
    quant.save(model, recipe, path)
    loaded = tiny_dit(seed=1)  # other float weights: everything must come from the file
    assert quant.load(loaded, path).attention == "int8"
    assert all(isinstance(m.apply_attn, Int8Attention) for m in attention_modules(loaded))
    with torch.no_grad():
        assert torch.equal(model(x, t, **kwargs), loaded(x, t, **kwargs))
