"""Integer matmul kernels and the activation quantizers around them: every integer kernel choice lives here.

Three exact int8 x int8 paths, picked per device by `choose_kernel`:
  "onednn"    CPU profiles with an int8 dot product (AVX2, VNNI or AMX) where torch ships the oneDNN int8 linear ops:
              `onednn.qlinear_prepack` blocks the weight once (a resident copy, see `PreparedWeight`),
              `onednn.qlinear_pointwise` multiplies uint8 activations (codes + 128, zero point 128) by it and
              applies the per-output-channel weight scales (and, for static recipes, the scalar activation
              scale and the bias) in its epilogue. Signed int8 activations are accepted too but run oneDNN's
              reference kernel (~1000x slower, `ONEDNN_VERBOSE=1` shows `ref_int8`): always pass uint8.
              The op takes one scalar activation scale: per-token scales are applied to its output.
              Without VNNI (AVX2) its products could saturate: the codes go in as two halves (`_qlinear`),
              exact, at about fp32's speed (two GEMMs at ~2x fp32's rate each), except for weights within
              +-64 (4-bit codes), which cannot saturate and take one pass (~2x fp32's speed).
  "int_mm"    `torch._int_mm` (int8 x int8 -> int32, 2-D), any CPU; the weight is a transposed view. On x86 it
              runs no SIMD int8 kernel (a 514 x 1536 x 1536 product took 25x fp32's time on an AVX2 EPYC,
              where oneDNN's took 0.43x): the fallback where oneDNN's ops are missing or the CPU lacks AVX2.
  "cuda"      `torch._int_mm` on CUDA, zero-padded to its shape rules (M > 16; K, N multiples of 8).
All three give the same integer accumulators; only the float rescale's rounding differs. Each prepared form
gives the int8 codes back exactly (`int8_codes`), so a layer keeps that form alone (see quant/linear.py).

Forcing a path: `set_kernel("int_mm")` or the environment variable QUANT_INT8_KERNEL=auto|onednn|int_mm
(the function wins over the variable; both are read at every forward, so a change applies at once: layers
rebuild their prepared weight when the kernel they hold it for is not the one in force).

Weight-only layers (W8A16, W4A16) multiply float activations by the stored integer weight. Their paths,
picked by `choose_weight_only_kernel` (QUANT_WEIGHT_ONLY_KERNEL=auto|resident|packed|dequant):
  "resident"  the weight dequantized once to the compute dtype and kept, in place of the stored codes where it
              rounds back to them exactly (what it holds beyond them counts as cache),
              multiplied by `F.linear`: the float path's own matmul, so not slower than it (oneDNN's
              prepacked float linear was measured too, and was not reliably faster). auto's choice on CPU
              profiles without native bf16 (measured at SAO's shapes on an AVX512-VNNI Xeon without AVX512-BF16:
              "packed" ran ~2x slower than fp32 with bf16 activations and ~50x slower with fp32 ones) and
              on CUDA.
  "packed"    torch's weight-only kernels with bf16 activations: `_weight_int8pack_mm` (int8 codes and
              per-channel scales as stored) and `_weight_int4pack_mm_for_cpu` (codes repacked once by
              `_convert_weight_to_int4pack_for_cpu`; needs out_features % 16 == 0 and a scale group of
              32-256 input channels, else the layer uses "resident"). On CPU profiles with native bf16
              (AVX512-BF16 or AMX) auto times it against "resident" once per process and keeps the faster.
  "dequant"   nothing kept: every call dequantizes the stored codes (least memory, slowest).
Weight-only layers compute in bf16 where the device has native bf16 (the "A16" of W8A16), else in the
input's dtype; the result is cast back to the input's dtype.

CPU profile: every choice above that depends on the processor asks `cpu_profile()` and nothing else (so do
the low-rank branch's dtype and the demo model's training autocast). It is the detected CPU, or a named
profile (PROFILES) forced by `set_cpu_profile` / `using_cpu_profile` or by QUANT_CPU_PROFILE=auto|generic|
avx2|vnni|vnni-bf16|amx (the function wins over the variable; both are read at every forward), so that tests and
users can run as on another kind of CPU. A profile claiming a feature the CPU lacks still computes correctly:
oneDNN and torch dispatch on the real CPU, so it only runs slower (emulated bf16, oneDNN's plain int8
kernels). A profile fixes the int8 kernel, the dtype weight-only and bf16 low-rank layers compute in, and the
weight-only paths auto may pick (`weight_only_candidates`). Where two remain (native bf16), which is faster
depends on the CPU model rather than its features, so auto measures it once per process (tests assert the
choice is a candidate, and test each path forced).
"""
import contextlib
import functools
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .primitives import EPS, dequantize_weight, expand_group_scale, qmax

