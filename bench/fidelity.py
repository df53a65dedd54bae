"""Fidelity on the evaluated model: every row generates the same prompts from the same seed as full precision,
and is compared with it (audio SNR, log-mel distance, relative error of x per step, prompt adherence, time).

The figure of record comes from held-out prompts (assets/fidelity_prompts.txt), none of which calibration saw:
static scales fitted to the calibration prompts can look far better on prompts like them than on new ones, so
each row also generates a few calibration prompts at the evaluation seed and reports the gap between the two
(`held_out_gap_db`), and the worst caption family. Calibration prompts are stratified over the caption grammar's
families, levels and sound words (`calibration_prompts`).

The evaluated model is the embedded demo model by default (`--model...` for another; `--quick` a tiny random
model built like the demo one). The full-precision reference and the calibration statistics are made once, in
`prepare_fidelity`, and shared with the studies through `FidelityContext`.
"""
from __future__ import annotations

import copy
import gc
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

import quant
from bench.config import EVAL_SEED, FLOAT_ROWS, BenchConfig, as_recipe, with_progress
from bench.random_models import randomize_weights
from bench.sampling import Batch, generate_batch
from bench.shape import memory_columns
from lab import sat
from lab.audio import log_mel_distance
from lab.calibration import calibrate
from lab.generation import snr_db
from lab.resources import ASSETS, CALIBRATION_PROMPTS, EMBEDDED_DIR, read_prompts
from lab.sat import LoadedModel, SamplerSettings

FIDELITY_PROMPTS = ASSETS / "fidelity_prompts.txt"  # the held-out prompts: the fidelity figure of record

# --quick evaluates a tiny random model built like the embedded one (its tokenizer, raw 16 kHz audio, 256-sample
# patches, prompt cross-attention), so the test runs the same code path in a fraction of the compute.
QUICK_MODEL_CONFIG = {
    "model_type": "diffusion_cond", "sample_size": 32768, "sample_rate": 16000, "audio_channels": 1,
    "model": {
        "io_channels": 1,
        "conditioning": {"configs": [{"id": "prompt", "type": "lut",
                                      "config": {"tokenizer_name": "tokenizer", "max_length": 8}}], "cond_dim": 64},
        "diffusion": {"cross_attention_cond_ids": ["prompt"], "type": "dit", "diffusion_objective": "v",
                      "config": {"io_channels": 1, "patch_size": 256, "embed_dim": 64, "depth": 2, "num_heads": 2,
                                 "cond_token_dim": 64, "project_cond_tokens": False,
                                 "transformer_type": "continuous_transformer"}},
    },
}


def quick_model(seed: int = 0) -> LoadedModel:
    """QUICK_MODEL_CONFIG with the embedded model's tokenizer, sampler settings and live random weights."""
    config = sat.resolve_tokenizer_paths(QUICK_MODEL_CONFIG, EMBEDDED_DIR)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = randomize_weights(sat.build_model(config))
    return LoadedModel(model=model, config=config, model_id="quick: tiny random model", sample_rate=16000,
                       sample_size=32768, sampling=sat.read_generation(EMBEDDED_DIR)[0])


def _by_family(prompts: list[str]) -> dict[str, list[str]]:
    """Prompts grouped by demo_model.corpus family (corpus order, file order within a family)."""
    from demo_model import corpus

    groups: dict[str, list[str]] = {family: [] for family in corpus.FAMILIES}
    for prompt in dict.fromkeys(prompts):
        groups.setdefault(caption_family(prompt), []).append(prompt)
    return {family: items for family, items in groups.items() if items}


def _round_robin(groups: dict[str, list[str]], per_group: int | None = None) -> list[str]:
    """The first item of every group, then the second of every group, ...: any prefix spans the groups."""
    rounds = max(map(len, groups.values()), default=0) if per_group is None else per_group
    return [items[i] for i in range(rounds) for items in groups.values() if i < len(items)]


