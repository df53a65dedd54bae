"""QuantLinear: a drop-in nn.Linear replacement that holds quantized weights and runs one of two backends.

Both backends hold the same buffers (so memory and files do not depend on the backend):
  qweight        int8 (C, out, in), or uint8 (C, out, in/2) for int4 (two codes per byte);
                 float (C, out, in) when w_bits=16
  weight_scale   float32 (C, out, S): S=1 per output channel, S=in/group_size per group
  weight_group_scale uint8 (C, out, ceil(in/group_size/2)): integer group scales of progressive groups, 1..15,
                 two per byte (else None); the GEMM's int8 codes are then q4 x g and weight_scale is per output
                 channel
  smooth         float32 (C, in)   SmoothQuant divisors, one row per weight copy (smoothquant, sqd)
  act_scale      float32 (G,)      calibrated per-tensor activation scale (static, smoothquant)
  timestep_boundaries float32 (G-1,) group edges in t
  lowrank        C LowRankBranch modules (lora_rank > 0)
G = recipe.timestep_groups; C = recipe.weight_copies: G when the recipe smooths per group (the smoothed
weight W * s_g differs per group, so each group needs its own quantized copy), else 1 (one smoothing vector
for all groups, or none). What goes into these buffers (smoothing vectors, alpha, static scales) is chosen
from calibration by `quant.plan.plan_layer`.
With `recipe.rotation` the weight copies hold Q(R(W * s)) and the activation is rotated after smoothing,
before it is quantized: R(x / s) (quant/rotation.py; nothing stored, R follows from the block size).

Backends:
  "simulated": activations and weights quantized-dequantized, float matmul: the reference semantics.
  "integer": activations quantized to int8 codes, int8 x int8 -> int32 matmul with the kernel
             `kernels.choose_kernel` picks for the device (oneDNN prepacked where the CPU profile,
             `kernels.cpu_profile`, has VNNI, `torch._int_mm` otherwise), one float rescale. The weight
             copy in use is prepared for the kernel on first forward and kept (derived state, never in the
             state dict, counted as "cache" by `held_bytes`): oneDNN's blocked copy, or for int4 the
             unpacked int8 codes, so W4A8 runs at W8A8's speed while the stored weight stays 4-bit.
             Weight-only recipes take the path `kernels.choose_weight_only_kernel` picks (a resident
             dequantized copy where no packed weight-only kernel is faster, see quant/kernels.py).
             Per-group weight scales only with weight-only recipes.
Smoothing divides x by s at run time (fused into the activation quantizer's input); the branch sees the
smoothed (and rotated), unquantized activation, matching the residual it was fitted on.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .adaround import hessian_codes
from .kernels import (
    PreparedWeight,
    WeightOnlyWeight,
    choose_kernel,
    choose_weight_only_kernel,
    weight_only_dtype,
)
from .lowrank import LowRankBranch, fit_low_rank, random_low_rank
from .observers import LayerCalibration
from .plan import plan_layer
from .primitives import (
    PROGRESSIVE_LOWEST,
    dequantize_weight,
    expand_group_scale,
    fake_quant,
    fake_quant_weight,
    pack_int4,
    pack_uint4,
    per_token_scale,
    progressive_codes,
    progressive_scales,
    progressive_step,
    quantize,
    quantize_weight,
    unpack_int4,
    unpack_uint4,
    weight_scale,
)
from .recipes import Recipe
from .rotation import layer_block, rotate
from .timestep import TimestepTracker, group_index

_SCALE_BUFFERS = ("weight_scale", "act_scale", "smooth", "timestep_boundaries")  # float32 whatever the model's dtype


class QuantLinear(nn.Module):
    """Quantized replacement for `nn.Linear`. Build with `QuantLinear.from_float(...)`.

    The constructor only allocates correctly shaped, empty buffers (used by `quant.load`).
    """

    def __init__(self, in_features: int, out_features: int, recipe: Recipe, *, bias: bool = True,
                 dtype=torch.float32, device=None):
        super().__init__()
        if recipe.w_bits == 4 and in_features % 2:
            raise ValueError(f"int4 weights are packed two per byte: in_features must be even, got {in_features}")
        if recipe.group_size is not None and in_features % recipe.group_size:
            raise ValueError(f"group_size {recipe.group_size} does not divide in_features {in_features}")
        self.rotation_block = layer_block(recipe.rotation, in_features)  # this layer's Hadamard block, or None
        self.in_features, self.out_features = in_features, out_features
        self.recipe = recipe
        self.dtype = dtype  # the original weight dtype: bias, float weights and the simulated cache use it
        self.tracker: TimestepTracker | None = None
        self._boundaries: list[float] | None = None  # Python copy of timestep_boundaries, filled lazily
        self._weight_cache = None  # simulated backend: (copy index, dtype, dequantized weight)
        self._prepared = None  # integer backend: (copy index, kernel, PreparedWeight) of the copy in use
        self._released = False  # True while qweight is a storage-less placeholder and _prepared holds the weight
        self.alphas: list[float] | None = None  # smoothing strength per copy chosen by from_float (not saved)

        groups = recipe.timestep_groups
        copies = recipe.weight_copies
        kwargs = dict(device=device)
        if recipe.w_bits == 16:
            self.register_buffer("qweight", torch.zeros(copies, out_features, in_features, dtype=dtype, **kwargs))
            self.register_buffer("weight_scale", None)
        else:
            packed_in = in_features // 2 if recipe.w_bits == 4 else in_features
            code_dtype = torch.uint8 if recipe.w_bits == 4 else torch.int8
            self.register_buffer("qweight", torch.zeros(copies, out_features, packed_in, dtype=code_dtype, **kwargs))
            groups_per_row = 1 if recipe.group_size is None else in_features // recipe.group_size
            scales_per_row = 1 if recipe.progressive_groups else groups_per_row
            self.register_buffer("weight_scale", torch.ones(copies, out_features, scales_per_row, **kwargs))
            self.register_buffer("weight_group_scale", torch.full((copies, out_features, (groups_per_row + 1) // 2), 0x11,
                                 dtype=torch.uint8, **kwargs) if recipe.progressive_groups else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kwargs) if bias else None)
        self.register_buffer("smooth", torch.ones(copies, in_features, **kwargs) if recipe.smooths else None)
        self.register_buffer("act_scale", torch.ones(groups, **kwargs) if recipe.static_activations else None)
        self.register_buffer("timestep_boundaries", torch.zeros(groups - 1, **kwargs) if groups > 1 else None)
        self.lowrank = nn.ModuleList(
            LowRankBranch(in_features, out_features, recipe.lora_rank, getattr(torch, recipe.lora_dtype)).to(device)
            for _ in range(copies)) if recipe.lora_rank else None
        self.register_load_state_dict_post_hook(_forget_derived_after_load)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, recipe: Recipe, layer_absmax: torch.Tensor | None = None,
                   boundaries: list[float] | None = None, tracker: TimestepTracker | None = None, *,
                   calibration: LayerCalibration | None = None, name: str = "") -> "QuantLinear":
        """Quantize `linear` following `recipe`.

        calibration: the layer's statistics split into the recipe's timestep groups
            (`CalibrationStats.layer(name, boundaries)`); required when `recipe.needs_calibration`.
        layer_absmax: instead of `calibration`, float (G, in) per-input-channel max |x| per timestep group
            (enough for recipes whose estimator is "max", without rotation or alpha search).
        boundaries: the G-1 group edges in t. tracker: where the layer reads the current timestep (needed when
        G > 1). name: the layer's name, for error messages.
        """
        groups = recipe.timestep_groups
        weight = linear.weight.detach().float()  # (out, in)
        layer = cls(linear.in_features, linear.out_features, recipe, bias=linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
        if recipe.needs_calibration:
            if calibration is None and layer_absmax is not None:
                calibration = LayerCalibration(layer_absmax, layer_absmax, torch.arange(layer_absmax.shape[0]))
            got = None if calibration is None else tuple(calibration.absmax.shape)
            if got != (groups, linear.in_features):
                raise ValueError(f"recipe '{recipe.name}' needs calibration statistics of shape "
                                 f"({groups}, {linear.in_features}), got {got}")
        if groups > 1:
            if boundaries is None or len(boundaries) != groups - 1:
                raise ValueError(f"recipe '{recipe.name}' has {groups} timestep groups: pass {groups - 1} boundaries")
            layer.timestep_boundaries.copy_(torch.tensor(boundaries))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())

        plan = plan_layer(weight, recipe, calibration, name)
        if plan.factors is not None:
            layer.smooth.copy_(plan.factors)
        for copy_index, w in enumerate(plan.weights):  # smoothed and rotated as the recipe says
            layer._store_weight(copy_index, w, None if plan.hessians is None else plan.hessians[copy_index])
        if plan.act_scale is not None:
            layer.act_scale.copy_(plan.act_scale)
        layer.alphas = plan.alphas
        layer.attach(tracker)
        return layer

    def _store_weight(self, copy_index: int, w: torch.Tensor, hessian: torch.Tensor | None = None) -> None:
        """Quantize one (smoothed) weight copy w (out, in), fitting the low-rank branch first if any; with a
        `hessian`, round what the branch leaves (W - branch) by the recipe's GPTQ or AdaRound (the branch's fit
        stays on the round-to-nearest residual: on the demo model that order beat fitting it to the GPTQ
        residual)."""
        recipe = self.recipe
        if recipe.w_bits == 16:
            self.qweight[copy_index] = w.to(self.dtype)
            return
        if self.lowrank is not None:
            def quantizer(m):
                return fake_quant_weight(m, recipe.w_bits, recipe.group_size, recipe.progressive_groups)
            if recipe.lora_init == "random":
                to_quantize, a, b = random_low_rank(w, recipe.lora_rank)
            else:
                to_quantize, a, b = fit_low_rank(w, quantizer, recipe.lora_rank, recipe.lora_iterations)
            self.lowrank[copy_index].A.copy_(a)
            self.lowrank[copy_index].B.copy_(b)
            w = to_quantize if hessian is None else w - (a @ b).t()
        if recipe.progressive_groups:  # 4-bit codes under the integer group scales, stored with them
            scale, group_scale = progressive_scales(w, recipe.group_size)
            step = progressive_step(group_scale, scale, w.shape[1])
            codes = (quantize(w, step, 4, PROGRESSIVE_LOWEST) if hessian is None
                     else hessian_codes(w, step, 4, hessian, recipe.weight_rounding, PROGRESSIVE_LOWEST))
            self.weight_group_scale[copy_index] = pack_uint4(F.pad(group_scale, (0, group_scale.shape[-1] % 2)))
            codes = progressive_codes(codes, group_scale)
        elif hessian is not None:
            scale = weight_scale(w.float(), recipe.w_bits, recipe.group_size)
            codes = hessian_codes(w, expand_group_scale(scale, w.shape[1]), recipe.w_bits, hessian,
                                  recipe.weight_rounding)
        else:
            codes, scale = quantize_weight(w, recipe.w_bits, recipe.group_size)
        self.qweight[copy_index] = self._stored_form(codes, copy_index)
        self.weight_scale[copy_index] = scale

    def attach(self, tracker: TimestepTracker | None) -> None:
        """Read the current timestep from `tracker` (layers with several timestep groups need one)."""
        self.tracker = tracker

    def _forget_derived(self) -> None:
        """Drop values computed from buffers (they change when a state dict is loaded)."""
        self._restore_stored()
        self._boundaries = None
        self._weight_cache = None
        self._prepared = None

    def __getstate__(self):
        """Copies and pickles leave the derived state behind (oneDNN's packed tensors cannot be copied)."""
        state = self.__dict__.copy()
        if self._released:
            state["_buffers"] = {**self._buffers, "qweight": self.stored_weight()}
        state.update(_boundaries=None, _weight_cache=None, _prepared=None, _released=False)
        return state

    # ---- one resident weight copy -------------------------------------------------------------
    # Once the integer backend has prepared a copy that gives the codes back exactly (oneDNN's blocked weight,
    # unpacked int4, a resident float copy, torch's int4-packed weight), the stored buffer's storage is freed
    # (`qweight` becomes a meta tensor of the same shape and dtype), so the layer holds one form of its weight.
    # Whatever reads the stored state gets the codes derived back: state_dict, copies, moves, weight_codes.

    def _release_stored(self) -> None:
        prepared = self._prepared[2]
        if prepared.replaces_stored and self.recipe.weight_copies == 1 and self.recipe.w_bits in (4, 8):
            self._buffers["qweight"] = torch.empty(self.qweight.shape, dtype=self.qweight.dtype, device="meta")
            self._released = True

    def stored_weight(self) -> torch.Tensor:
        """qweight with its values: the buffer, or derived back from the prepared copy when released."""
        if not self._released:
            return self.qweight
        return self._stored_form(self._prepared[2].int8_codes()).unsqueeze(0)

    def _weight_device(self) -> torch.device:
        """Where the layer's weight lives (the prepared copy's device while the stored buffer is released)."""
        return self._prepared[2].device if self._released else self.qweight.device

    def _restore_stored(self) -> None:
        """Give qweight its storage back (before the prepared copy goes)."""
        if self._released:
            self._buffers["qweight"] = self.stored_weight()
            self._released = False

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._released:
            destination[prefix + "qweight"] = self.stored_weight()

    def _load_from_state_dict(self, *args, **kwargs):
        self._restore_stored()  # a real buffer to load into (keys the state dict lacks keep their values)
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        """Moves and casts (`.to`, `.cuda`, `.bfloat16`). Scales stay float32 under a cast: they are the
        quantization's parameters, and a bf16 model (weight-only "A16") holds the same quantized weight. While
        released, the placeholder sits out the calls that leave an int8 tensor where it is; any other gets the
        stored codes back first (the prepared copy is rebuilt on the next forward)."""
        home = self._weight_device()
        target = fn(torch.empty(0, device=home))
        set_aside = {}
        if target.dtype != torch.float32:  # a cast: scales are only moved
            set_aside = {name: self._buffers[name] for name in _SCALE_BUFFERS if self._buffers.get(name) is not None}
        if self._released:
            probe = torch.empty(0, dtype=self.qweight.dtype, device=home)
            moved = fn(probe)
            if moved.device == probe.device and moved.dtype == probe.dtype:
                set_aside["qweight"] = self._buffers["qweight"]
            else:
                self._forget_derived()
        for name in set_aside:
            self._buffers[name] = None
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, tensor in set_aside.items():
                self._buffers[name] = tensor if name == "qweight" else tensor.to(target.device)

    # ---- views of the stored state ------------------------------------------------------------

    @property
    def n_groups(self) -> int:
        return self.recipe.timestep_groups

    def group_for(self, t: float | None = None) -> int:
        """Timestep group in force at `t` (default: the tracker's current timestep)."""
        if self.n_groups == 1:
            return 0
        if t is None and self.tracker is not None:
            t = self.tracker.t
        if t is None:
            raise ValueError(f"this layer uses {self.n_groups} timestep groups but no timestep is known: run it "
                             "inside the DiT forward (quant.quantize_ attaches a TimestepTracker) or pass t")
        if self._boundaries is None:
            self._boundaries = self.timestep_boundaries.tolist()
        return group_index(t, self._boundaries)

    def _copy_for(self, group: int) -> int:
        """The weight copy (and smoothing vector) timestep group `group` uses."""
        return group if self.recipe.weight_copies > 1 else 0

    def weight_codes(self, copy_index: int = 0) -> torch.Tensor:
        """The int8 codes (out, in) the GEMM multiplies, of one copy: the stored codes, int4 unpacked, and with
        progressive groups times their integer group scales (q4 x g, |q4 x g| <= 120). The one conversion from
        stored codes to the kernel's; `_stored_form` is its inverse."""
        if self._released:
            return self._prepared[2].int8_codes()
        codes = self.qweight[copy_index]
        if self.recipe.w_bits != 4:
            return codes
        codes = unpack_int4(codes)
        return codes if self.weight_group_scale is None else progressive_codes(codes, self._group_scale(copy_index))

    def _group_scale(self, copy_index: int) -> torch.Tensor:
        """Progressive groups' integer scales of one copy, unpacked: uint8 (out, in / group_size) (an odd count
        is packed with one padding nibble)."""
        return unpack_uint4(self.weight_group_scale[copy_index])[..., :self.in_features // self.recipe.group_size]

    def _stored_form(self, codes: torch.Tensor, copy_index: int = 0) -> torch.Tensor:
        """int8 codes (out, in) -> the stored qweight form (the inverse of `weight_codes`): progressive groups'
        codes are divided back by their integer group scales (exactly: they are multiples of them)."""
        if self.weight_group_scale is not None:
            group_scale = expand_group_scale(self._group_scale(copy_index), codes.shape[-1]).to(torch.int8)
            codes = torch.div(codes, group_scale, rounding_mode="trunc")
        return pack_int4(codes) if self.recipe.w_bits == 4 else codes

    def dequantized_weight(self, copy_index: int = 0, dtype=torch.float32) -> torch.Tensor:
        """Q(W * s) of one copy as a float matrix (out, in), without the low-rank branch."""
        if self.recipe.w_bits == 16:
            return self.qweight[copy_index].to(dtype)
        return dequantize_weight(self.weight_codes(copy_index), self.weight_scale[copy_index]).to(dtype)

    def effective_weight(self, t: float | None = None) -> torch.Tensor:
        """The float weight (out, in) this layer applies to the raw x at `t`: ((Q(R(W s)) + L) R) / s."""
        group = self.group_for(t)
        copy_index = self._copy_for(group)
        w = self.dequantized_weight(copy_index)
        if self.lowrank is not None:
            w = w + self.lowrank[copy_index].weight()
        if self.rotation_block is not None:
            w = rotate(w, self.rotation_block)  # R(x) M^T = x (M R)^T: R is symmetric and orthogonal
        if self.smooth is not None:
            w = w / self.smooth[copy_index]  # (x / s) M^T = x (M / s)^T, column-wise
        return w

    def smoothing_for(self, t: float | None = None) -> torch.Tensor | None:
        """Per-input-channel divisor s (in,) in force at timestep t; None without smoothing."""
        return None if self.smooth is None else self.smooth[self._copy_for(self.group_for(t))]

    def input_fake_quant(self, x: torch.Tensor, t: float | None = None) -> torch.Tensor:
        """The activation exactly as the quantized matmul sees it: smoothed, rotated, then quantized-dequantized."""
        group = self.group_for(t)
        return self._fake_quant_input(self._transformed(x.float(), group), group).to(x.dtype)

    def _transformed(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """R(x / s): the smoothing of `group`'s copy, then the rotation (each only when the recipe has it)."""
        if self.smooth is not None:
            x = x / self.smooth[self._copy_for(group)]
        return rotate(x, self.rotation_block) if self.rotation_block is not None else x

    def _fake_quant_input(self, x: torch.Tensor, group: int) -> torch.Tensor:
        bits = self.recipe.a_bits
        if not self.recipe.quantizes_activations:
            return x
        scale = per_token_scale(x, bits) if self.recipe.dynamic_activations else self.act_scale[group]
        return fake_quant(x, scale, bits)

    def _cached_weight(self, copy_index: int, dtype) -> torch.Tensor:
        """Simulated backend: dequantize once per copy/dtype, keep it until the group changes."""
        cache = self._weight_cache
        if cache is None or cache[0] != copy_index or cache[1] != dtype:
            cache = self._weight_cache = (copy_index, dtype, self.dequantized_weight(copy_index, dtype))
        return cache[2]

    def prepared_weight(self, copy_index: int, device: torch.device,
                        x_dtype: torch.dtype = torch.float32) -> PreparedWeight | WeightOnlyWeight:
        """Integer backend: weight copy `copy_index` prepared for the kernel in force on `device` (weight-only
        recipes: for the weight-only path in force and the dtype it computes `x_dtype` inputs in).

        Built on first use and kept (one copy at a time, like the simulated cache): rebuilt when the
        copy (timestep group), the kernel or the device changes, dropped by `_forget_derived`. Where the
        prepared copy can give the codes back exactly, the stored buffer's storage is freed meanwhile."""
        if self.recipe.quantizes_activations:
            key = choose_kernel(device)
        else:
            kernel = choose_weight_only_kernel(device, self.recipe.w_bits)
            key = (kernel, weight_only_dtype(kernel, device, x_dtype))
        cache = self._prepared
        if cache is None or cache[0] != copy_index or cache[1] != key or cache[2].device != self._weight_device():
            self._restore_stored()
            self._prepared = None  # free the old copy before building the new one
            cache = self._prepared = (copy_index, key, self._prepare(copy_index, key))
            self._release_stored()
        return cache[2]

    def _prepare(self, copy_index: int, key) -> PreparedWeight | WeightOnlyWeight:
        if self.recipe.quantizes_activations:
            return PreparedWeight(self.weight_codes(copy_index), self.weight_scale[copy_index, :, 0], key,
                                  owns_codes=self.recipe.w_bits == 4)
        kernel, dtype = key
        return WeightOnlyWeight(lambda: self.weight_codes(copy_index), self.weight_scale[copy_index],
                                self.recipe.w_bits, kernel, dtype)

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recipe = self.recipe
        group = self.group_for()
        copy_index = self._copy_for(group)
        x2 = x.reshape(-1, self.in_features)  # (tokens, in)

        if not recipe.quantizes_activations:  # weight-only: float activations times the stored weight
            if recipe.backend == "simulated":
                y = F.linear(x2, self._cached_weight(copy_index, x.dtype), self.bias)
            else:
                y = self.prepared_weight(copy_index, x2.device, x2.dtype).linear(x2, self.bias)
            branch_input = x2
        else:
            xs = self._transformed(x2.float(), group)  # (tokens, in) float32, smoothed and rotated
            bias = None if self.bias is None else self.bias.float()
            if recipe.backend == "simulated":
                y = F.linear(self._fake_quant_input(xs, group), self._cached_weight(copy_index, torch.float32), bias)
            else:
                act_scale = None if recipe.dynamic_activations else self.act_scale[group]
                y = self.prepared_weight(copy_index, xs.device).linear(xs, recipe.a_bits, act_scale, bias)
            branch_input = xs

        if self.lowrank is not None:
            y = y.add_(self.lowrank[copy_index](branch_input).to(y.dtype))
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    # ---- bookkeeping --------------------------------------------------------------------------

    def held_bytes(self) -> dict[str, int]:
        """Bytes this layer holds, by kind. "weight": the stored codes (what a file holds), even while their
        storage is freed. "cache": what derived copies resident now add to that (the simulated backend's
        dequantized weight; the integer backend's prepared weight beyond the stored codes it stands in for:
        nothing for oneDNN's packed int8 copy, half a byte per weight for int4 codes held as int8, the
        difference to a weight-only layer's resident float copy, or a packed copy's scales)."""
        def nbytes(*tensors):
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)
        cache = self._weight_cache[2] if self._weight_cache is not None else None
        prepared = self._prepared[2].own_bytes if self._prepared is not None else 0
        if self._released:  # the prepared copy stands in for the stored codes, whose storage is freed
            prepared -= nbytes(self.qweight)
        return {
            "weight": nbytes(self.qweight),
            "scales": nbytes(self.weight_scale, self.weight_group_scale, self.act_scale, self.timestep_boundaries),
            "smoothing": nbytes(self.smooth),
            "lowrank": nbytes(*(t for branch in (self.lowrank or []) for t in (branch.A, branch.B))),
            "bias": nbytes(self.bias),
            "cache": nbytes(cache) + prepared,
        }

    def extra_repr(self) -> str:
        r = self.recipe
        return (f"in_features={self.in_features}, out_features={self.out_features}, W{r.w_bits}A{r.a_bits} "
                f"{r.method}, groups={r.timestep_groups}, copies={r.weight_copies}, lora_rank={r.lora_rank}, "
                f"rotation={r.rotation}, estimator={r.estimator}, backend={r.backend}")


def _forget_derived_after_load(module: QuantLinear, incompatible_keys) -> None:
    module._forget_derived()