KERNEL_ENV = "QUANT_INT8_KERNEL"
KERNEL_CHOICES = ("auto", "onednn", "int_mm")
WEIGHT_ONLY_ENV = "QUANT_WEIGHT_ONLY_KERNEL"
WEIGHT_ONLY_CHOICES = ("auto", "resident", "packed", "dequant")
_INT4PACK_GROUPS = (256, 128, 64, 32)  # the scale group sizes `_weight_int4pack_mm_for_cpu` accepts
_U8_ZERO_POINT = 128  # oneDNN's fast x86 int8 kernels want unsigned activations: codes + 128
# AVX2's vpmaddubsw sums two uint8 x int8 products into int16: 2 x 255 x 64 = 32640 fits, 2 x 255 x 65 does not
_UNSATURATED_WEIGHT_MAX = 64
_ROUNDER = 1.5 * 2**23  # float32 x + this rounds x to an integer held in the low bits (`_rounded_codes`)
_forced: str | None = None
PROFILE_ENV = "QUANT_CPU_PROFILE"
PROFILES = {  # name -> (avx2, vnni, native_bf16, amx), the processor kinds the kernels were measured on
    "generic": (False, False, False, False),  # no SIMD int8 dot product (pre-AVX2 x86, other architectures)
    "avx2": (True, False, False, False),  # e.g. AMD EPYC Zen 2 / 3: AVX2's u8 x s8 dot product, no AVX512
    "vnni": (True, True, False, False),  # e.g. Intel Xeon Cascade Lake / Ice Lake: AVX512-VNNI, bf16 emulated
    "vnni-bf16": (True, True, True, False),  # e.g. AMD EPYC Zen 4: AVX512-VNNI and AVX512-BF16
    "amx": (True, True, True, True),  # Intel Xeon Sapphire Rapids and later: AMX int8/bf16 tiles (and VNNI)
}
PROFILE_CHOICES = ("auto", *PROFILES)
_forced_profile: str | None = None


# ---- processor profile -----------------------------------------------------------------------

@dataclass(frozen=True)
class CpuProfile:
    """The CPU features the kernel choices depend on. source: "detected", or what forced a named profile
    (`set_cpu_profile` or the QUANT_CPU_PROFILE variable)."""
    name: str
    avx2: bool  # AVX2's u8 x s8 dot product (vpmaddubsw), or better: oneDNN's int8 kernels are fast
    vnni: bool  # VNNI's fused int8 dot product (or AMX, which has it too): 4x fp32's multiply-adds per cycle
    native_bf16: bool  # bf16 matmuls in hardware (AVX512-BF16 or AMX); emulated ones run ~4x slower than fp32
    amx: bool
    source: str = "detected"

    @property
    def forced(self) -> bool:
        return self.source != "detected"

    def describe(self) -> str:
        """For reports: "vnni-bf16, detected" or "amx, forced by QUANT_CPU_PROFILE (this CPU: vnni-bf16)"."""
        if not self.forced:
            return f"{self.name}, detected"
        return f"{self.name}, forced by {self.source} (this CPU: {detected_cpu_profile().name})"

    def features(self) -> str:
        """For reports: "AVX2 yes, VNNI yes, native bf16 yes, AMX no"."""
        def yes(flag):
            return "yes" if flag else "no"
        return f"AVX2 {yes(self.avx2)}, VNNI {yes(self.vnni)}, native bf16 {yes(self.native_bf16)}, AMX {yes(self.amx)}"


