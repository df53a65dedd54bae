"""What a QuantLinear stores, chosen from calibration: smoothing vectors (alpha fixed or searched per layer),
the transformed weight copies to quantize, and the static activation scales.

For a recipe and one layer with weight W (out, in), timestep groups g = 0..G-1 and smoothing vectors
v = 0..V-1 (V = G with smoothing="per-group", else 1; group g uses vector v(g) = g or 0):

    activation seen by the quantizer   x'_g = R(x / s_v(g))        R = block Hadamard, or identity
    weight copy v to quantize          W'_v = R(W * s_v)           (x'_g W'^T = x W^T exactly, before rounding)
    static scale of group g            scale_g = clip(x'_g) / qmax  (`estimators.clip_value`)
    GPTQ input statistics of copy v    H_v = x'^T x' / rows         over the sample rows of the groups using v

The clip value's inputs: "max" of the raw or smoothed activation is the exact bound max_j(absmax_gj / s_j);
a rotated activation's max, and any percentile / MSE clip of a transformed activation, come from the
calibration sample rows of the group (transformed like x'_g); percentile / MSE of the raw activation use the
group's full |x| histogram; "holdout" always uses the rows (a two-fold split of them chooses the clip).

alpha="search": each smoothing vector's alpha is the value of `smooth.ALPHA_GRID` with the least squared
output error sum_g ||Q(x'_g) Q(W'_v)^T - x_g W^T||^2 over the sample rows x_g of the groups using it, with
the same quantizers the layer runs (static scales re-estimated for each candidate). The low-rank branch is
fitted afterwards and not part of the search.
"""
from dataclasses import dataclass

import torch

from .estimators import clip_value, histogram, holdout_clip
from .gptq import hessian_from_rows
from .observers import LayerCalibration
from .primitives import fake_quant, fake_quant_weight, per_token_scale, scale_from_absmax
from .recipes import Recipe
from .rotation import layer_block, rotate
from .smooth import search_alpha, smoothing_factors, smoothing_statistic


@dataclass
class LayerPlan:
    factors: torch.Tensor | None      # (V, in) smoothing divisors, or None
    weights: list[torch.Tensor]       # V (or 1) float32 (out, in) weight copies to quantize
    act_scale: torch.Tensor | None    # (G,) static activation scales, or None
    alphas: list[float] | None        # the alpha of each smoothing vector, or None
    hessians: list[torch.Tensor] | None = None  # V float64 (in, in) GPTQ input statistics, or None


def _missing(what: str, recipe: Recipe, name: str) -> ValueError:
    return ValueError(f"recipe '{recipe.name}' needs calibration {what} for layer '{name or '?'}', and these "
                      "statistics have none (a format-1 file, or calibrate(..., sample_rows=0)): recalibrate "
                      "with quant.calibrate")


