"""Quantizer math: int4 packing, rounding bounds, granularities, SQNR."""
import pytest
import torch

from quant.primitives import (
    dequantize_weight,
    fake_quant,
    pack_int4,
    pack_uint4,
    per_group_scale,
    per_tensor_scale,
    per_token_scale,
    qmax,
    quantize_weight,
    sqnr,
    unpack_int4,
    unpack_uint4,
)


def test_int4_pack_round_trips_every_code():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # (3, 32): every nibble value, both positions
    codes = codes[:, torch.randperm(codes.shape[1], generator=torch.Generator().manual_seed(0))]
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(unpack_int4(packed), codes)


def test_int4_pack_round_trips_random_batched():
    codes = torch.randint(-8, 8, (2, 5, 64), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


@pytest.mark.parametrize("codes", [torch.zeros(2, 3, dtype=torch.int8), torch.full((2, 4), 9, dtype=torch.int8)])
def test_int4_pack_rejects_odd_width_or_out_of_range(codes):
    with pytest.raises(ValueError):
        pack_int4(codes)


def test_uint4_pack_round_trips_every_value():
    values = torch.arange(16, dtype=torch.uint8).repeat(2, 2)  # (2, 32): every nibble value, both positions
    values = values[:, torch.randperm(values.shape[1], generator=torch.Generator().manual_seed(0))]
    packed = pack_uint4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 16)
    assert torch.equal(unpack_uint4(packed), values)


@pytest.mark.parametrize("values", [torch.zeros(2, 3, dtype=torch.uint8), torch.full((2, 4), 16, dtype=torch.uint8),
                                    torch.full((2, 4), -1, dtype=torch.int16)])
def test_uint4_pack_rejects_odd_width_or_out_of_range(values):
    with pytest.raises(ValueError):
        pack_uint4(values)


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_error_is_at_most_half_a_step(bits):
    x = torch.randn(64, 128)
    for scale in (per_tensor_scale(x, bits), per_token_scale(x, bits)):
        err = (x - fake_quant(x, scale, bits)).abs()
        assert (err <= scale / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, 32])
def test_weight_codes_use_the_full_symmetric_range(bits, group_size):
    w = torch.randn(16, 128)
    codes, scale = quantize_weight(w, bits, group_size)
    assert codes.dtype == torch.int8 and codes.abs().max() == qmax(bits)
    assert scale.shape == (16, 1 if group_size is None else 128 // group_size)
    assert (w - dequantize_weight(codes, scale)).abs().max() <= scale.max() / 2 + 1e-6


def test_per_group_scales_beat_per_channel_on_mixed_magnitudes():
    w = torch.randn(32, 256)
    w[:, :32] *= 20  # one loud group of input channels
    per_channel = dequantize_weight(*quantize_weight(w, 4))
    per_group = dequantize_weight(*quantize_weight(w, 4, group_size=32))
    assert sqnr(w, per_group) > sqnr(w, per_channel) + 3


def test_per_group_scale_needs_a_divisor():
    with pytest.raises(ValueError, match="group_size"):
        per_group_scale(torch.randn(4, 30), 4, 16)


def test_sqnr_grows_about_6db_per_bit():
    w = torch.randn(64, 512)
    s4, s8 = (sqnr(w, dequantize_weight(*quantize_weight(w, b))) for b in (4, 8))
    assert 20 < s8 - s4 < 28
    assert sqnr(w, w) == float("inf")


@pytest.mark.parametrize("m, k, n", [(1, 10, 3), (5, 7, 9), (17, 16, 8), (40, 33, 20)])
def test_padded_int_mm_is_exact(m, k, n):
    """The CUDA shape padding (exercised here on CPU) adds zeros only."""
    from quant.kernels import padded_int_mm
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    assert torch.equal(padded_int_mm(a, w.t()), a.int() @ w.int().t())