@functools.cache
def detected_cpu_profile() -> CpuProfile:
    """This CPU's profile, from torch's own feature checks (the ones its kernels dispatch on)."""
    amx = _cpu_has("_is_amx_tile_supported")
    vnni = _cpu_has("_is_vnni_supported") or amx
    flags = (_cpu_has("_is_avx2_supported") or vnni, vnni, _cpu_has("_is_avx512_bf16_supported") or amx, amx)
    name = next((name for name, named_flags in PROFILES.items() if named_flags == flags), "bf16 without VNNI")
    return CpuProfile(name, *flags)


def set_cpu_profile(name: str | None) -> None:
    """Force a CPU profile (one of PROFILE_CHOICES); None hands the choice back to QUANT_CPU_PROFILE."""
    global _forced_profile
    if name is not None and name not in PROFILE_CHOICES:
        raise ValueError(f"CPU profile must be one of {PROFILE_CHOICES}, got {name!r}")
    _forced_profile = name


@contextlib.contextmanager
def using_cpu_profile(name: str | None):
    """Run a block under CPU profile `name` (None: the variable's), then restore what was forced before."""
    previous = _forced_profile
    set_cpu_profile(name)
    try:
        yield cpu_profile()
    finally:
        set_cpu_profile(previous)


def cpu_profile() -> CpuProfile:
    """The CPU profile in force: set_cpu_profile's, else QUANT_CPU_PROFILE's, else ("auto") the detected one."""
    name, source = _forced_profile, "set_cpu_profile"
    if name is None:
        name, source = os.environ.get(PROFILE_ENV, "auto").strip().lower() or "auto", PROFILE_ENV
        if name not in PROFILE_CHOICES:
            raise ValueError(f"{PROFILE_ENV}={name!r}: must be one of {', '.join(PROFILE_CHOICES)}")
    if name == "auto":
        return detected_cpu_profile()
    return CpuProfile(name, *PROFILES[name], source=source)


# ---- kernel choice ---------------------------------------------------------------------------

def onednn_available() -> bool:
    """True when this torch has the oneDNN int8 linear ops (x86 build with mkldnn)."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.onednn, "qlinear_prepack") and hasattr(torch.ops.onednn, "qlinear_pointwise"))


@functools.cache
def _cpu_has(check_name: str) -> bool:
    """torch.cpu's feature check `check_name` (e.g. "_is_vnni_supported"); False where this torch lacks it."""
    check = getattr(getattr(torch, "cpu", None), check_name, None)
    return bool(check and check())


