"""Integer matmul and the activation quantizers around it: every integer kernel choice lives here.

The one integer GEMM is `torch._int_mm` (int8 x int8 -> int32, 2-D only), the kernel torchao and
optimum-quanto build on. It runs any shape on CPU; on CUDA it wants M > 16 and K, N multiples of 8,
so `int_matmul` zero-pads there (zeros add nothing to the sums) and slices the result.
Choices measured on the project's 2-core CPU (figures in quant/README.md): per-token max via
abs().amax(), in-place round, and a float conversion followed by in-place multiplies for the rescale.
"""
import torch
import torch.nn.functional as F

from .primitives import EPS, qmax


def quantize_per_token(x: torch.Tensor, bits: int):
    """Dynamic per-token quantization: x (M, K) -> codes int8 (M, K), scale float32 (M, 1).

    Same codes as `primitives.quantize(x, per_token_scale(x))` with one pass less: no clamp is needed
    since |x / scale| <= qmax by construction. (abs().amax() measured 5x faster than an inf-norm here.)
    """
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=EPS * qmax(bits)).div_(qmax(bits))
    return torch.div(x, scale).round_().to(torch.int8), scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Static quantization with a calibrated scalar scale: x (M, K) -> codes int8 (M, K)."""
    q = qmax(bits)
    return torch.div(x.float(), scale).round_().clamp_(-q, q).to(torch.int8)


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a int8 (M, K) @ b int8 (K, N) -> int32 (M, N). `b` may be a transposed view of (N, K) weights."""
    return padded_int_mm(a, b) if a.is_cuda else torch._int_mm(a, b)


def padded_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`_int_mm` with zero padding to CUDA's shape rules (M > 16; K, N multiples of 8); exact."""
    m, k = a.shape
    n = b.shape[1]
    pad_m, pad_k, pad_n = max(0, 17 - m), -k % 8, -n % 8
    if not (pad_m or pad_k or pad_n):
        return torch._int_mm(a, b)
    a = F.pad(a, (0, pad_k, 0, pad_m))
    b = F.pad(b.t(), (0, pad_k, 0, pad_n)).t()  # keep b column-major, like the weight view
    return torch._int_mm(a, b)[:m, :n]


def scaled_int_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale) + bias, computed as int_matmul(a, b) * b_scale * a_scale + bias.

    a int8 (M, K), a_scale (M, 1) or scalar; b int8 (K, N), b_scale (N,), bias (N,). Returns float32 (M, N).
    One conversion, then in-place multiplies (cheaper than int32 * float promotion or an outer product).
    """
    y = int_matmul(a, b).float().mul_(b_scale).mul_(a_scale)
    return y if bias is None else y.add_(bias)
