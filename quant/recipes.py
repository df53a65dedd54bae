"""Recipes: one frozen dataclass per quantization configuration, plus the named presets.

A preset name reads `w{W}a{A}-{method}[+lora]`, e.g. `w4a8-sqd+lora`; weight-only presets are
`w8a16` / `w4a16` (and `+lora`).
"""
import dataclasses
import hashlib
import json
from dataclasses import dataclass

BITS = (4, 8, 16)
ACTIVATION_METHODS = ("static", "dynamic", "smoothquant", "sqd")  # the methods that quantize activations
METHODS = ACTIVATION_METHODS + ("weight-only",)
BACKENDS = ("simulated", "integer")
LORA_DTYPES = ("float32", "float16", "bfloat16")
LORA_INITS = ("svd", "random")
ESTIMATORS = ("max", "percentile", "mse", "holdout")  # see quant/estimators.py
SMOOTHINGS = ("per-group", "max", "mean")  # see Recipe.smoothing
ROUNDINGS = ("nearest", "gptq", "adaround")  # see Recipe.weight_rounding
WEIGHT_GROUPS = ("float", "progressive")  # see Recipe.weight_groups
ATTENTION = ("float", "int8")  # see Recipe.attention
ALPHA_SEARCH = "search"

# Layers kept in full precision by default (fnmatch patterns on names relative to the DiT).
# Together they hold < 1 % of SAO's DiT weights, so skipping them costs almost no memory.
DEFAULT_SKIP = (
    # Conditioning embedders: run on one vector (timestep, global) or a few tokens per step, so there
    # is no speed to gain, and their output conditions every block: an error here reaches everywhere.
    "to_timestep_embed.*",
    "to_cond_embed.*",
    "to_global_embed.*",
    "to_prepend_embed.*",
    # I/O projections between the 64 latent channels and the model width: tiny, and project_out writes
    # the model's prediction directly, with no later layer to absorb its error.
    "transformer.project_in",
    "transformer.project_out",
    # Not skipped: `*.ff.ff.2` (feed-forward output after SwiGLU). A practitioner report found it fragile
    # under dynamic FP8 on SAO; the benchmark measures its sensitivity before anyone skips it by default.
)