def onednn_fast() -> bool:
    """True when oneDNN has a fast int8 kernel here: the ops exist and the CPU profile has an int8 dot product
    (AVX2 or better)."""
    return onednn_available() and cpu_profile().avx2


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """True when bf16 matmuls run natively on `device`: CUDA with bf16, or a CPU profile with native bf16.
    Without it a CPU emulates bf16 (~4x slower than fp32 on the Xeons measured)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_profile().native_bf16


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

    auto: "onednn" where its ops exist and the CPU profile has AVX2 or better (measured fastest there), else
    "int_mm". Forcing "onednn" where the ops are missing raises; forcing it on a CPU without AVX2 is allowed
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
    return f"{name} ({detail}; {how}; oneDNN ops {'present' if onednn_available() else 'absent'}; " \
           f"CPU profile {cpu_profile().describe()})"


def requested_weight_only_kernel() -> str:
    """The weight-only path asked for by QUANT_WEIGHT_ONLY_KERNEL (default "auto")."""
    name = os.environ.get(WEIGHT_ONLY_ENV, "auto").strip().lower() or "auto"
    if name not in WEIGHT_ONLY_CHOICES:
        raise ValueError(f"{WEIGHT_ONLY_ENV}={name!r}: must be one of {WEIGHT_ONLY_CHOICES}")
    return name


def weight_only_candidates(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """The paths auto may pick on `device`: "resident" alone on CUDA and without native bf16 (torch's packed
    kernels take bf16 activations: emulated, they ran ~2x slower than fp32); with native bf16 "resident" and
    "packed" (which one is faster depends on the CPU model, not on its features)."""
    device = torch.device(device)
    return ("resident", "packed") if device.type != "cuda" and native_bf16(device) else ("resident",)


def choose_weight_only_kernel(device: torch.device | str = "cpu", w_bits: int = 8) -> str:
    """The weight-only path on `device`: on CPU the requested one; for auto (and always on CUDA) the only
    candidate, or of two the faster measured once per process (`_timed_weight_only`)."""
    device = torch.device(device)
    name = requested_weight_only_kernel()
    if name != "auto" and device.type != "cuda":
        return name
    candidates = weight_only_candidates(device)
    return candidates[0] if len(candidates) == 1 else _timed_weight_only(w_bits)


def weight_only_dtype(kernel: str, device: torch.device | str, x_dtype: torch.dtype) -> torch.dtype:
    """The dtype a weight-only layer computes in: 16-bit inputs as they are; float32 inputs in bf16 where the
    device has native bf16 or the kernel ("packed") only runs fast in bf16, else float32."""
    if x_dtype != torch.float32:
        return x_dtype
    return torch.bfloat16 if kernel == "packed" or native_bf16(device) else torch.float32


def weight_only_kernel_name(device: torch.device | str = "cpu") -> str:
    """A line for reports: the weight-only path in force on `device` (W8A16 and W4A16) and its dtype."""
    device = torch.device(device)
    paths = {bits: choose_weight_only_kernel(device, bits) for bits in (8, 4)}
    how = "auto" if device.type == "cuda" or requested_weight_only_kernel() == "auto" else "forced"
    dtype = str(weight_only_dtype(paths[8], device, torch.float32)).removeprefix("torch.")
    shown = paths[8] if paths[8] == paths[4] else f"W8A16 {paths[8]}, W4A16 {paths[4]}"
    where = f"native bf16 {'yes' if native_bf16(device) else 'no'}" if device.type == "cuda" else \
        f"CPU profile {cpu_profile().describe()}"
    return f"{shown} ({how}; float32 inputs computed in {dtype}; {where})"


@functools.cache
def _timed_weight_only(w_bits: int) -> str:
    """ "packed" or "resident", whichever multiplies a (512, 1536) bf16 input by a 1536 x 1536 weight faster
    here (median of 3 after a warm-up): torch's packed kernels are built for few tokens, a DiT's forward
    has hundreds, and which one wins depends on the CPU."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-7, 8, (1536, 1536), dtype=torch.int8, generator=g)
    scale = torch.full((1536, 1), 0.01)
    x = torch.randn(512, 1536, generator=g)
    seconds = {}
    for kernel in ("resident", "packed"):
        prepared = WeightOnlyWeight(lambda: codes, scale, w_bits, kernel, torch.bfloat16)
        prepared.linear(x, None)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            prepared.linear(x, None)
            times.append(time.perf_counter() - start)
        seconds[kernel] = statistics.median(times)
    return min(seconds, key=seconds.get)


# ---- activation quantizers -------------------------------------------------------------------

