"""Memory and speed at Stable Audio Open's DiT shape, where the evaluated model is too small to tell.

Memory: the DiT is built on the meta device (no storage) and quantized there, so `quant.memory_report` gives
the bytes exactly, in a second. Speed: one DiT forward with random weights (`cfg.latent_tokens` latent tokens +
`cfg.cond_tokens` conditioning tokens, CFG batch 2), integer and simulated backends, median of `cfg.reps`; each
recipe's integer forwards alternate with fp32 forwards, so that its speed-up is a ratio of times measured together.
"""
from __future__ import annotations

import copy
import gc
import statistics
import time

import torch
from torch import nn

import quant
from bench.config import FLOAT_ROWS, SAO_CFG_SCALE, BenchConfig, as_recipe, with_progress
from bench.machine import interleaved_median_seconds, median_seconds
from bench.random_models import random_dit
from quant.attention import attention_modules
from quant.kernels import native_bf16


def memory_columns(report: quant.MemoryReport) -> dict:
    """A memory report as the results' memory columns."""
    return {"linear_bytes": report.linear_bytes, "linear_ratio_fp32": report.ratio_fp32,
            "resident_linear_bytes": report.resident_linear_bytes,
            "dit_bytes": report.model_bytes, "dit_ratio_fp32": report.model_bytes / report.model_fp32_bytes}


def memory_at_shape(shape: dict, rows, *, progress: bool = True) -> dict[str, dict]:
    """Bytes held by the DiT of `shape` for each row, from quant.memory_report on meta-device models."""
    dit = random_dit(shape, device="meta")
    groups = max([as_recipe(row).timestep_groups for row in rows if row not in FLOAT_ROWS] + [1])
    stats = quant.CalibrationStats.placeholder(dit, groups)
    out = {}
    for row in with_progress(rows, "memory at SAO shape", progress, unit="row"):
        out[row] = memory_columns(quant.memory_report(variant_of_dit(dit, row, stats)))
    return out


def variant_of_dit(dit: nn.Module, row: str | quant.Recipe, stats: quant.CalibrationStats) -> nn.Module:
    """fp32 -> the DiT itself; bf16 -> a bf16 copy; a recipe -> a quantized copy (random low-rank factors)."""
    if row == "fp32":
        return dit
    if row == "bf16":
        return copy.deepcopy(dit).to(torch.bfloat16)
    recipe = as_recipe(row).replace(lora_init="random")  # shape-only branch: see Recipe.lora_init
    model = copy.deepcopy(dit)
    quant.quantize_(model, recipe, stats if recipe.needs_calibration else None)
    return model


def in_compute_dtype(model: nn.Module, recipe: quant.Recipe) -> nn.Module:
    """A weight-only ("A16") model as it runs fastest: on a processor with native bf16, the whole DiT in bf16 like
    the bf16 row, its linears multiplying bf16 activations by their resident or packed weight with no cast around
    them (the scales stay float32); elsewhere as it is (fp32 activations are faster there)."""
    if recipe.quantizes_activations or not native_bf16():
        return model
    return model.to(torch.bfloat16)


