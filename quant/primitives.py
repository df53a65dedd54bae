"""Quantizer math as pure functions: symmetric scales, (de)quantization, progressive group scales, int4 packing,
SQNR.

Every quantizer in this library is *symmetric* (zero point 0) and uses the restricted range
[-qmax, qmax] with qmax = 2**(bits-1) - 1 (127 for 8 bit, 7 for 4 bit), so that negating a
tensor negates its codes exactly. Scales are float32 and never zero (clamped to `EPS`).
"""
import torch

EPS = 1e-8  # smallest scale: an all-zero row quantizes to zeros instead of dividing by zero


def qmax(bits: int) -> int:
    """Largest code of a symmetric `bits`-bit quantizer (127 for 8, 7 for 4)."""
    return 2 ** (bits - 1) - 1


def scale_from_absmax(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric scale that maps |x| <= absmax onto [-qmax, qmax]."""
    return (absmax.float() / qmax(bits)).clamp(min=EPS)


def quantize(x: torch.Tensor, scale: torch.Tensor, bits: int, lowest: int | None = None) -> torch.Tensor:
    """Round x / scale to int8 codes in [lowest, qmax] (scale broadcasts against x; lowest defaults to -qmax:
    symmetric)."""
    q = qmax(bits)
    return torch.round(x.float() / scale).clamp_(-q if lowest is None else lowest, q).to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes * scale in float32."""
    return codes.float() * scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize: the value a quantized matmul really sees, in x's dtype."""
    return dequantize(quantize(x, scale, bits), scale).to(x.dtype)


# ---- granularities -------------------------------------------------------------------------

def per_tensor_scale(x: torch.Tensor, bits: int) -> torch.Tensor:
    """One scale for the whole tensor: shape ()."""
    return scale_from_absmax(x.abs().amax(), bits)


def per_token_scale(x: torch.Tensor, bits: int) -> torch.Tensor:
    """One scale per row of the last dimension: x (..., in) -> (..., 1)."""
    return scale_from_absmax(x.abs().amax(dim=-1, keepdim=True), bits)


def per_channel_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """One scale per output channel: w (out, in) -> (out, 1)."""
    return scale_from_absmax(w.abs().amax(dim=1, keepdim=True), bits)


def per_group_scale(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """One scale per `group_size` consecutive input channels: w (out, in) -> (out, in // group_size)."""
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    groups = w.reshape(out_features, in_features // group_size, group_size)
    return scale_from_absmax(groups.abs().amax(dim=-1), bits)


def expand_group_scale(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """Broadcast a weight scale to (out, in): per-channel (out, 1) stays, per-group repeats."""
    if scale.shape[-1] == 1:
        return scale
    return scale.repeat_interleave(in_features // scale.shape[-1], dim=-1)


def weight_scale(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """The weight's scale: per output channel (out, 1), or per `group_size` input channels (out, in/group)."""
    return per_channel_scale(w, bits) if group_size is None else per_group_scale(w, bits, group_size)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None):
    """Symmetric weight quantization. w (out, in) -> codes int8 (out, in), scale (out, 1 or in/group)."""
    scale = weight_scale(w, bits, group_size)
    codes = quantize(w, expand_group_scale(scale, w.shape[1]), bits)
    return codes, scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_weight` (float32)."""
    return dequantize(codes, expand_group_scale(scale, codes.shape[-1]))


def fake_quant_weight(w: torch.Tensor, bits: int, group_size: int | None = None,
                      progressive: bool = False) -> torch.Tensor:
    """Q(w): the weight as the quantized layer holds it, in float32 (`progressive`: 4-bit codes with integer group
    scales, see `progressive_quantize_weight`)."""
    if progressive:
        codes, group_scale, channel_scale = progressive_quantize_weight(w, group_size)
        return dequantize(progressive_codes(codes, group_scale), channel_scale)
    return dequantize_weight(*quantize_weight(w, bits, group_size))


# ---- progressive group quantization (4-bit codes, integer group scales, one float scale per channel) ----------
# QServe (Lin et al. 2024): w ~ q4 * g * s with q4 a 4-bit code, a small integer g per group of input channels and
# one float s per output channel. q4 * g is an int8 code (|q4 * g| <= 8 * 15 = 120), so the int8 GEMM multiplies
# it and rescales by s alone: group-wise 4-bit accuracy without a scale that changes along K. The codes use all
# 16 levels of 4 bits, [-8, 7]: against the symmetric [-7, 7] (with g up to 18) the finer step is worth 0.2-0.6 dB
# held-out on the demo model (docs/fidelity.md).
PROGRESSIVE_LOWEST = -8     # smallest 4-bit code of progressive groups (the largest is qmax(4) = 7)
PROGRESSIVE_GROUP_MAX = 15  # largest integer group scale: 8 * 15 = 120 <= 127, and it fits 4 bits (two per byte)


def progressive_scales(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(channel_scale float32 (out, 1), group_scale uint8 (out, in / group_size)) of w (out, in).

    The channel scale maps the row's max |w| onto 7.5 * PROGRESSIVE_GROUP_MAX (the middle of the codes' reach,
    -8 and 7 steps); each group then takes the integer scale in 1..PROGRESSIVE_GROUP_MAX whose 4-bit rounding of
    the group has the least squared error (an exact search: a ceiling of max / 7 would waste up to half a step on
    every group, and a small group's best step is often one that clips its largest weight)."""
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    w = w.float().reshape(out_features, in_features // group_size, group_size)
    reach = (qmax(4) - PROGRESSIVE_LOWEST) / 2
    channel_scale = (w.abs().amax(dim=(1, 2), keepdim=True) / (reach * PROGRESSIVE_GROUP_MAX)).clamp(min=EPS)
    best_error = torch.full(w.shape[:2], torch.inf, device=w.device)
    group_scale = torch.ones(w.shape[:2], dtype=torch.uint8, device=w.device)
    for g in range(1, PROGRESSIVE_GROUP_MAX + 1):
        step = channel_scale * g
        error = (quantize(w, step, 4, PROGRESSIVE_LOWEST) * step - w).pow_(2).sum(dim=-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        group_scale = torch.where(better, g, group_scale)
    return channel_scale[:, :, 0], group_scale


def progressive_quantize_weight(w: torch.Tensor, group_size: int,
                                scales: tuple[torch.Tensor, torch.Tensor] | None = None):
    """w (out, in) -> (4-bit codes int8 (out, in), group_scale uint8 (out, in/group), channel_scale (out, 1)),
    rounding to nearest under `scales` (default `progressive_scales(w, group_size)`)."""
    channel_scale, group_scale = scales if scales is not None else progressive_scales(w, group_size)
    codes = quantize(w, progressive_step(group_scale, channel_scale, w.shape[1]), 4, PROGRESSIVE_LOWEST)
    return codes, group_scale, channel_scale


def progressive_step(group_scale: torch.Tensor, channel_scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """The float step g * s of every weight (out, in): what a 4-bit code is multiplied by."""
    return expand_group_scale(group_scale.float() * channel_scale, in_features)


def progressive_codes(codes: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
    """The int8 GEMM's codes q4 * g (out, in) from 4-bit codes (out, in) and integer group scales (out, groups)."""
    return codes * expand_group_scale(group_scale, codes.shape[-1]).to(torch.int8)


# ---- int4 storage --------------------------------------------------------------------------

def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit codes per byte along the last dim: int8 (..., n) in [-8, 7] -> uint8 (..., n/2).

    Planar layout: element k of the first half goes to the low nibble of byte k, element k of the
    second half to its high nibble. Unpacking then writes two contiguous halves (two shifts and a
    concatenation), several times faster on CPU than interleaving even/odd elements.
    """
    if codes.numel() and not codes.is_meta and (codes.min() < -8 or codes.max() > 7):
        raise ValueError("int4 packing needs codes in [-8, 7]")
    return _pack_nibbles(codes.to(torch.uint8) & 0x0F, "int4 packing")


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 (..., n/2) -> int8 (..., n), sign-extended."""
    signed = packed.view(torch.int8)
    low = torch.bitwise_left_shift(signed, 4) >> 4  # arithmetic shift sign-extends the low nibble
    return torch.cat((low, signed >> 4), dim=-1)


def pack_uint4(values: torch.Tensor) -> torch.Tensor:
    """Two unsigned 4-bit values per byte along the last dim (progressive groups' integer scales, 1..15):
    (..., n) in [0, 15] -> uint8 (..., n/2), in `pack_int4`'s planar layout."""
    if values.numel() and not values.is_meta and (values.min() < 0 or values.max() > 15):
        raise ValueError("uint4 packing needs values in [0, 15]")
    return _pack_nibbles(values.to(torch.uint8), "uint4 packing")


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_uint4`: uint8 (..., n/2) -> uint8 (..., n)."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1)


def _pack_nibbles(nibbles: torch.Tensor, what: str) -> torch.Tensor:
    """uint8 (..., n) with values < 16 -> uint8 (..., n/2): the first half in the low nibbles, the second high."""
    if nibbles.shape[-1] % 2:
        raise ValueError(f"{what} needs an even last dimension, got {tuple(nibbles.shape)}")
    low, high = nibbles.chunk(2, dim=-1)
    return low | (high << 4)


# ---- error metric --------------------------------------------------------------------------

def sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(||ref|| / ||ref - approx||)."""
    reference, approximation = reference.detach().double(), approximation.detach().double()
    noise = torch.linalg.vector_norm(reference - approximation)
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(torch.linalg.vector_norm(reference) / noise))
