"""Memory report: the bytes a model holds, against its fp32 and fp16 originals.

Counted for every linear layer of the DiT: integer (or packed int4) weights, every weight copy of
timestep-aware recipes, scales, smoothing vectors, low-rank branches and biases: the *stored* bytes, what a
file holds and what the ratios compare. *Resident* bytes are what the layers occupy after a forward: the
integer backend keeps one form of each weight, the kernel's (its stored codes' storage is freed where that
form gives them back exactly), so resident = stored for int8 weights on the int8 kernels and for torch's
packed weight-only kernels (plus their scales); the kind "cache" is what a run-time form holds beyond the
stored codes: half a byte per weight for int4 codes held as int8 for the int8 GEMM, the difference to a
weight-only layer's resident float copy, a second copy where a recipe keeps one weight per timestep group, the
simulated backend's dequantized weight. Layers left in float count their weights in their dtype.
"""
from dataclasses import dataclass, field

from torch import nn

from .linear import QuantLinear
from .model import find_dit

KINDS = ("weight", "scales", "smoothing", "lowrank", "bias", "cache")


@dataclass
class LayerMemory:
    name: str
    quantized: bool
    held: dict[str, int]          # bytes by kind (see KINDS)
    parameters: int               # weight + bias elements of the original linear

    @property
    def total(self) -> int:
        """Stored bytes (derived caches excluded)."""
        return sum(value for kind, value in self.held.items() if kind != "cache")

    @property
    def resident(self) -> int:
        """Stored bytes plus derived caches: what the layer occupies after a forward."""
        return sum(self.held.values())

    @property
    def fp32(self) -> int:
        return 4 * self.parameters

    @property
    def fp16(self) -> int:
        return 2 * self.parameters


@dataclass
class MemoryReport:
    layers: list[LayerMemory]
    model_bytes: int              # what the module passed in stores (parameters and buffers)
    model_fp32_bytes: int         # the same module with every float tensor and original linear in fp32
    recipe: str | None = None
    parts: dict[str, int] = field(default_factory=dict)  # bytes per top-level child (SAT: DiT, conditioner, autoencoder)
    by_kind: dict[str, int] = field(init=False)

    def __post_init__(self):
        self.by_kind = {kind: sum(layer.held[kind] for layer in self.layers) for kind in KINDS}

    @property
    def linear_bytes(self) -> int:
        """Stored bytes of the linear layers (what the ratios compare)."""
        return sum(layer.total for layer in self.layers)

    @property
    def resident_linear_bytes(self) -> int:
        """What the linears occupy now: stored bytes plus what run-time weight forms add beyond them."""
        return sum(layer.resident for layer in self.layers)

    @property
    def linear_fp32_bytes(self) -> int:
        return sum(layer.fp32 for layer in self.layers)

    @property
    def linear_fp16_bytes(self) -> int:
        return sum(layer.fp16 for layer in self.layers)

    @property
    def ratio_fp32(self) -> float:
        """Linear-layer bytes held / the same linears in fp32."""
        return self.linear_bytes / self.linear_fp32_bytes

    @property
    def ratio_fp16(self) -> float:
        return self.linear_bytes / self.linear_fp16_bytes

    def to_markdown(self, per_layer: bool = False) -> str:
        mib = 2 ** 20
        lines = [
            f"Memory report{f' ({self.recipe})' if self.recipe else ''}: "
            f"{sum(layer.quantized for layer in self.layers)} of {len(self.layers)} linear layers quantized",
            "",
            "| | MiB | x fp32 | x fp16 |",
            "|---|---:|---:|---:|",
            f"| linear layers, stored | {self.linear_bytes / mib:.1f} | {self.ratio_fp32:.3f} | {self.ratio_fp16:.3f} |",
            f"| linear layers, resident (run-time weight forms) | {self.resident_linear_bytes / mib:.1f} | "
            f"{self.resident_linear_bytes / self.linear_fp32_bytes:.3f} | "
            f"{self.resident_linear_bytes / self.linear_fp16_bytes:.3f} |",
            f"| module passed in (all of it) | {self.model_bytes / mib:.1f} | "
            f"{self.model_bytes / self.model_fp32_bytes:.3f} | {2 * self.model_bytes / self.model_fp32_bytes:.3f} |",
            f"| linears fp32 / fp16 | {self.linear_fp32_bytes / mib:.1f} / {self.linear_fp16_bytes / mib:.1f} | | |",
            "",
            "Linear-layer bytes by kind: " + ", ".join(
                f"{kind} {value / mib:.1f} MiB" for kind, value in self.by_kind.items() if value),
        ]
        if len(self.parts) > 1:
            lines += ["", "Parts of the module: " + ", ".join(f"{name} {value / mib:.1f} MiB"
                                                             for name, value in self.parts.items())]
        if per_layer:
            lines += ["", "| layer | quantized | bytes | x fp32 |", "|---|---|---:|---:|"]
            lines += [f"| {layer.name} | {'yes' if layer.quantized else 'no'} | {layer.total} | "
                      f"{layer.total / layer.fp32:.3f} |" for layer in self.layers]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def memory_report(model: nn.Module) -> MemoryReport:
    """Bytes held per DiT linear layer, for the whole module passed in and for each of its top-level parts
    (works on meta-device models too)."""
    root = find_dit(model)
    layers, recipes = [], set()
    for name, module in root.named_modules():
        if isinstance(module, QuantLinear):
            recipes.add(module.recipe.name)
            parameters = module.out_features * module.in_features + (module.out_features if module.bias is not None else 0)
            layers.append(LayerMemory(name, True, module.held_bytes(), parameters))
        elif isinstance(module, nn.Linear):
            held = dict.fromkeys(KINDS, 0)
            held["weight"] = _nbytes(module.weight)
            held["bias"] = _nbytes(module.bias) if module.bias is not None else 0
            layers.append(LayerMemory(name, False, held, sum(p.numel() for p in (module.weight, module.bias) if p is not None)))
    if not layers:
        raise ValueError("memory_report: the model has no linear layers")

    # Whole model: unique tensors, with QuantLinear state replaced by its original fp32 linear in the baseline.
    quant_tensor_ids = {id(t) for m in model.modules() if isinstance(m, QuantLinear)
                        for t in list(m.parameters()) + list(m.buffers())}
    seen, held, fp32 = set(), 0, 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        held += _nbytes(tensor)
        if id(tensor) not in quant_tensor_ids:
            fp32 += tensor.numel() * 4 if tensor.is_floating_point() else _nbytes(tensor)
    fp32 += sum(layer.fp32 for layer in layers if layer.quantized)
    parts = {name: _held(child) for name, child in model.named_children()}
    return MemoryReport(layers, held, fp32, ", ".join(sorted(recipes)) or None, parts)


def _held(module: nn.Module) -> int:
    """Stored bytes of a module: its unique parameters and buffers."""
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(_nbytes(t) for t in tensors.values())