def plan_layer(weight: torch.Tensor, recipe: Recipe, calib: LayerCalibration | None, name: str = "") -> LayerPlan:
    """Everything `QuantLinear.from_float` stores besides the quantized codes. weight: float32 (out, in)."""
    block = layer_block(recipe.rotation, weight.shape[1], name)
    device = weight.device
    groups = recipe.timestep_groups
    if not recipe.needs_calibration:  # dynamic, weight-only: no statistics, no smoothing
        return LayerPlan(None, [rotate(weight, block) if block else weight], None, None)
    if weight.is_meta:  # shapes only (memory reports): no values to estimate from
        vectors = recipe.weight_copies if recipe.smooths else 0
        factors = torch.ones(vectors, weight.shape[1], device=device) if recipe.smooths else None
        weights = [rotate(weight, block) if block else weight for _ in range(max(1, vectors))]
        act_scale = torch.ones(groups, device=device) if recipe.static_activations else None
        return LayerPlan(factors, weights, act_scale, [0.5] * vectors if recipe.smooths else None)
    if recipe.needs_samples and calib.samples is None:
        raise _missing("sample rows", recipe, name)
    if recipe.needs_histograms and calib.histogram is None:
        raise _missing("|x| histograms", recipe, name)

    absmax = calib.absmax.to(device).float()                     # (G, in)
    samples = None if calib.samples is None else [rows.to(device) for rows in calib.samples]
    vector_of = list(range(groups)) if recipe.weight_copies > 1 else [0] * groups

    def transformed_weight(s):
        w = weight if s is None else weight * s
        return rotate(w, block) if block else w

    def act_scales(factors) -> torch.Tensor:
        scales = []
        for g in range(groups):
            s = None if factors is None else factors[vector_of[g]]
            scales.append(_static_scale(recipe, absmax[g], s, None if samples is None else samples[g],
                                        None if calib.histogram is None else calib.histogram[g]))
        return torch.stack(scales)

    factors = alphas = None
    if recipe.smooths:
        stat = smoothing_statistic(calib.absmax, calib.timestep_absmax, recipe.smoothing).to(device)  # (V, in)
        alphas = []
        rows_ref = [rows @ weight.t() for rows in samples] if recipe.alpha_search else None
        chosen = []
        for v in range(stat.shape[0]):
            def error(alpha, v=v):
                s = smoothing_factors(stat[v], weight, alpha)
                w_q = _fake_quant_weight(transformed_weight(s), recipe)
                total = 0.0
                for g in (g for g in range(groups) if vector_of[g] == v):
                    x = _as_seen(samples[g], s, block)
                    if recipe.static_activations:
                        scale = _static_scale(recipe, absmax[g], s, samples[g], None)
                    else:
                        scale = per_token_scale(x, recipe.a_bits)
                    y = fake_quant(x, scale, recipe.a_bits) @ w_q.t()
                    total += float((y - rows_ref[g]).pow(2).sum())
                return total
            alpha = search_alpha(error) if recipe.alpha_search else float(recipe.alpha)
            alphas.append(alpha)
            chosen.append(smoothing_factors(stat[v], weight, alpha))
        factors = torch.stack(chosen)
    weights = [transformed_weight(s) for s in factors] if factors is not None else [transformed_weight(None)]
    act_scale = act_scales(factors) if recipe.static_activations else None
    hessians = None
    if recipe.rounds_by_hessian:
        hessians = []
        for v in range(len(weights)):
            s = None if factors is None else factors[v]
            rows = torch.cat([samples[g] for g in range(groups) if vector_of[g] == v])
            hessians.append(hessian_from_rows(_as_seen(rows, s, block)))
    return LayerPlan(factors, weights, act_scale, alphas, hessians)


def _as_seen(rows: torch.Tensor, s: torch.Tensor | None, block: int | None) -> torch.Tensor:
    """x' = R(x / s): calibration rows as the quantized matmul sees them (smoothing and rotation optional)."""
    x = rows if s is None else rows / s
    return rotate(x, block) if block else x


def _fake_quant_weight(w: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    return w if recipe.w_bits == 16 else fake_quant_weight(w, recipe.w_bits, recipe.group_size,
                                                            recipe.progressive_groups)


def _static_scale(recipe: Recipe, absmax: torch.Tensor, s: torch.Tensor | None, rows: torch.Tensor | None,
                  hist: torch.Tensor | None) -> torch.Tensor:
    """The calibrated per-tensor scale of one group's activation x' = R(x / s) (see the module docstring)."""
    block = layer_block(recipe.rotation, absmax.shape[-1])
    transformed = s is not None or block is not None
    bound = (absmax / s if s is not None else absmax).amax()    # exact max of the (smoothed) activation
    if recipe.estimator == "holdout":
        clip = holdout_clip(_as_seen(rows, s, block), recipe.a_bits)
    elif block is None and recipe.estimator == "max":
        clip = float(bound)
    elif not transformed:
        clip = clip_value(hist, float(bound), recipe.estimator, recipe.a_bits, recipe.percentile)
    else:
        x = _as_seen(rows, s, block)
        top = float(x.abs().amax()) if block else float(bound)  # a rotated activation's max: from the rows
        clip = clip_value(histogram(x), top, recipe.estimator, recipe.a_bits, recipe.percentile)
    return scale_from_absmax(torch.tensor(clip, device=absmax.device), recipe.a_bits)
