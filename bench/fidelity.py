"""Fidelity on the evaluated model: every row generates the same prompts from the same seed as full precision,
and is compared with it (audio SNR, log-mel distance, relative error of x per step, prompt adherence, time).

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
from bench.sampling import Batch, generate_batch
from bench.shape import memory_columns
from lab import sat
from lab.audio import log_mel_distance
from lab.generation import snr_db
from lab.quantized import calibrate
from lab.resources import CALIBRATION_PROMPTS, EMBEDDED_DIR, read_prompts
from lab.sat import LoadedModel, SamplerSettings

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
        model = sat.randomize_weights(sat.build_model(config))
    return LoadedModel(model=model, config=config, model_id="quick: tiny random model", sample_rate=16000,
                       sample_size=32768, sampling=sat.read_generation(EMBEDDED_DIR)[0])


def fidelity_prompts(per_family: int, limit: int | None = None) -> list[str]:
    """The first `per_family` captions of each family from demo_model.adherence's fixed evaluation set (at most `limit`)."""
    from demo_model import adherence, corpus

    by_family: dict[str, list[str]] = {}
    for prompt in dict.fromkeys(adherence.evaluation_prompts()):
        by_family.setdefault(corpus.parse_caption(prompt).family, []).append(prompt)
    return [p for family in corpus.FAMILIES for p in by_family.get(family, [])[:per_family]][:limit]


def calibration_prompts(count: int) -> list[str]:
    """`count` prompts spread evenly over assets/calibration_prompts.txt. The file is grouped by caption family:
    its first lines alone would calibrate on tones only, and static activation scales would then miss the
    ranges of noise, drums and sweeps."""
    prompts = read_prompts(CALIBRATION_PROMPTS)
    if count >= len(prompts):
        return prompts
    return [prompts[i * len(prompts) // count] for i in range(count)]


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


@dataclass
class FidelityContext:
    """What the fidelity section shares with the studies: the model, its settings, stats and FP reference."""
    loaded: LoadedModel
    settings: SamplerSettings           # the model's, with the run's steps and seconds (always set)
    prompts: list[str]
    stats: quant.CalibrationStats
    reference: Batch
    fp_adherence: float
    clips: dict[str, np.ndarray] = field(default_factory=dict)

    def evaluate(self, row: str | quant.Recipe, model: nn.Module | None = None) -> tuple[dict, Batch]:
        """Generate the fidelity prompts with `row`'s model and compare with full precision."""
        model, compute_dtype = (model, None) if model is not None else build_variant(self.loaded, row, self.stats)
        batch = generate_batch(model, self.loaded, self.prompts, seed=EVAL_SEED, settings=self.settings,
                               compute_dtype=compute_dtype)
        metrics = compare(self.reference, batch, self.loaded.sample_rate)
        verdicts = adherence_results(self.prompts, batch.audio, self.loaded.sample_rate)
        metrics["adherence"] = adherence_percent(verdicts)
        metrics["adherence_delta"] = metrics["adherence"] - self.fp_adherence
        metrics["adherence_per_prompt"] = [bool(v["ok"]) for v in verdicts]
        metrics["per_family"] = per_family(self.prompts, metrics)
        dit = quant.find_dit(model)
        memory = memory_columns(quant.memory_report(copy.deepcopy(dit).to(compute_dtype) if compute_dtype else dit))
        e2e = {"seconds_per_clip": batch.seconds / len(self.prompts),
               "speedup_vs_fp": self.reference.seconds / batch.seconds}
        return {"fidelity": metrics, "memory_model": memory, "e2e": e2e}, batch


def prepare_fidelity(cfg: BenchConfig) -> FidelityContext:
    """Load the model, calibrate it over the calibration prompts, generate the full-precision reference."""
    if cfg.quick and not (cfg.model or cfg.model_config or cfg.ckpt_path):
        loaded = quick_model()
    else:
        loaded = sat.load_model(cfg.model, model_config=cfg.model_config, ckpt_path=cfg.ckpt_path)
    settings = loaded.sampling.replace(steps=cfg.steps, seconds=cfg.seconds or loaded.seconds)
    prompts = fidelity_prompts(cfg.prompts_per_family, cfg.max_prompts)
    calibration = calibration_prompts(cfg.calibration_prompts)
    # one batch of every calibration prompt, seed 0, the evaluation's settings
    stats = calibrate(loaded, calibration, steps=settings.steps, seconds=settings.seconds, batch=len(calibration),
                      progress=cfg.progress)
    reference = generate_batch(loaded.model, loaded, prompts, seed=EVAL_SEED, settings=settings)
    fp_adherence = adherence_percent(adherence_results(prompts, reference.audio, loaded.sample_rate))
    return FidelityContext(loaded, settings, prompts, stats, reference, fp_adherence)


def fidelity_rows(cfg: BenchConfig, context: FidelityContext):
    """Yield (row, result) as each row's generation is compared with full precision."""
    for row in with_progress(cfg.rows, "fidelity", cfg.progress, unit="row"):
        try:
            result, batch = context.evaluate(row)
            context.clips[row] = batch.audio
        except Exception as error:  # a row that cannot generate is shown in the table, the run goes on
            result = {"error": f"{type(error).__name__}: {error}"}
        gc.collect()
        yield row, result
