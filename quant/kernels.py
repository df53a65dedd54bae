"""Integer matmul kernels and the activation quantizers around them: every integer kernel choice lives here.

Three exact int8 x int8 paths, picked per device by `choose_kernel`:
  "onednn"    x86 CPUs with VNNI or AMX where torch ships the oneDNN int8 linear ops:
              `onednn.qlinear_prepack` blocks the weight once (a resident copy, see `prepare_weight`),
              `onednn.qlinear_pointwise` multiplies uint8 activations (codes + 128, zero point 128) by it and
              applies the per-output-channel weight scales (and, for static recipes, the scalar activation
              scale and the bias) in its epilogue. Signed int8 activations are accepted too but run oneDNN's
              reference kernel (~1000x slower, `ONEDNN_VERBOSE=1` shows `ref_int8`): always pass uint8.
              The op takes one scalar activation scale: per-token scales are applied to its output.
  "int_mm"    `torch._int_mm` (int8 x int8 -> int32, 2-D), any CPU; the weight is a transposed view.
  "cuda"      `torch._int_mm` on CUDA, zero-padded to its shape rules (M > 16; K, N multiples of 8).
All three give the same integer accumulators; only the float rescale's rounding differs.

Forcing a path: `set_kernel("int_mm")` or the environment variable QUANT_INT8_KERNEL=auto|onednn|int_mm
(the function wins over the variable; both are read at every forward, so a change applies at once: layers
rebuild their prepared weight when the kernel they hold it for is not the one in force).
"""
import os

import torch
import torch.nn.functional as F

from .primitives import EPS, qmax

KERNEL_ENV = "QUANT_INT8_KERNEL"
KERNEL_CHOICES = ("auto", "onednn", "int_mm")
_U8_ZERO_POINT = 128  # oneDNN's fast x86 int8 kernels want unsigned activations: codes + 128
_forced: str | None = None


# ---- kernel choice ---------------------------------------------------------------------------

def onednn_available() -> bool:
    """True when this torch has the oneDNN int8 linear ops (x86 build with mkldnn)."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.onednn, "qlinear_prepack") and hasattr(torch.ops.onednn, "qlinear_pointwise"))


def onednn_fast() -> bool:
    """True when oneDNN has a fast int8 kernel here: the ops exist and the CPU has VNNI or AMX int8."""
    if not onednn_available():
        return False
    cpu = getattr(torch, "cpu", None)
    def has(flag):
        check = getattr(cpu, flag, None)
        return bool(check and check())
    return has("_is_vnni_supported") or has("_is_amx_tile_supported")


def set_kernel(name: str | None) -> None:
    """Force the CPU int8 kernel ("onednn", "int_mm", "auto"); None hands the choice back to QUANT_INT8_KERNEL."""
    global _forced
    if name is not None and name not in KERNEL_CHOICES:
        raise ValueError(f"int8 kernel must be one of {KERNEL_CHOICES}, got {name!r}")
    _forced = name


def requested_kernel() -> str:
    """The CPU kernel asked for: set_kernel's, else QUANT_INT8_KERNEL's, else "auto"."""
    if _forced is not None:
        return _forced
    name = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if name not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV}={name!r}: must be one of {KERNEL_CHOICES}")
    return name


def choose_kernel(device: torch.device | str = "cpu") -> str:
    """The int8 kernel used on `device`: "cuda" on CUDA devices; on CPU "onednn" or "int_mm".

    auto: "onednn" where its ops exist and the CPU has VNNI/AMX (measured fastest there), else "int_mm".
    Forcing "onednn" where the ops are missing raises; forcing it on a CPU without VNNI/AMX is allowed
    (correct, slow: for tests)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda"
    if device.type != "cpu":
        raise ValueError(f"no int8 kernel for device type {device.type!r}")
    name = requested_kernel()
    if name == "onednn" and not onednn_available():
        raise RuntimeError(f"{KERNEL_ENV}/set_kernel asks for 'onednn' but this torch lacks the oneDNN int8 "
                           "linear ops: use 'auto' or 'int_mm'")
    if name == "auto":
        return "onednn" if onednn_fast() else "int_mm"
    return name


def kernel_name(device: torch.device | str = "cpu") -> str:
    """A line for reports: the kernel in force on `device` and why."""
    name = choose_kernel(device)
    if name == "cuda":
        return "cuda (torch._int_mm, zero-padded)"
    how = "auto" if requested_kernel() == "auto" else "forced"
    detail = {"onednn": "oneDNN qlinear, prepacked weights, uint8 activations",
              "int_mm": "torch._int_mm"}[name]
    return f"{name} ({detail}; {how}; oneDNN ops {'present' if onednn_available() else 'absent'}, " \
           f"VNNI/AMX {'yes' if onednn_fast() else 'no'})"