def fidelity_prompts(per_family: int, limit: int | None = None) -> list[str]:
    """The held-out fidelity prompts: the first `per_family` of each family of assets/fidelity_prompts.txt, family
    by family in turns (at most `limit`). None of them is a calibration prompt (tests/bench/test_fidelity_prompts)."""
    return _round_robin(_by_family(read_prompts(FIDELITY_PROMPTS)), per_family)[:limit]


def _stratified_order(prompts: list[str]) -> list[str]:
    """`prompts` reordered so that each next one has the level (soft, normal, loud) seen least so far, then the
    sound word (waveform, noise colour, drum, sweep direction) seen least: any prefix varies both."""
    from demo_model import corpus

    def strata(prompt: str) -> tuple:
        caption = corpus.parse_caption(prompt)
        return ("level", caption.level), ("word", caption.waveform or caption.colour or caption.instrument
                                          or caption.direction)

    remaining, ordered, seen = list(prompts), [], {}
    while remaining:
        pick = min(remaining, key=lambda p: tuple(seen.get(stratum, 0) for stratum in strata(p)))
        remaining.remove(pick)
        ordered.append(pick)
        for stratum in strata(pick):
            seen[stratum] = seen.get(stratum, 0) + 1
    return ordered


def calibration_prompts(count: int) -> list[str]:
    """`count` prompts of assets/calibration_prompts.txt, stratified: one per caption family in turns, and within a
    family the levels in turns, so that any count spreads over the families and levels of the caption grammar
    (static activation scales calibrated on tones alone would miss the ranges of noise, drums and sweeps)."""
    groups = {family: _stratified_order(items) for family, items in _by_family(read_prompts(CALIBRATION_PROMPTS)).items()}
    return _round_robin(groups)[:count]


def calibration_like_prompts(calibration: list[str], per_family: int, limit: int | None = None) -> list[str]:
    """The first `per_family` calibration prompts of each family (at most `limit`): generated at the evaluation's
    seed, they give the figure a recipe reaches on what it was calibrated on, beside the held-out one."""
    return _round_robin(_by_family(calibration), per_family)[:limit]


def adherence_results(prompts: list[str], audio: np.ndarray, sample_rate: int) -> list[dict]:
    """demo_model.adherence verdicts per clip; a clip the evaluator cannot read (NaN, inf) counts as a miss."""
    from demo_model import adherence

    results = []
    for prompt, clip in zip(prompts, audio):
        try:
            results.append(adherence.evaluate(prompt, clip, sample_rate))
        except ValueError as error:
            results.append({"prompt": prompt, "ok": False, "error": str(error)})
    return results


def adherence_percent(verdicts: list[dict]) -> float:
    """% of clips judged correct: one clip is 100 / n_prompts points."""
    return 100.0 * float(np.mean([v["ok"] for v in verdicts]))


def build_variant(loaded: LoadedModel, row: str | quant.Recipe,
                  stats: quant.CalibrationStats | None) -> tuple[nn.Module, torch.dtype | None]:
    """(model, compute dtype): fp32 -> the loaded model; bf16 -> the loaded model run under bf16 autocast;
    a recipe -> a quantized copy."""
    if row in FLOAT_ROWS:
        return loaded.model, (torch.bfloat16 if row == "bf16" else None)
    recipe = as_recipe(row)
    model = loaded.fresh_copy()
    quant.quantize_(model, recipe, stats if recipe.needs_calibration else None)
    return model.eval(), None