def _absmax_per_token(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the last dim, (M, 1): two read-only reductions instead of abs() (write) + amax (read)."""
    return torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())


def _rounded_codes(quotient: torch.Tensor, unsigned: bool) -> torch.Tensor:
    """float32 quotients q, |q| < 2^22 -> int8 round(q) (half to even, as torch.round), or uint8 round(q) + 128.

    Two passes instead of round, cast and offset: adding 1.5 * 2^23 (+ 128) in place rounds q to an integer
    (float32 steps by 1 in [2^23, 2^24), and an even addend keeps ties at even), and that integer is the low
    byte of the sum's bits, which the int32 -> 8-bit cast keeps (it wraps). The sum overwrites `quotient`."""
    rounder = _ROUNDER + (_U8_ZERO_POINT if unsigned else 0)
    return quotient.add_(rounder).view(torch.int32).to(torch.uint8 if unsigned else torch.int8)


def quantize_per_token(x: torch.Tensor, bits: int, *, unsigned: bool = False):
    """Dynamic per-token quantization: x (M, K) -> codes (M, K), scale float32 (M, 1).

    Codes are int8, or uint8 holding code + 128 when `unsigned` (oneDNN). Same codes as
    `primitives.quantize(x, per_token_scale(x))`: the division is kept (a reciprocal multiply would move
    ties), and no clamp is needed since |x / scale| <= qmax by construction. One allocation for the
    quotient, rounded in place, one cast.
    """
    x = x.float()
    scale = _absmax_per_token(x).clamp_(min=EPS * qmax(bits)).div_(qmax(bits))
    return _rounded_codes(torch.div(x, scale), unsigned), scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor | float, bits: int, *,
                        unsigned: bool = False) -> torch.Tensor:
    """Static quantization with a calibrated scalar scale: x (M, K) -> codes int8 (or uint8 + 128) (M, K).
    Clamping before rounding gives the same codes as after (the bounds are integers)."""
    q = qmax(bits)
    return _rounded_codes(torch.div(x.float(), scale).clamp_(-q, q), unsigned)


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


@torch.no_grad()  # integer arithmetic has no gradient; in-place passes need no graph
def scaled_int_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale) + bias, computed as int_matmul(a, b) * b_scale * a_scale + bias.

    a int8 (M, K), a_scale (M, 1) or scalar; b int8 (K, N), b_scale (N,), bias (N,). Returns float32 (M, N).
    One conversion, then in-place passes (cheaper than int32 * float promotion or an outer product).
    """
    y = int_matmul(a, b).float().mul_(b_scale)
    return y.mul_(a_scale) if bias is None else torch.addcmul(bias, y, a_scale, out=y)


# ---- prepared weights -----------------------------------------------------------------------

def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class PreparedWeight:
    """One weight copy in the form `kernel` multiplies fastest: derived state, never saved.

    codes: int8 (N, K) weight codes. int_mm / cuda multiply them as a transposed view (the stored buffer
    itself for int8 weights; for int4 the unpacked codes, which this object then owns: `owns_codes`);
    onednn blocks them into its own opaque copy (`one_pass`: its codes lie within +-64, so their products by
    uint8 activations cannot saturate even without VNNI, see `_qlinear`). own_bytes: what this object
    allocated. replaces_stored: it holds its own full copy of the weight from which `int8_codes()` gives the
    codes back exactly, so the layer may free its stored buffer and keep one copy.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, kernel: str, *, owns_codes: bool):
        self.kernel, self.device = kernel, codes.device
        self.out_features, self.in_features = codes.shape
        self.scale = scale.float().contiguous()  # (N,)
        if kernel == "onednn":
            self.codes = None
            lowest, highest = codes.aminmax()
            self.one_pass = max(-int(lowest), int(highest)) <= _UNSATURATED_WEIGHT_MAX
            self.packed = torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)
            self.zero_points = torch.zeros(self.out_features, dtype=torch.long)
            self.own_bytes = codes.numel()  # the blocked copy: one byte per weight (opaque layout)
            self.replaces_stored = True
        elif kernel in ("int_mm", "cuda"):
            self.codes, self.packed = codes, None
            self.own_bytes = _nbytes(codes) if owns_codes else 0
            self.replaces_stored = owns_codes
        else:
            raise ValueError(f"unknown int8 kernel {kernel!r}")

    @torch.no_grad()
    def int8_codes(self, rows_per_pass: int = 512) -> torch.Tensor:
        """The int8 (N, K) codes this copy multiplies, exactly. oneDNN's blocked copy is opaque: it is
        multiplied by one-hot uint8 rows (129 at k, zero point 128, so x - 128 = e_k) with unit scales, which
        puts W[:, k] in the int32 accumulator and, |code| <= 127, exactly in the float32 output."""
        if self.codes is not None:
            return self.codes
        k, columns = self.in_features, []
        unit_scales = torch.ones(self.out_features)
        for start in range(0, k, rows_per_pass):
            rows = min(rows_per_pass, k - start)
            one_hot = torch.full((rows, k), _U8_ZERO_POINT, dtype=torch.uint8)
            one_hot[torch.arange(rows), torch.arange(start, start + rows)] += 1
            columns.append(torch.ops.onednn.qlinear_pointwise(
                one_hot, 1.0, _U8_ZERO_POINT, self.packed, unit_scales, self.zero_points, None,
                1.0, 0, torch.float32, "none", [], ""))
        return torch.cat(columns).t().round().to(torch.int8).contiguous()

    @torch.no_grad()  # integer arithmetic has no gradient; in-place passes need no graph
    def linear(self, x: torch.Tensor, bits: int, act_scale: torch.Tensor | None, bias: torch.Tensor | None):
        """Quantize x float32 (M, K) (per token when act_scale is None, else with the 0-d calibrated
        act_scale), multiply by the weight, rescale, add bias (float32 (N,)): float32 (M, N)."""
        if self.kernel == "onednn":
            if act_scale is None:
                codes, x_scale = quantize_per_token(x, bits, unsigned=True)
                y = _qlinear(codes, 1.0, self, None)
                # one in-place pass over the output for the per-token scale and the bias
                return y.mul_(x_scale) if bias is None else torch.addcmul(bias, y, x_scale, out=y)
            codes = quantize_per_tensor(x, act_scale, bits, unsigned=True)
            return _qlinear(codes, act_scale.item(), self, bias)
        if act_scale is None:
            codes, x_scale = quantize_per_token(x, bits)
        else:
            codes, x_scale = quantize_per_tensor(x, act_scale, bits), act_scale
        return scaled_int_matmul(codes, x_scale, self.codes.t(), self.scale, bias)


