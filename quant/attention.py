"""Attention in int8 (after SageAttention, Zhang et al. 2024): QK^T and PV as int8 x int8 -> int32 matmuls.

Per head, K is smoothed first: its mean over the tokens is subtracted. softmax(q (k - m)^T) = softmax(q k^T),
since q m^T is the same for every key of one query, and the channel-wise offset K carries (which would set
every token's scale) is gone. Then
  S = (Q8 K8^T) * s_q s_k^T / sqrt(d)   Q and K quantized per token (one scale per row of each head)
  P = softmax(S)                        in float32
  O = (P8 V8) * s_p s_v                 P per token (its rows lie in [0, 1]), V per channel (head dim) over tokens
Backends as for linears: "integer" multiplies the codes with `quant.kernels.int_matmul` (one 2-D int8 GEMM per
batch and head); "simulated" multiplies the same codes dequantized, in float (the reference).

Stable-audio-tools' `Attention` modules compute attention in `apply_attn(q, k, v, ...)` on (batch, heads, tokens,
head dim) tensors, after the projections and rotary embeddings. `quantize_attention_` finds those modules by what
they are (class name and attributes: this library imports nothing from stable-audio-tools) and gives each an
`Int8Attention` in place of that method; the projections stay the linears' business (`quant.quantize_`).
"""
import torch
from torch import nn

from .kernels import int_matmul, quantize_per_token

BACKENDS = ("integer", "simulated")


def attention_modules(root: nn.Module) -> list[nn.Module]:
    """SAT's attention modules under `root`: class `Attention` with `apply_attn`, `to_out` and head counts."""
    return [m for m in root.modules() if type(m).__name__ == "Attention" and callable(getattr(m, "apply_attn", None))
            and hasattr(m, "to_out") and hasattr(m, "num_heads") and hasattr(m, "kv_heads")]


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and float32 scales (..., n, 1) of x (..., n, d), one scale per row."""
    codes, scale = quantize_per_token(x.reshape(-1, x.shape[-1]), 8)
    return codes.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def _batched_int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (B, m, k) @ int8 (B, k, n) -> float32 (B, m, n), exact: one int8 GEMM per batch entry."""
    return torch.stack([int_matmul(a_i, b_i) for a_i, b_i in zip(a, b)]).float()


@torch.no_grad()
def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "integer") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with both products in int8 (see the module docstring); q (b, h, n_q, d),
    k and v (b, h, n_k, d). Returns float32 (b, h, n_q, d)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if q.shape[-1] != k.shape[-1] or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"int8 attention needs q, k of one head dim and k, v of one length, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    lead = q.shape[:-2]
    q, k, v = (t.float().reshape(-1, *t.shape[-2:]) for t in (q, k, v))
    k = k - k.mean(dim=-2, keepdim=True)
    q8, q_scale = _rows(q)
    k8, k_scale = _rows(k)
    v8_t, v_scale_t = _rows(v.mT)  # per channel: the rows of V^T
    v8, v_scale = v8_t.mT, v_scale_t.mT
    if backend == "integer":
        scores = _batched_int_matmul(q8, k8.mT).mul_(q_scale).mul_(k_scale.mT)
    else:
        scores = (q8 * q_scale) @ (k8 * k_scale).mT
    p8, p_scale = _rows(scores.mul_(q.shape[-1] ** -0.5).softmax(dim=-1))
    if backend == "integer":
        out = _batched_int_matmul(p8, v8).mul_(p_scale).mul_(v_scale)
    else:
        out = (p8 * p_scale) @ (v8 * v_scale)
    return out.reshape(*lead, *out.shape[-2:])


class Int8Attention:
    """Stands in for a SAT attention module's `apply_attn`: the same grouped-query repeat, then `int8_attention`.
    Causal masks, FlexAttention masks and sliding windows are refused with a ValueError (not implemented)."""

    def __init__(self, num_heads: int, kv_heads: int, backend: str = "integer"):
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.num_heads, self.kv_heads, self.backend = num_heads, kv_heads, backend

    def __call__(self, q, k, v, causal=None, flex_attention_block_mask=None, flex_attention_score_mod=None,
                 flash_attn_sliding_window=None):
        if causal or flex_attention_block_mask is not None or flex_attention_score_mod is not None \
                or flash_attn_sliding_window is not None:
            raise ValueError("int8 attention computes full, unmasked attention: this layer asks for a causal mask, a "
                             "FlexAttention mask or a sliding window; quantize without attention='int8'")
        if self.num_heads != self.kv_heads:  # grouped-query attention, as SAT repeats it
            k, v = (t.repeat_interleave(self.num_heads // self.kv_heads, dim=1) for t in (k, v))
        return int8_attention(q, k, v, self.backend).to(q.dtype)


def quantize_attention_(model: nn.Module, backend: str = "integer") -> int:
    """Give every SAT attention module under `model` int8 attention (in place); returns how many. ValueError
    where there is none, or where one is causal."""
    modules = attention_modules(model)
    if not modules:
        raise ValueError("attention='int8' found no stable-audio-tools attention module (class Attention with "
                         "apply_attn) in this model")
    causal = [type(m).__name__ for m in modules if getattr(m, "causal", False)]
    if causal:
        raise ValueError(f"int8 attention computes unmasked attention; {len(causal)} attention module(s) here are "
                         "causal")
    for module in modules:
        module.apply_attn = Int8Attention(module.num_heads, module.kv_heads, backend)
    return len(modules)


def restore_attention_(model: nn.Module) -> int:
    """Undo `quantize_attention_`: the modules' own `apply_attn` again; returns how many were restored."""
    restored = 0
    for module in attention_modules(model):
        if isinstance(module.__dict__.get("apply_attn"), Int8Attention):
            del module.__dict__["apply_attn"]
            restored += 1
    return restored