def compare(reference: Batch, batch: Batch, sample_rate: int) -> dict:
    """Audio SNR / log-mel distance per clip (and their mean over clips) and the per-step relative error of x."""
    snrs = [snr_db(torch.from_numpy(r), torch.from_numpy(e)) for r, e in zip(reference.audio, batch.audio)]
    finite = np.isfinite(batch.audio).all()
    logmel = [log_mel_distance(r, e, sample_rate) for r, e in zip(reference.audio, batch.audio)] if finite \
        else [math.nan] * len(snrs)
    snrs = snrs if finite else [math.nan] * len(snrs)
    trajectory = [((q - f).norm() / f.norm().clamp_min(1e-12)).item()
                  for f, q in zip(reference.trajectory, batch.trajectory)]
    return {"snr_db": float(np.mean(snrs)), "snr_db_min": float(np.min(snrs)),
            "logmel_db": float(np.mean(logmel)), "trajectory_rel_error": float(np.mean(trajectory)),
            "trajectory_rel_error_per_step": [round(v, 5) for v in trajectory],
            "snr_db_per_clip": [round(float(v), 3) for v in snrs],
            "logmel_db_per_clip": [round(float(v), 4) for v in logmel]}


def caption_family(prompt: str) -> str:
    """The demo_model.corpus family of a caption ("other" for a prompt outside the corpus grammar)."""
    from demo_model import corpus

    try:
        return corpus.parse_caption(prompt).family
    except ValueError:
        return "other"


def per_family(prompts: list[str], metrics: dict) -> dict[str, dict]:
    """Mean SNR, log-mel distance and adherence over the clips of each caption family, in corpus order."""
    from demo_model import corpus

    families = [caption_family(p) for p in prompts]
    out = {}
    for family in (*corpus.FAMILIES, "other"):
        clips = [i for i, f in enumerate(families) if f == family]
        if clips:
            out[family] = {"clips": len(clips),
                           "snr_db": float(np.mean([metrics["snr_db_per_clip"][i] for i in clips])),
                           "logmel_db": float(np.mean([metrics["logmel_db_per_clip"][i] for i in clips])),
                           "adherence": 100.0 * float(np.mean([metrics["adherence_per_prompt"][i] for i in clips]))}
    return out


def worst_family(families: dict[str, dict]) -> tuple[str | None, float]:
    """(family, SNR) of the family with the lowest mean SNR (a NaN SNR, from a clip that diverged, is the worst)."""
    if not families:
        return None, math.nan
    name = min(families, key=lambda f: -math.inf if math.isnan(families[f]["snr_db"]) else families[f]["snr_db"])
    return name, families[name]["snr_db"]


