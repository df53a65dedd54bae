"""Mixed precision under a memory budget (`Recipe.memory_budget`): which layers of a 4-bit recipe keep 8-bit
weights so that the quantized layers hold at most `budget` x their fp32 bytes.

A layer's sensitivity is the relative output error its 4-bit weight causes on the layer's own calibration sample
rows, ||X (W - Q4(W))^T||^2 / ||X W^T||^2 (rows and weight rotated as the recipe rotates them), less the same
error at 8 bits. Errors of different layers reach the DiT's output alike, while a layer's cost at 8 bits grows
with its size: the layers with the largest error removed per extra byte are kept at 8 bits first (the greedy
answer to the knapsack), skipping any that no longer fit. Shapes without values (meta tensors: memory reports)
fill the budget in layer order.
"""
from __future__ import annotations

import torch
from torch import nn

from .linear import QuantLinear
from .observers import CalibrationStats
from .primitives import fake_quant_weight
from .recipes import Recipe
from .rotation import layer_block, rotate


def stored_bytes(linear: nn.Linear, recipe: Recipe) -> int:
    """Bytes a QuantLinear of `recipe` stores for `linear` (weights, scales, smoothing, low-rank branch; no bias,
    no run-time copies), counted on a meta-device layer."""
    layer = QuantLinear(linear.in_features, linear.out_features, recipe, bias=False, device="meta")
    held = layer.held_bytes()
    return sum(held[kind] for kind in ("weight", "scales", "smoothing", "lowrank"))


@torch.no_grad()
def output_error(weight: torch.Tensor, rows: torch.Tensor, recipe: Recipe) -> float:
    """Relative output error ||X (W - Q(W))^T||^2 / ||X W^T||^2 of `recipe`'s weight rounding on `rows`."""
    w, x = weight.float(), rows.float()
    block = layer_block(recipe.rotation, w.shape[1])
    if block is not None:
        w, x = rotate(w, block), rotate(x, block)
    error = x @ (w - fake_quant_weight(w, recipe.w_bits, recipe.group_size, recipe.progressive_groups)).t()
    return float(error.pow(2).sum() / (x @ w.t()).pow(2).sum().clamp_min(1e-30))


def eight_bit_layers(targets: dict[str, nn.Linear], recipe: Recipe, stats: CalibrationStats | None,
                     boundaries: list[float] | None) -> set[str]:
    """The layers `recipe.memory_budget` keeps at 8 bits (see the module docstring). ValueError when even all
    layers at 4 bits exceed the budget."""
    high = recipe.eight_bit_layer
    low_bytes = {name: stored_bytes(linear, recipe) for name, linear in targets.items()}
    extra = {name: stored_bytes(linear, high) - low_bytes[name] for name, linear in targets.items()}
    budget = recipe.memory_budget * sum(4 * linear.weight.numel() for linear in targets.values())
    spare = budget - sum(low_bytes.values())
    if spare < 0:
        raise ValueError(f"recipe '{recipe.name}' holds {sum(low_bytes.values()) / budget * recipe.memory_budget:.3f}"
                         f" x the fp32 bytes of its layers with every layer at {recipe.w_bits} bits, above its "
                         f"memory_budget {recipe.memory_budget}: raise the budget or lower the low-rank rank")
    gain = {}
    for name, linear in targets.items():
        if linear.weight.is_meta:
            gain[name] = 0.0
            continue
        rows = torch.cat(stats.layer(name, boundaries).samples)
        gain[name] = output_error(linear.weight, rows, recipe) - output_error(linear.weight, rows, high)
    chosen = set()
    for name in sorted(targets, key=lambda n: -gain[n] / extra[n]):  # stable: layer order among equals
        if extra[name] <= spare:
            chosen.add(name)
            spare -= extra[name]
    return chosen
