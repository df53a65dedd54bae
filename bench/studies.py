"""Studies beyond the paper's table, on the evaluated model (building blocks in `bench.sensitivity`):

- which layers and blocks suffer most at W4A8 (one layer or block quantized at a time, on recorded DiT calls);
- W4A8 with its k most sensitive layers at W8A8, against uniform W4A8 and against uniform W4A8 whose extra
  bytes go into a low-rank branch instead (equal memory);
- sqd with 1, 2, 4, ... timestep groups: fidelity against memory, also at SAO's shape.
"""
from __future__ import annotations

import quant
from bench import sensitivity
from bench.config import (
    MIXED_HIGH_RECIPE,
    RECORD_SEED,
    SENSITIVITY_RECIPE,
    SQD_SWEEP_RECIPE,
    BenchConfig,
    with_progress,
)
from bench.fidelity import FidelityContext, calibration_prompts
from bench.sampling import generate_batch
from bench.shape import memory_at_shape


def sensitivity_study(cfg: BenchConfig, context: FidelityContext) -> dict:
    """Per-layer and per-block sensitivity at W4A8, on DiT calls recorded from real sampling."""
    loaded = context.loaded
    prompts = calibration_prompts(2)
    calls = sensitivity.record_dit_calls(
        loaded.model, lambda: generate_batch(loaded.model, loaded, prompts, seed=RECORD_SEED, settings=context.settings),
        keep=cfg.sensitivity_calls)
    dit = quant.find_dit(loaded.model)
    recipe = quant.get_recipe(SENSITIVITY_RECIPE)
    layers = sensitivity.layer_sensitivity(dit, recipe, calls, progress=cfg.progress)
    blocks = sensitivity.block_sensitivity(dit, recipe, calls, progress=cfg.progress)
    return {"recipe": recipe.name, "dit_calls": len(calls), "layers": [s.to_dict() for s in layers],
            "blocks": [s.to_dict() for s in blocks]}


def mixed_precision_study(cfg: BenchConfig, context: FidelityContext, ranking: list[dict],
                          rows: dict[str, dict]) -> dict:
    """W4A8 with the k most sensitive quantized layers at W8A8, vs uniform W4A8 and vs uniform W4A8 whose
    extra bytes go into a low-rank branch instead (same memory)."""
    base, high = quant.get_recipe(SENSITIVITY_RECIPE), quant.get_recipe(MIXED_HIGH_RECIPE)
    targets = quant.quantization_targets(context.loaded.model, base)
    top = [entry["name"] for entry in ranking if entry["name"] in targets][:cfg.mixed_k]
    mixed = sensitivity.mixed_precision_(context.loaded.fresh_copy(), base, high, top)
    uniform_result = rows.get(base.name) if rows.get(base.name, {}).get("fidelity") else context.evaluate(base)[0]
    mixed_result = context.evaluate(f"{base.name} mixed", mixed)[0]
    extra = mixed_result["memory_model"]["linear_bytes"] - uniform_result["memory_model"]["linear_bytes"]
    rank = sensitivity.equal_memory_lora_rank(context.loaded.model, base, extra)
    lora = base.replace(name=f"{base.name}+lora-r{rank}", lora_rank=rank)
    lora_result = context.evaluate(lora)[0]
    entries = [(base.name, uniform_result), (f"{base.name}, top {len(top)} layers at {high.name}", mixed_result),
               (lora.name + " (same bytes as mixed)", lora_result)]
    return {"base": base.name, "high": high.name, "high_layers": top, "lora_rank_equal_memory": rank,
            "variants": [_study_entry(name, result) for name, result in entries]}


def sqd_sweep(cfg: BenchConfig, context: FidelityContext, rows: dict[str, dict]) -> list[dict]:
    """The per-group-copy SQD (SQD_SWEEP_RECIPE) with 1, 2, 4, ... timestep groups ("all" = one per calibrated
    timestep): fidelity vs memory."""
    base = quant.get_recipe(SQD_SWEEP_RECIPE)
    n_timesteps = len(context.stats.timesteps)
    groups = sorted({n_timesteps if g == "all" else min(int(g), n_timesteps) for g in cfg.sweep_groups})
    sao = _sao_memory_by_groups(base, groups, cfg.dit_shape)
    out = []
    for g in with_progress(groups, "sqd timestep-group sweep", cfg.progress, unit="setting"):
        recipe = base.replace(name=f"{base.name} G={g}", timestep_groups=g)
        known = rows.get(base.name, {})
        result = known if g == base.timestep_groups and known.get("fidelity") else context.evaluate(recipe)[0]
        out.append({"groups": g, "all_steps": g == n_timesteps, "sao_linear_ratio_fp32": sao[g],
                    **_study_entry(recipe.name, result)})
    return out


def _sao_memory_by_groups(recipe: quant.Recipe, groups: list[int], shape: dict) -> dict[int, float]:
    """SAO-shape linear-bytes ratio for each group count: measured on meta for G = 1, 2 and 4; beyond that
    linear in G (each group adds exactly one weight copy, one smoothing row and its scales), which G = 4 checks."""
    variants = {g: recipe.replace(name=f"{recipe.name} G={g}", timestep_groups=g) for g in (1, 2, 4)}
    measured = memory_at_shape(shape, list(variants.values()), progress=False)
    bytes_at = {g: measured[variant]["linear_bytes"] for g, variant in variants.items()}
    fp32_bytes = bytes_at[1] / measured[variants[1]]["linear_ratio_fp32"]
    per_group = bytes_at[2] - bytes_at[1]
    if bytes_at[1] + 3 * per_group != bytes_at[4]:
        raise RuntimeError("SAO memory is not linear in the number of timestep groups: measure every G instead")
    return {g: (bytes_at[1] + (g - 1) * per_group) / fp32_bytes for g in groups}


def _study_entry(name: str, result: dict) -> dict:
    fidelity = result.get("fidelity", {})
    return {"name": name, "linear_ratio_fp32": result["memory_model"]["linear_ratio_fp32"],
            "linear_bytes": result["memory_model"]["linear_bytes"], "snr_db": fidelity.get("snr_db"),
            "logmel_db": fidelity.get("logmel_db"), "trajectory_rel_error": fidelity.get("trajectory_rel_error"),
            "adherence": fidelity.get("adherence")}