@dataclass
class FidelityContext:
    """What the fidelity section shares with the studies: the model, its settings, stats and FP references of the
    held-out prompts (the figure of record) and of the calibration-like ones (the generalisation gap)."""
    loaded: LoadedModel
    settings: SamplerSettings           # the model's, with the run's steps and seconds (always set)
    prompts: list[str]                  # held-out: none is a calibration prompt
    stats: quant.CalibrationStats
    reference: Batch
    fp_adherence: float
    calibration: list[str] = field(default_factory=list)        # the prompts calibration ran on
    calibration_like: list[str] = field(default_factory=list)   # some of them, generated at the evaluation seed
    calibration_reference: Batch | None = None
    clips: dict[str, np.ndarray] = field(default_factory=dict)

    def evaluate(self, row: str | quant.Recipe, model: nn.Module | None = None, *,
                 with_gap: bool = False) -> tuple[dict, Batch]:
        """Generate the held-out prompts with `row`'s model and compare with full precision; `with_gap` also
        generates the calibration-like prompts and reports their SNR and the held-out gap (theirs minus held-out)."""
        model, compute_dtype = (model, None) if model is not None else build_variant(self.loaded, row, self.stats)
        batch = generate_batch(model, self.loaded, self.prompts, seed=EVAL_SEED, settings=self.settings,
                               compute_dtype=compute_dtype)
        metrics = compare(self.reference, batch, self.loaded.sample_rate)
        verdicts = adherence_results(self.prompts, batch.audio, self.loaded.sample_rate)
        metrics["adherence"] = adherence_percent(verdicts)
        metrics["adherence_delta"] = metrics["adherence"] - self.fp_adherence
        metrics["adherence_per_prompt"] = [bool(v["ok"]) for v in verdicts]
        metrics["per_family"] = per_family(self.prompts, metrics)
        metrics["worst_family"], metrics["worst_family_snr_db"] = worst_family(metrics["per_family"])
        if with_gap and self.calibration_reference is not None:
            metrics["calibration_like"] = self._calibration_like(model, compute_dtype)
            metrics["held_out_gap_db"] = metrics["calibration_like"]["snr_db"] - metrics["snr_db"]
        dit = quant.find_dit(model)
        memory = memory_columns(quant.memory_report(copy.deepcopy(dit).to(compute_dtype) if compute_dtype else dit))
        e2e = {"seconds_per_clip": batch.seconds / len(self.prompts),
               "speedup_vs_fp": self.reference.seconds / batch.seconds}
        return {"fidelity": metrics, "memory_model": memory, "e2e": e2e}, batch

    def _calibration_like(self, model: nn.Module, compute_dtype: torch.dtype | None) -> dict:
        """SNR vs full precision on the calibration-like prompts: mean, worst clip, per family."""
        batch = generate_batch(model, self.loaded, self.calibration_like, seed=EVAL_SEED, settings=self.settings,
                               compute_dtype=compute_dtype)
        snrs = [snr_db(torch.from_numpy(r), torch.from_numpy(e))
                for r, e in zip(self.calibration_reference.audio, batch.audio)]
        snrs = snrs if np.isfinite(batch.audio).all() else [math.nan] * len(snrs)
        families = [caption_family(p) for p in self.calibration_like]
        return {"snr_db": float(np.mean(snrs)), "snr_db_min": float(np.min(snrs)),
                "snr_db_per_clip": [round(float(v), 3) for v in snrs],
                "per_family": {f: float(np.mean([v for v, g in zip(snrs, families) if g == f]))
                               for f in dict.fromkeys(families)}}


def prepare_fidelity(cfg: BenchConfig) -> FidelityContext:
    """Load the model, calibrate it over the (stratified) calibration prompts, generate the full-precision
    references of the held-out and the calibration-like prompts."""
    if cfg.quick and not (cfg.model or cfg.model_config or cfg.ckpt_path):
        loaded = quick_model()
    else:
        loaded = sat.load_model(cfg.model, model_config=cfg.model_config, ckpt_path=cfg.ckpt_path)
    settings = loaded.sampling.replace(steps=cfg.steps, seconds=cfg.seconds or loaded.seconds)
    prompts = fidelity_prompts(cfg.prompts_per_family, cfg.max_prompts)
    calibration = calibration_prompts(cfg.calibration_prompts)
    calibration_like = calibration_like_prompts(calibration, cfg.calibration_like_per_family, cfg.max_prompts)
    # one batch of every calibration prompt, seed 0, the evaluation's settings
    stats = calibrate(loaded, calibration, steps=settings.steps, seconds=settings.seconds, batch=len(calibration),
                      progress=cfg.progress)
    reference = generate_batch(loaded.model, loaded, prompts, seed=EVAL_SEED, settings=settings)
    fp_adherence = adherence_percent(adherence_results(prompts, reference.audio, loaded.sample_rate))
    calibration_reference = generate_batch(loaded.model, loaded, calibration_like, seed=EVAL_SEED, settings=settings)
    return FidelityContext(loaded, settings, prompts, stats, reference, fp_adherence, calibration, calibration_like,
                           calibration_reference)


def fidelity_rows(cfg: BenchConfig, context: FidelityContext):
    """Yield (row, result) as each row's generation is compared with full precision."""
    for row in with_progress(cfg.rows, "fidelity", cfg.progress, unit="row"):
        try:
            result, batch = context.evaluate(row, with_gap=True)
            context.clips[row] = batch.audio
        except Exception as error:  # a row that cannot generate is shown in the table, the run goes on
            result = {"error": f"{type(error).__name__}: {error}"}
        gc.collect()
        yield row, result