@dataclass(frozen=True)
class Recipe:
    """One post-training quantization configuration of the DiT's linear layers.

    Args:
        name: label shown in reports (not part of `hash()`).
        w_bits: weight bits, 4 | 8 | 16 (16 = weights kept in float; simulated backend only).
        a_bits: activation bits, 4 | 8 | 16 (16 = weight-only).
        method: "static" (per-tensor activation scale from calibration), "dynamic" (per-token scale at
            run time), "smoothquant" (static + smoothing), "sqd" (dynamic + timestep-aware smoothing),
            "weight-only".
        alpha: SmoothQuant migration strength in [0, 1], or "search": per layer (and per smoothing vector), the
            value of `smooth.ALPHA_GRID` whose quantized output is closest to the float output on the layer's
            calibration sample rows (0.5 is on the grid, so the search is never worse than 0.5 there).
        timestep_groups: number of timestep groups; 1 = one for all timesteps. Static activations (static,
            smoothquant) get one calibrated per-tensor scale per group (no weight copy); smoothing recipes with
            smoothing="per-group" get one smoothing vector per group, each folded into its own weight copy.
        estimator: how a static activation scale is taken from calibration (static, smoothquant): "max" (the
            largest |x|), "percentile" (the `percentile`-th percentile of |x|), "mse" (the clip value with the
            least expected quantization error), "holdout" (a factor on the max of the calibration sample rows, chosen
            on rows held out from the range estimate: quant/estimators.py).
        percentile: in (0, 100], for estimator="percentile".
        smoothing: how smoothing vectors follow the timestep groups (smoothquant, sqd). "per-group": one vector
            per group from that group's per-channel max, each folded into its own weight copy (the paper's SQD:
            G weight copies). "max": one vector from the per-channel max over all timesteps (the worst case),
            one weight copy. "mean": one vector from the per-timestep channel profiles (each timestep's
            per-channel max divided by its own per-tensor max, so quiet steps count as much as loud ones),
            averaged and rescaled to the overall max, one weight copy.
        rotation: None, or the largest block size (a power of two) of a block-diagonal Hadamard rotation of the
            input channels: each layer uses the largest power of two up to it that divides its in_features. The
            weight is rotated once before quantizing, the activation at run time before it is quantized. See
            quant/rotation.py.
        weight_rounding: "nearest" (round each weight to its closest code), "gptq" (choose codes column by
            column so the layer's output error on the calibration sample rows is smallest: quant/gptq.py) or
            "adaround" (start from GPTQ's codes and learn each weight's rounding up or down against the same
            output error, never ending above GPTQ's: quant/adaround.py). Same scales, same stored format; "gptq"
            and "adaround" make any recipe a calibrated one. With the low-rank branch, the branch is fitted to the
            round-to-nearest residual first and GPTQ / AdaRound round W - branch.
        lora_rank: rank of the SVD low-rank branch on the residual weight error (0 = none).
        lora_iterations: alternations Q = Q(W - L), L = SVD_r(W - Q) (1 = plain SVD of W - Q(W)).
        lora_dtype: dtype the branch is stored and run in.
        lora_init: "svd" (the branch corrects the weight error: what the method is) or "random" (random
            factors of the same shape, skipping the SVD: only for measuring memory and speed, where a
            branch's values do not matter and the SVD of a 1536 x 12288 residual costs minutes on a CPU).
        group_size: per-group weight scales along the input dimension (None = per output channel).
            With float group scales the integer backend supports it for weight-only recipes only (a per-group
            float scale along K cannot be factored out of one integer matmul); progressive groups run on it.
        weight_groups: how group scales are held (with group_size): "float" (a float scale per group) or
            "progressive" (QServe's two levels, 4-bit weights with activation quantization only: a small integer
            scale per group and one float scale per output channel; the int8 GEMM multiplies the codes
            q4 x g, |q4 x g| <= 120, and rescales per channel, so the integer backend keeps its one matmul).
        memory_budget: None, or a fraction of the fp32 bytes of the layers the recipe quantizes (4-bit weights
            only): the layers whose 4-bit weights cost the most output error on their calibration sample rows per
            extra byte at 8 bits are kept at 8 bits (per output channel) while the whole stays within the budget
            (quant/mixed.py). Makes the recipe a calibrated one.
        attention: "float" (attention as the model computes it) or "int8" (QK^T and PV as int8 matmuls with a
            smoothed K, per-token and per-channel scales, on the recipe's backend: quant/attention.py).
        skip: fnmatch patterns of layer names (relative to the DiT) left in full precision.
        backend: "simulated" (fake quant in float: the reference) or "integer" (int8 matmul).
    """

    name: str = "custom"
    w_bits: int = 8
    a_bits: int = 8
    method: str = "dynamic"
    alpha: float | str = 0.5
    timestep_groups: int = 1
    lora_rank: int = 0
    lora_iterations: int = 1
    lora_dtype: str = "bfloat16"
    lora_init: str = "svd"
    group_size: int | None = None
    skip: tuple[str, ...] = DEFAULT_SKIP
    backend: str = "integer"
    estimator: str = "max"
    percentile: float = 99.99
    smoothing: str = "per-group"
    rotation: int | None = None
    weight_rounding: str = "nearest"
    weight_groups: str = "float"
    memory_budget: float | None = None
    attention: str = "float"

    def __post_init__(self):
        object.__setattr__(self, "skip", tuple(self.skip))
        for field_name in ("w_bits", "a_bits"):
            value = getattr(self, field_name)
            if value not in BITS:
                raise ValueError(f"Recipe.{field_name} must be one of {BITS}, got {value!r}")
        _check_choice("method", self.method, METHODS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("lora_dtype", self.lora_dtype, LORA_DTYPES)
        _check_choice("lora_init", self.lora_init, LORA_INITS)
        if (self.method == "weight-only") != (self.a_bits == 16):
            raise ValueError(f"Recipe.a_bits={self.a_bits} does not fit method '{self.method}': "
                             "a_bits=16 means weight-only, and weight-only means a_bits=16")
        if self.w_bits == 16 and self.a_bits == 16:
            raise ValueError("Recipe.w_bits=16 with a_bits=16 quantizes nothing")
        if self.w_bits == 16 and self.backend == "integer":
            raise ValueError("Recipe.w_bits=16 keeps float weights: use backend='simulated'")
        self._check_activations()
        if not isinstance(self.timestep_groups, int) or self.timestep_groups < 1:
            raise ValueError(f"Recipe.timestep_groups must be an integer >= 1, got {self.timestep_groups!r}")
        if self.timestep_groups > 1 and not self.calibrates_activations:
            raise ValueError(f"Recipe.timestep_groups={self.timestep_groups} needs a calibrated method "
                             f"(static, smoothquant, sqd), not '{self.method}'")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"Recipe.lora_rank must be an integer >= 0, got {self.lora_rank!r}")
        if self.lora_rank and self.w_bits == 16:
            raise ValueError("Recipe.lora_rank corrects weight error, but w_bits=16 leaves none")
        if not isinstance(self.lora_iterations, int) or self.lora_iterations < 1:
            raise ValueError(f"Recipe.lora_iterations must be an integer >= 1, got {self.lora_iterations!r}")
        self._check_weights()
        _check_choice("attention", self.attention, ATTENTION)

    def _check_activations(self) -> None:
        """Smoothing, static scale estimation and rotation: what is done to activations before quantizing."""
        if self.alpha == ALPHA_SEARCH:
            if not self.smooths:
                raise ValueError(f"Recipe.alpha='search' picks a smoothing strength: it needs method smoothquant "
                                 f"or sqd, not '{self.method}'")
        elif isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"Recipe.alpha must be a number in [0, 1] or 'search', got {self.alpha!r}")
        _check_choice("estimator", self.estimator, ESTIMATORS)
        if (isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float))
                or not 0.0 < self.percentile <= 100.0):
            raise ValueError(f"Recipe.percentile must be a number in (0, 100], got {self.percentile!r}")
        if self.estimator != "max" and not self.static_activations:
            raise ValueError(f"Recipe.estimator='{self.estimator}' sets a calibrated static activation scale: it "
                             f"needs method static or smoothquant, not '{self.method}' "
                             f"({'per-token scales at run time' if self.dynamic_activations else 'float activations'})")
        _check_choice("smoothing", self.smoothing, SMOOTHINGS)
        if self.smoothing != "per-group" and not self.smooths:
            raise ValueError(f"Recipe.smoothing='{self.smoothing}' chooses smoothing vectors: it needs method "
                             f"smoothquant or sqd, not '{self.method}'")
        if self.smoothing != "per-group" and self.dynamic_activations and self.timestep_groups > 1:
            raise ValueError(f"Recipe.smoothing='{self.smoothing}' keeps one smoothing vector and '{self.method}' "
                             f"scales activations per token at run time: nothing depends on the timestep "
                             f"group, so timestep_groups must be 1 (got {self.timestep_groups})")
        if self.rotation is not None:
            if (isinstance(self.rotation, bool) or not isinstance(self.rotation, int) or self.rotation < 2
                    or self.rotation & (self.rotation - 1)):
                raise ValueError(f"Recipe.rotation must be None or a power of two >= 2 (the Hadamard block), "
                                 f"got {self.rotation!r}")
            if not self.quantizes_activations:
                raise ValueError("Recipe.rotation rotates the activation before it is quantized: it needs a "
                                 "method that quantizes activations, not 'weight-only'")

    def _check_weights(self) -> None:
        """Rounding, memory budget and groups: how the weight codes are chosen and stored."""
        _check_choice("weight_rounding", self.weight_rounding, ROUNDINGS)
        if self.rounds_by_hessian and self.w_bits == 16:
            raise ValueError(f"Recipe.weight_rounding='{self.weight_rounding}' chooses weight codes, but w_bits=16 "
                             "keeps float weights")
        if self.memory_budget is not None:
            if (isinstance(self.memory_budget, bool) or not isinstance(self.memory_budget, (int, float))
                    or not 0.0 < self.memory_budget <= 1.0):
                raise ValueError(f"Recipe.memory_budget must be None or a fraction of the fp32 bytes in (0, 1], "
                                 f"got {self.memory_budget!r}")
            if self.w_bits != 4:
                raise ValueError(f"Recipe.memory_budget keeps some 4-bit layers at 8 bits: it needs w_bits=4, "
                                 f"got w_bits={self.w_bits}")
        _check_choice("weight_groups", self.weight_groups, WEIGHT_GROUPS)
        if self.group_size is not None:
            if not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2:
                raise ValueError(f"Recipe.group_size must be None or an even integer >= 2, got {self.group_size!r}")
            if self.backend == "integer" and self.method != "weight-only" and not self.progressive_groups:
                raise ValueError("Recipe.group_size with integer activations needs weight_groups='progressive' "
                                 "(integer group scales): per-group float weight scales along K cannot be "
                                 "factored out of one integer matmul. Or use backend='simulated'.")
        if self.progressive_groups and (self.group_size is None or self.w_bits != 4 or not self.quantizes_activations):
            raise ValueError(f"Recipe.weight_groups='progressive' holds 4-bit weights in groups of input channels for "
                             f"the int8 matmul: it needs w_bits=4, a group_size and quantized activations, got "
                             f"w_bits={self.w_bits}, group_size={self.group_size}, a_bits={self.a_bits}")

    @property
    def calibrates_activations(self) -> bool:
        """Static activation scales or smoothing factors come from calibration: static, smoothquant, sqd."""
        return self.method in ("static", "smoothquant", "sqd")

    @property
    def needs_calibration(self) -> bool:
        """Calibration statistics are needed: for the activations, for GPTQ's / AdaRound's input statistics, or for
        a memory budget's choice of 8-bit layers."""
        return self.calibrates_activations or self.rounds_by_hessian or self.memory_budget is not None

    @property
    def rounds_by_hessian(self) -> bool:
        """Weight codes chosen against the layer's input statistics H (GPTQ, AdaRound): H needs sample rows."""
        return self.weight_rounding in ("gptq", "adaround")

    @property
    def progressive_groups(self) -> bool:
        """4-bit codes with integer group scales and a float scale per output channel (`weight_groups`)."""
        return self.weight_groups == "progressive"

    @property
    def eight_bit_layer(self) -> "Recipe":
        """The recipe of the layers a memory budget keeps at 8 bits: the same with 8-bit per-channel weights."""
        return self.replace(w_bits=8, group_size=None, weight_groups="float", memory_budget=None)

    @property
    def smooths(self) -> bool:
        return self.method in ("smoothquant", "sqd")

    @property
    def dynamic_activations(self) -> bool:
        return self.method in ("dynamic", "sqd")

    @property
    def static_activations(self) -> bool:
        """A calibrated per-tensor activation scale (per timestep group): static, smoothquant."""
        return self.method in ("static", "smoothquant")

    @property
    def alpha_search(self) -> bool:
        return self.alpha == ALPHA_SEARCH

    @property
    def weight_copies(self) -> int:
        """Quantized weight copies per layer: one per timestep group with per-group smoothing, else one."""
        return self.timestep_groups if self.smooths and self.smoothing == "per-group" else 1

    @property
    def needs_samples(self) -> bool:
        """Calibration sample rows are needed: for an alpha search, for GPTQ / AdaRound, for a memory budget's choice
        of 8-bit layers, and for a static scale of a transformed (smoothed or rotated) activation other than the
        exact max bound of a smoothed one."""
        transformed = self.smooths or self.rotation is not None
        return (self.alpha_search or self.rounds_by_hessian or self.memory_budget is not None
                or (self.static_activations and (self.estimator == "holdout" or transformed and (
                    self.estimator != "max" or self.rotation is not None))))

    @property
    def needs_histograms(self) -> bool:
        """|x| histograms are needed: percentile / mse scales of the raw (untransformed) activation."""
        return self.estimator in ("percentile", "mse") and not self.smooths and self.rotation is None

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits != 16

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown Recipe fields: {sorted(unknown)}")
        return cls(**d)

    def hash(self) -> str:
        """Short stable id of everything that changes the quantized model (the name is left out)."""
        d = self.to_dict()
        d.pop("name")
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def replace(self, **changes) -> "Recipe":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_choice(field_name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"Recipe.{field_name} must be one of {choices}, got {value!r}")


