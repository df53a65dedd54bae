"""The low-rank branch: a rank-r correction for the weight's quantization error (SVD of the residual).

With Q(W) the quantized weight, E = W - Q(W) is what quantization throws away. Its best rank-r
approximation (Eckart-Young: the truncated SVD) is kept in 16/32-bit as x -> (x A) B, so the layer
computes x Q(W)^T + x A B. The error ||E - AB^T||_F can only fall as r grows.
Optionally (deepcompressor / SVDQuant) alternate: Q = Q(W - L), L = SVD_r(W - Q), keeping the best.
"""
import torch
from torch import nn

from .kernels import native_bf16


class LowRankBranch(nn.Module):
    """x (..., in) -> (x @ A) @ B (..., out), computed in the branch's stored dtype where the device runs it
    natively; a bf16 branch on a CPU without native bf16 (emulated: ~3x slower than fp32) computes in fp32
    (`compute_dtype`)."""

    def __init__(self, in_features: int, out_features: int, rank: int, dtype=torch.float32):
        super().__init__()
        self.register_buffer("A", torch.zeros(in_features, rank, dtype=dtype))   # (in, r)
        self.register_buffer("B", torch.zeros(rank, out_features, dtype=dtype))  # (r, out)

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def compute_dtype(self, device: torch.device | str = "cpu") -> torch.dtype:
        """The dtype the branch multiplies in on `device`: its stored dtype, except bf16 without native bf16
        (the CPU profile's answer, `quant.kernels.native_bf16`), which computes in float32."""
        if self.A.dtype == torch.bfloat16 and not native_bf16(device):
            return torch.float32
        return self.A.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype(x.device)
        return ((x.to(dtype) @ self.A.to(dtype)) @ self.B.to(dtype)).to(x.dtype)

    def weight(self) -> torch.Tensor:
        """The correction as a weight matrix (out, in), float32."""
        return (self.A.float() @ self.B.float()).t()


EXACT_SVD_MAX_DIM = 1024  # larger residuals use a randomized SVD (SAO's 1536-wide layers: ~20x faster)
SVD_SEED = 0  # the randomized SVD's sketch: fixed, so the same weights always give the same branch


def truncated_svd(residual: torch.Tensor, rank: int):
    """Best rank-r factors of residual (out, in): A (in, r), B (r, out) with (A @ B).t() ~= residual.

    Exact (LAPACK) when min(out, in) <= EXACT_SVD_MAX_DIM, so the error falls strictly with rank; above,
    `torch.svd_lowrank` with 4 power iterations and a fixed seed (an exact SVD of one SAO ff layer takes ~20 s
    on 2 cores).
    When r exceeds min(out, in) the extra columns/rows are zero (the branch keeps its declared shape).
    """
    residual = residual.float()
    if min(residual.shape) <= EXACT_SVD_MAX_DIM or residual.is_meta:
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)  # u (out, k), vh (k, in)
    else:
        q = min(rank + 16, min(residual.shape))
        # svd_lowrank draws its sketch from the global RNG: seed a private copy of it, so the branch is
        # reproducible (caches and files assume the same inputs give the same model) and callers' RNG is untouched
        with torch.random.fork_rng(devices=[residual.device] if residual.is_cuda else []):
            torch.manual_seed(SVD_SEED)
            u, s, v = torch.svd_lowrank(residual, q=q, niter=4)
        vh = v.t()
    kept = min(rank, s.shape[0])
    root = s[:kept].sqrt()
    a = residual.new_zeros(residual.shape[1], rank, dtype=torch.float32)
    b = residual.new_zeros(rank, residual.shape[0], dtype=torch.float32)
    a[:, :kept] = vh[:kept].t() * root         # (in, r)
    b[:kept] = (u[:, :kept] * root).t()        # (r, out)
    return a, b


def fit_low_rank(weight: torch.Tensor, quantize_fn, rank: int, iterations: int = 1):
    """Split weight (out, in) into a quantized part and a rank-r correction.

    quantize_fn(w) -> Q(w) (float32, the dequantized weight). Returns (to_quantize, A, B): the
    weight to hand to the quantizer (W itself after one iteration, W - L after more) and the factors.
    With iterations > 1 the pair with the smallest ||W - Q - L||_F is kept.
    """
    weight = weight.float()
    to_quantize = weight
    best = None
    for _ in range(max(1, iterations)):
        residual = weight - quantize_fn(to_quantize)  # (out, in)
        a, b = truncated_svd(residual, rank)
        error = torch.linalg.matrix_norm(residual - (a @ b).t())
        if best is None or error < best[0]:
            best = (error, to_quantize, a, b)
        to_quantize = weight - (a @ b).t()
    _, to_quantize, a, b = best
    return to_quantize, a, b


def random_low_rank(weight: torch.Tensor, rank: int, seed: int = 0):
    """(W, A, B) with small random factors of fit_low_rank's shapes: for memory/speed runs, not fidelity."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(weight.shape[1], rank, generator=generator) * 0.01  # (in, r)
    b = torch.randn(rank, weight.shape[0], generator=generator) * 0.01  # (r, out)
    return weight.float(), a.to(weight.device), b.to(weight.device)