def _qlinear(codes_u8: torch.Tensor, x_scale: float, w: PreparedWeight, bias: torch.Tensor | None,
             split: bool | None = None):
    """oneDNN's int8 linear of uint8 codes (zero point 128). On x86 without VNNI its kernels multiply with AVX2's
    vpmaddubsw, which saturates each pair of u8 x s8 products at 32767 (255 x 127 x 2 = 64770 does not fit):
    there (`split` None: the real CPU and the weight decide, not the profile) the codes go in as two halves that
    cannot saturate, u = 2 h + l with h = u >> 1 (<= 127, zero point 64) and l = u & 1 (zero point 0), summed,
    unless the weight's codes are small enough that no pair saturates (`PreparedWeight.one_pass`)."""
    if split is None:
        split = not (detected_cpu_profile().vnni or w.one_pass)
    if not split:
        return _onednn_call(codes_u8, float(x_scale), _U8_ZERO_POINT, w, bias)
    high = _onednn_call(codes_u8 >> 1, 2.0 * float(x_scale), _U8_ZERO_POINT // 2, w, bias)
    return high.add_(_onednn_call(codes_u8 & 1, float(x_scale), 0, w, None))


def _onednn_call(codes_u8: torch.Tensor, x_scale: float, zero_point: int, w: PreparedWeight,
                 bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise(
        codes_u8, x_scale, zero_point, w.packed, w.scale, w.zero_points, bias, 1.0, 0, torch.float32, "none", [], "")


class WeightOnlyWeight:
    """A weight-only layer's weight in the form its path multiplies (see the module docstring): derived
    state, never saved. `kernel` is the path actually used ("packed" falls back to "resident" where the
    layer's shape or scale groups do not fit torch's packed kernels).

    stored_codes: a callable giving the layer's int8 codes (N, K) from its stored buffer (for int8 weights a
    view of it, no copy); "dequant" calls it at every forward. scale: float32 (N, S).
    own_bytes and replaces_stored: as for `PreparedWeight`. A resident float copy replaces the stored codes
    only where rounding it back gives them exactly (checked here: bf16 keeps 8 significant bits, so
    |code| * 2^-9 < 0.5 for |code| <= 127 holds, but fp16 loses the smallest scales to underflow).
    """

    def __init__(self, stored_codes, scale: torch.Tensor, bits: int, kernel: str, dtype: torch.dtype):
        if kernel not in WEIGHT_ONLY_CHOICES[1:]:
            raise ValueError(f"unknown weight-only kernel {kernel!r}")
        codes = stored_codes()
        self.stored_codes, self.scale = stored_codes, scale
        self.device, self.dtype, self.bits = codes.device, dtype, bits
        self.out_features, self.in_features = codes.shape
        self.int4_group = _int4pack_group(*codes.shape, scale.shape[1]) if bits == 4 else None
        if kernel == "packed" and (codes.device.type != "cpu" or (bits == 8 and scale.shape[1] != 1)
                                   or (bits == 4 and self.int4_group is None)):
            kernel = "resident"
        self.kernel, self.replaces_stored = kernel, False
        if kernel == "resident":
            self.weight = dequantize_weight(codes, scale).to(dtype)
            self.own_bytes = _nbytes(self.weight)
            self.replaces_stored = torch.equal(self.int8_codes(), codes)
        elif kernel == "packed" and bits == 8:
            self.packed, self.scales = codes, scale[:, 0].to(dtype)  # the stored codes, as they are
            self.own_bytes = _nbytes(self.scales)
        elif kernel == "packed":
            nibbles = codes.to(torch.int32).add_(8)  # the kernel's unsigned nibbles, zero point 8
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)
            groups = self.in_features // self.int4_group
            group_scales = scale.expand(-1, groups) if scale.shape[1] == 1 else scale  # (N, K / group)
            self.scales = _int4pack_scales(group_scales, dtype)
            self.own_bytes = _nbytes(self.packed, self.scales)
            self.replaces_stored = True
        else:
            self.own_bytes = 0

    @torch.no_grad()
    def int8_codes(self, rows_per_pass: int = 512) -> torch.Tensor:
        """The int8 (N, K) codes this path multiplies, exactly (where `replaces_stored`): the resident copy
        divided by its scales and rounded; the int4-packed copy multiplied by identity rows with unit scales
        and zero offsets, which gives each code as a small integer, exact in bf16."""
        if self.kernel == "resident":
            scale = expand_group_scale(self.scale, self.in_features)
            return torch.div(self.weight.float(), scale).round_().to(torch.int8)
        if self.kernel == "packed" and self.bits == 4:
            unit = _int4pack_scales(torch.ones(self.out_features, self.in_features // self.int4_group), self.dtype)
            columns = []
            for start in range(0, self.in_features, rows_per_pass):
                rows = torch.eye(self.in_features, dtype=self.dtype)[start:start + rows_per_pass]
                columns.append(torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.int4_group, unit))
            return torch.cat(columns).t().round().to(torch.int8).contiguous()
        return self.packed if self.kernel == "packed" else self.stored_codes()

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (M, K) @ W^T + bias, computed in self.dtype, returned in x's dtype."""
        xc = x.to(self.dtype)
        b = None if bias is None else bias.to(self.dtype)
        if self.kernel == "packed":
            if self.bits == 8:
                y = torch.ops.aten._weight_int8pack_mm(xc, self.packed, self.scales)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.packed, self.int4_group, self.scales)
            y = y if b is None else y.add_(b)
        else:
            weight = self.weight if self.kernel == "resident" else \
                dequantize_weight(self.stored_codes(), self.scale).to(self.dtype)
            y = F.linear(xc, weight, b)
        return y.to(x.dtype)


def _int4pack_scales(group_scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K / group) scales -> the (K / group, N, 2) scales-and-zeros `_weight_int4pack_mm_for_cpu` takes
    (zeros 0: its weight is (nibble - 8) * scale + zero)."""
    return torch.stack((group_scales.t(), torch.zeros_like(group_scales.t())), dim=-1).to(dtype)


def _int4pack_group(out_features: int, in_features: int, scales_per_row: int) -> int | None:
    """The scale group `_weight_int4pack_mm_for_cpu` can run this weight with, or None: per-channel scales
    are repeated over the largest group it accepts that divides K; per-group scales must be such a group."""
    if out_features % 16:
        return None
    if scales_per_row > 1:
        group = in_features // scales_per_row
        return group if group in _INT4PACK_GROUPS else None
    return next((g for g in _INT4PACK_GROUPS if in_features % g == 0), None)