# ---- activation quantizers -------------------------------------------------------------------

def _absmax_per_token(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the last dim, (M, 1): two read-only reductions instead of abs() (write) + amax (read)."""
    return torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())


def _offset(codes_int8: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-127, 127] -> uint8 codes + 128, in place on the bytes (wrap-around add is exact)."""
    return codes_int8.view(torch.uint8).add_(_U8_ZERO_POINT)


def quantize_per_token(x: torch.Tensor, bits: int, *, unsigned: bool = False):
    """Dynamic per-token quantization: x (M, K) -> codes (M, K), scale float32 (M, 1).

    Codes are int8, or uint8 holding code + 128 when `unsigned` (oneDNN). Same codes as
    `primitives.quantize(x, per_token_scale(x))`: the division is kept (a reciprocal multiply would move
    ties), and no clamp is needed since |x / scale| <= qmax by construction. One allocation for the
    quotient, rounded in place, one cast.
    """
    x = x.float()
    scale = _absmax_per_token(x).clamp_(min=EPS * qmax(bits)).div_(qmax(bits))
    codes = torch.div(x, scale).round_().to(torch.int8)
    return (_offset(codes) if unsigned else codes), scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor | float, bits: int, *,
                        unsigned: bool = False) -> torch.Tensor:
    """Static quantization with a calibrated scalar scale: x (M, K) -> codes int8 (or uint8 + 128) (M, K)."""
    q = qmax(bits)
    codes = torch.div(x.float(), scale).round_().clamp_(-q, q).to(torch.int8)
    return _offset(codes) if unsigned else codes


# ---- integer matmuls ------------------------------------------------------------------------

def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a int8 (M, K) @ b int8 (K, N) -> int32 (M, N). `b` may be a transposed view of (N, K) weights."""
    return padded_int_mm(a, b) if a.is_cuda else torch._int_mm(a, b)


def cuda_padding(m: int, k: int, n: int) -> tuple[int, int, int]:
    """Zeros to add to (M, K, N) so CUDA `_int_mm` accepts the shapes: M > 16, K and N multiples of 8."""
    return max(0, 17 - m), -k % 8, -n % 8


def padded_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`_int_mm` with zero padding to CUDA's shape rules (M > 16; K, N multiples of 8); exact."""
    m, k = a.shape
    n = b.shape[1]
    pad_m, pad_k, pad_n = cuda_padding(m, k, n)
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


# ---- prepared weights -----------------------------------------------------------------------

class PreparedWeight:
    """One weight copy in the form `kernel` multiplies fastest: derived state, never saved.

    codes: int8 (N, K) weight codes (for int_mm / cuda: used as the transposed view; for onednn: only to
    build the packed copy, not kept). extra_bytes: what this object holds beyond the stored buffers.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, kernel: str, *, owns_codes: bool):
        self.kernel, self.device = kernel, codes.device
        self.out_features, self.in_features = codes.shape
        self.scale = scale.float().contiguous()  # (N,)
        if kernel == "onednn":
            self.codes = None
            self.packed = torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)
            self.zero_points = torch.zeros(self.out_features, dtype=torch.long)
            self.extra_bytes = codes.numel()  # the blocked copy: one byte per weight (opaque layout)
        elif kernel in ("int_mm", "cuda"):
            self.codes, self.packed = codes, None
            self.extra_bytes = codes.numel() * codes.element_size() if owns_codes else 0
        else:
            raise ValueError(f"unknown int8 kernel {kernel!r}")

    def linear(self, x: torch.Tensor, bits: int, act_scale: torch.Tensor | None, bias: torch.Tensor | None):
        """Quantize x float32 (M, K) (per token when act_scale is None, else with the 0-d calibrated
        act_scale), multiply by the weight, rescale, add bias (float32 (N,)): float32 (M, N)."""
        if self.kernel == "onednn":
            if act_scale is None:
                codes, x_scale = quantize_per_token(x, bits, unsigned=True)
                y = _qlinear(codes, 1.0, self, None).mul_(x_scale)
                return y if bias is None else y.add_(bias)
            codes = quantize_per_tensor(x, act_scale, bits, unsigned=True)
            return _qlinear(codes, act_scale.item(), self, bias)
        if act_scale is None:
            codes, x_scale = quantize_per_token(x, bits)
        else:
            codes, x_scale = quantize_per_tensor(x, act_scale, bits), act_scale
        return scaled_int_matmul(codes, x_scale, self.codes.t(), self.scale, bias)


def _qlinear(codes_u8: torch.Tensor, x_scale: float, w: PreparedWeight, bias: torch.Tensor | None):
    return torch.ops.onednn.qlinear_pointwise(
        codes_u8, float(x_scale), _U8_ZERO_POINT, w.packed, w.scale, w.zero_points, bias,
        1.0, 0, torch.float32, "none", [], "")