def preset_name(w_bits: int, a_bits: int, method: str, lora: bool = False, variant: str | None = None) -> str:
    """The preset naming scheme: (4, 8, "sqd", True) -> "w4a8-sqd+lora"; weight-only -> "w8a16"; a variant of a
    method goes after it: (8, 8, "static", False, "rot") -> "w8a8-static-rot"."""
    name = f"w{w_bits}a{a_bits}" if method == "weight-only" else f"w{w_bits}a{a_bits}-{method}"
    return name + (f"-{variant}" if variant else "") + ("+lora" if lora else "")


SQD_TIMESTEP_GROUPS = 4  # the paper's SQD: smoothing adapts to the denoising timestep; 4 groups = 4 weight copies
STATIC_TIMESTEP_GROUPS = 4  # timestep-aware static variants: one activation scale per group, no weight copy
ROTATION_BLOCK = 128  # largest Hadamard block of the presets that rotate (a layer narrower in powers of two uses
#                       its own): on the demo model's held-out prompts 128 beat 32 (docs/fidelity.md)
LORA_RANK = 32

# The presets' recipe per method (fields besides bits and the low-rank branch). "sqd" is the single-copy
# successor of the paper's SQD: one smoothing vector (the per-channel max over all timesteps) folded into one
# weight, with rotated, per-token-quantized activations; on the demo model it is as faithful as the
# per-group-copy SQD (within 0.3 dB) at a quarter of its W8A8 memory (docs/fidelity.md). The paper's SQD stays
# as the "sqd-pergroup" variant.
METHOD_PRESETS = {
    "static": {},
    "dynamic": {},
    "smoothquant": {},
    "sqd": dict(smoothing="max", rotation=ROTATION_BLOCK),
    "weight-only": {},
}
# Variants: (method, variant) -> fields. Each exists at W8 and W4 (A8, or A16 for weight-only), with and without
# the low-rank branch.
VARIANT_PRESETS = {
    ("static", "mse"): dict(estimator="mse", timestep_groups=STATIC_TIMESTEP_GROUPS),
    ("static", "rot"): dict(rotation=ROTATION_BLOCK, timestep_groups=STATIC_TIMESTEP_GROUPS),
    ("dynamic", "rot"): dict(rotation=ROTATION_BLOCK),
    ("sqd", "pergroup"): dict(smoothing="per-group", timestep_groups=SQD_TIMESTEP_GROUPS),
    ("dynamic", "gptq"): dict(weight_rounding="gptq"),
    ("sqd", "gptq"): dict(METHOD_PRESETS["sqd"], weight_rounding="gptq"),
    ("weight-only", "gptq"): dict(weight_rounding="gptq"),
}
PROGRESSIVE_GROUP_SIZE = 8  # input channels per integer group scale (4 bits: +0.016x fp32 bytes, 0.149x in all at
#                             SAO's shape): the smallest group within 0.15x; calibration-like prompts rank 8 > 16 > 32
#                             (docs/fidelity.md)
# 4-bit variants (W4A8 only, no low-rank branch: on the demo model it adds nothing to them and would take the
# memory past 0.15x fp32): progressive groups, the integer path's group-wise 4-bit weights, rounded by GPTQ.
W4_VARIANT_PRESETS = {
    ("dynamic", "gptq-g8"): dict(group_size=PROGRESSIVE_GROUP_SIZE, weight_groups="progressive",
                                 weight_rounding="gptq"),
}


def _build_presets() -> dict[str, Recipe]:
    presets = {}
    for w_bits in (8, 4):
        for lora in (False, True):
            rank = LORA_RANK if lora else 0
            for method, fields in METHOD_PRESETS.items():
                a_bits = 16 if method == "weight-only" else 8
                name = preset_name(w_bits, a_bits, method, lora)
                presets[name] = Recipe(name, w_bits, a_bits, method, lora_rank=rank, **fields)
            for (method, variant), fields in VARIANT_PRESETS.items():
                a_bits = 16 if method == "weight-only" else 8
                name = preset_name(w_bits, a_bits, method, lora, variant)
                presets[name] = Recipe(name, w_bits, a_bits, method, lora_rank=rank, **fields)
    for (method, variant), fields in W4_VARIANT_PRESETS.items():
        name = preset_name(4, 8, method, False, variant)
        presets[name] = Recipe(name, 4, 8, method, **fields)
    return dict(sorted(presets.items()))


PRESETS: dict[str, Recipe] = _build_presets()


def get_recipe(name: str, **overrides) -> Recipe:
    """The preset called `name`, optionally with fields overridden (e.g. backend="simulated")."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
