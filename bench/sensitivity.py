"""Which layers suffer most from 4-bit weights, and the mixed-precision recipe that answers it.

Why: a skip list (or a "keep at 8 bit" list) should come from measurement, not folklore. The method:
record the full-precision DiT's real inputs at a few denoising steps of SAT's sampler (CFG batch included),
then quantize ONE linear layer (or one transformer block) at a time and measure the SNR of the DiT's output
against full precision on exactly those inputs. The lower the SNR, the more sensitive the layer.

    calls = record_dit_calls(model, lambda: run_sampler(model), keep=5)
    ranking = layer_sensitivity(quant.find_dit(model), quant.get_recipe("w4a8-dynamic"), calls)
    mixed_precision_(model, base=w4a8, high=w8a8, high_layers=[s.name for s in ranking[:4]])
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

import quant
from lab.generation import snr_db
from quant.model import matches_any, replace_module


@dataclass
class DitCall:
    """One recorded DiT forward: replay it with `dit(*call.args, **call.kwargs)`."""
    args: tuple
    kwargs: dict


@dataclass
class Sensitivity:
    name: str            # a layer name relative to the DiT, or a block prefix such as "transformer.layers.3"
    snr_db: float        # DiT output SNR vs full precision with only this layer (block) quantized
    parameters: int      # weights + biases quantized
    default_skip: bool   # in quant.DEFAULT_SKIP (kept in full precision by the presets)

    def to_dict(self) -> dict:
        return {"name": self.name, "snr_db": round(self.snr_db, 2), "parameters": self.parameters,
                "default_skip": self.default_skip}


def _detached(value):
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def record_dit_calls(model: nn.Module, forward_loop, *, keep: int = 5) -> list[DitCall]:
    """Run `forward_loop()` and keep `keep` of the DiT's forward calls, evenly spread over the run."""
    dit = quant.find_dit(model)
    calls: list[DitCall] = []

    def record(module, args, kwargs):
        calls.append(DitCall(_detached(args), _detached(kwargs)))

    handle = dit.register_forward_pre_hook(record, with_kwargs=True)
    try:
        forward_loop()
    finally:
        handle.remove()
    if not calls:
        raise ValueError("record_dit_calls: forward_loop() never called the DiT")
    picks = sorted({round(i * (len(calls) - 1) / max(1, keep - 1)) for i in range(min(keep, len(calls)))})
    return [calls[i] for i in picks]


@torch.no_grad()
def dit_outputs(dit: nn.Module, calls: list[DitCall]) -> list[torch.Tensor]:
    return [dit(*call.args, **call.kwargs).float() for call in calls]


def pooled_snr_db(reference: list[torch.Tensor], estimate: list[torch.Tensor]) -> float:
    """SNR over all tensors at once (their energies pooled), with `snr_db`'s 120 dB cap."""
    return snr_db(torch.cat([r.flatten() for r in reference]), torch.cat([e.flatten() for e in estimate]))


def quantize_only(dit: nn.Module, recipe: quant.Recipe, names: set[str],
                  stats: quant.CalibrationStats | None = None) -> nn.Module:
    """A copy of `dit` with only the linear layers in `names` quantized by `recipe` (its skip list ignored)."""
    others = tuple(name for name in quant.linear_layers(dit) if name not in names)
    quantized = copy.deepcopy(dit)
    quant.quantize_(quantized, recipe.replace(skip=others), stats)
    return quantized.eval()


def _parameters(layers: list[nn.Linear]) -> int:
    return sum(p.numel() for layer in layers for p in layer.parameters())


def layer_sensitivity(dit: nn.Module, recipe: quant.Recipe, calls: list[DitCall],
                      stats: quant.CalibrationStats | None = None, *, progress: bool = True) -> list[Sensitivity]:
    """Every linear layer of `dit`, quantized alone with `recipe`, most sensitive (lowest SNR) first."""
    groups = {name: [name] for name in quant.linear_layers(dit)}
    return _rank(dit, recipe, calls, stats, groups, progress, "layer sensitivity")


def block_sensitivity(dit: nn.Module, recipe: quant.Recipe, calls: list[DitCall],
                      stats: quant.CalibrationStats | None = None, *, progress: bool = True) -> list[Sensitivity]:
    """Every transformer block (all its linears, minus `recipe.skip`) quantized alone, most sensitive first."""
    groups: dict[str, list[str]] = {}
    for name in quant.quantization_targets(dit, recipe):
        parts = name.split(".")
        if len(parts) > 2 and parts[:2] == ["transformer", "layers"]:
            groups.setdefault(".".join(parts[:3]), []).append(name)
    return _rank(dit, recipe, calls, stats, groups, progress, "block sensitivity")


def _rank(dit, recipe, calls, stats, groups: dict[str, list[str]], progress: bool, label: str) -> list[Sensitivity]:
    reference = dit_outputs(dit, calls)
    layers = quant.linear_layers(dit)
    items = groups.items()
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc=f"{label} ({recipe.name})", unit="layer" if "layer" in label else "block")
    ranking = []
    for group, names in items:
        quantized = quantize_only(dit, recipe, set(names), stats)
        snr = pooled_snr_db(reference, dit_outputs(quantized, calls))
        skipped = all(matches_any(name, quant.DEFAULT_SKIP) for name in names)
        ranking.append(Sensitivity(group, snr, _parameters([layers[n] for n in names]), skipped))
        del quantized
    return sorted(ranking, key=lambda s: s.snr_db)


def mixed_precision_(model: nn.Module, base: quant.Recipe, high: quant.Recipe, high_layers: list[str],
                     stats: quant.CalibrationStats | None = None) -> nn.Module:
    """Quantize `model` in place with `base`, except `high_layers` (DiT-relative names), which get `high`.

    Example: W4A8 everywhere but the k most sensitive layers at W8A8. `high` must be a single-group recipe
    that needs no calibration (e.g. w8a8-dynamic): quant.quantize_ has no per-layer recipe overrides yet.
    """
    if high.needs_calibration or high.timestep_groups > 1:
        raise ValueError(f"mixed_precision_: the high-precision recipe must need no calibration (e.g. "
                         f"w8a8-dynamic), got '{high.name}' (method {high.method})")
    dit = quant.find_dit(model)
    linears = quant.linear_layers(dit)
    unknown = [name for name in high_layers if name not in linears]
    if unknown:
        raise ValueError(f"mixed_precision_: no linear layers named {unknown} in the DiT")
    quant.quantize_(model, base.replace(skip=base.skip + tuple(high_layers)), stats)
    for name in high_layers:
        replace_module(dit, name, quant.QuantLinear.from_float(linears[name], high))
    return model


def equal_memory_lora_rank(model: nn.Module, recipe: quant.Recipe, extra_bytes: int) -> int:
    """The low-rank branch rank whose bytes, over every layer `recipe` quantizes, come closest to `extra_bytes`."""
    element = torch.finfo(getattr(torch, recipe.lora_dtype)).bits // 8
    per_rank = sum((layer.in_features + layer.out_features) * element
                   for layer in quant.quantization_targets(model, recipe).values())
    return max(1, round(extra_bytes / per_rank))