def forward_inputs(shape: dict, latent_tokens: int, cond_tokens: int, seed: int = 0):
    """(x, t, kwargs) for one CFG forward of a DiT of `shape`: the DiT batches cond + uncond (batch 2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, shape["io_channels"], latent_tokens * shape.get("patch_size", 1), generator=g)
    kwargs = dict(cross_attn_cond=torch.randn(1, cond_tokens, shape["cond_token_dim"], generator=g),
                  global_embed=torch.randn(1, shape["global_cond_dim"], generator=g), cfg_scale=SAO_CFG_SCALE)
    return x, torch.tensor([0.5]), kwargs


def speed_at_shape(cfg: BenchConfig):
    """Yield (row, seconds) per row: {"float_s"} for fp32/bf16; for recipes {"integer_s", "fp32_paired_s"} (the
    median fp32 forward of the rounds interleaved with the integer ones) and, for W8A8, "simulated_s". Weight-only
    rows that run in bf16 (`in_compute_dtype`) are paired with the bf16 DiT instead ("bf16_paired_s"): the float
    path they must not lose to, timed beside them.

    One random DiT of cfg.dit_shape is built once; each row quantizes a copy of it, is timed, and is freed
    before the next (an fp32 SAO DiT is 4 GiB)."""
    dit = random_dit(cfg.dit_shape)
    x, t, kwargs = forward_inputs(cfg.dit_shape, cfg.latent_tokens, cfg.cond_tokens)

    def seconds(model, reps):
        return median_seconds(lambda: model(x, t, **kwargs), reps)

    def paired(model, reps):
        model(x, t, **kwargs)  # warm-up: prepares the integer weights
        base = "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "fp32"
        reference = variant_of_dit(dit, base, stats)
        return interleaved_median_seconds({"integer_s": lambda: model(x, t, **kwargs),
                                           f"{base}_paired_s": lambda: reference(x, t, **kwargs)}, reps)

    short_x, _, short_kwargs = forward_inputs(cfg.dit_shape, min(32, cfg.latent_tokens), cfg.cond_tokens, seed=1)
    stats = quant.calibrate(dit, lambda: [dit(short_x, torch.tensor([ti]), **short_kwargs)
                                          for ti in (0.1, 0.35, 0.6, 0.85)], progress=False)
    float_runs = {}
    for row in with_progress(cfg.rows, "speed at SAO shape", cfg.progress, unit="row"):
        # each variant is built, timed and dropped within one expression: one quantized copy alive at a time
        if row in FLOAT_ROWS:
            float_runs[row] = [seconds(variant_of_dit(dit, row, stats), cfg.reps)]
            timing = {"float_s": float_runs[row][0]}
        else:
            recipe = as_recipe(row).replace(backend="integer")
            timing = paired(in_compute_dtype(variant_of_dit(dit, recipe, stats), recipe), cfg.reps)
            if "simulated" in timed_backends(row):
                timing["simulated_s"] = seconds(variant_of_dit(dit, as_recipe(row).replace(backend="simulated"), stats),
                                                cfg.simulated_reps)
        gc.collect()
        yield row, timing
    # The baselines again at the end: on a shared machine a busy moment can slow one measurement, and the
    # faster of the two makes every speed-up conservative.
    # and the share of each float forward that linears and attention take: the int8 limits (bench.targets)
    for row in FLOAT_ROWS:
        model = variant_of_dit(dit, row, stats)
        float_runs[row].append(seconds(model, cfg.reps))
        shares = time_shares(model, lambda m=model: m(x, t, **kwargs), cfg.reps)
        yield row, {"float_s": min(float_runs[row]), "float_s_start_end": float_runs[row],
                    "linear_share": shares["linear"], "attention_share": shares["attention"]}


def linear_time_share(dit: nn.Module, forward, reps: int) -> float:
    """Median share of a float forward's time spent inside the linear layers the W8A8 presets quantize: it bounds
    what quantizing linears can buy (see `time_shares`)."""
    return time_shares(dit, forward, reps)["linear"]


@torch.no_grad()
def time_shares(dit: nn.Module, forward, reps: int) -> dict[str, float]:
    """Median shares of a float forward's time (timed with forward hooks): "linear", inside the linear layers
    the W8A8 presets quantize; "attention", inside the attention modules minus the linears within them (QK^T,
    softmax, PV, rotary embeddings, head reshapes). They bound what quantizing each can buy: the rest of the
    forward (norms, feed-forward activations, embeddings) runs in float whatever the recipe."""
    linears = {id(layer) for layer in quant.quantization_targets(dit, quant.get_recipe("w8a8-static")).values()}
    attentions = {id(m) for m in attention_modules(dit)}
    started, inside = {}, {"linear": 0.0, "attention": 0.0}
    depth = [0]  # attention modules entered and not left: linears inside them are not attention time

    def before(module, args):
        depth[0] += id(module) in attentions
        started[id(module)] = time.perf_counter()

    def after(module, args, output):
        elapsed = time.perf_counter() - started[id(module)]
        if id(module) in attentions:
            depth[0] -= 1
            inside["attention"] += elapsed
        else:
            inside["linear"] += elapsed
            inside["attention"] -= elapsed if depth[0] else 0.0

    handles = [h for m in dit.modules() if id(m) in linears | attentions
               for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        forward()  # warm-up
        shares = {"linear": [], "attention": []}
        for _ in range(reps):
            inside.update(linear=0.0, attention=0.0)
            start = time.perf_counter()
            forward()
            total = time.perf_counter() - start
            for kind in shares:
                shares[kind].append(inside[kind] / total)
    finally:
        for handle in handles:
            handle.remove()
    return {kind: statistics.median(values) for kind, values in shares.items()}


def timed_backends(row: str) -> tuple[str, ...]:
    """Integer for every recipe; simulated too for W8A8 recipes without a branch. The simulated path multiplies
    a cached dequantized float weight, so its cost does not depend on the weight bits (W4A8 costs what W8A8
    does) and weight-only simulated is a plain float matmul: timing those again would only cost minutes."""
    recipe = as_recipe(row)
    simulated = recipe.quantizes_activations and not recipe.lora_rank and recipe.w_bits == 8
    return ("integer", "simulated") if simulated else ("integer",)
