"""The benchmark: the paper's table on what runs here, plus speed and memory at Stable Audio Open's scale.

    python -m lab.bench                        # full run, ~15 min on 2 cores -> results/results.{json,md}, chart.html
    python -m lab.bench --quick --out /tmp/b   # tiny random DiT, few prompts/steps/recipes (tests/test_bench.py)
    python -m lab.bench --recipes w8a8-sqd,w4a8-sqd+lora --skip-speed --ratings ratings/ratings.csv

One row per configuration: fp32, bf16, and each quant preset (W8A8 / W4A8 x static, dynamic, smoothquant,
sqd, each with and without the rank-32 low-rank branch, plus weight-only W8A16 / W4A16). Sections:

1. memory at SAO's DiT shape: the DiT is built on the meta device (no storage) and quantized there, so the
   bytes come from `quant.memory_report` exactly, in a second; and for the evaluated model's DiT;
2. speed: one DiT forward at SAO's shape (random weights, 256 latent tokens + 130 conditioning tokens, CFG
   batch 2), integer and simulated backends, median of `--reps`, as ratios to fp32 in the same run;
3. fidelity on the evaluated model (default: the embedded demo model) with its sampler settings, the same
   prompts, seeds and therefore initial noise as full precision: SNR and log-mel distance of the audio,
   relative error of the sampler's state x per step, prompt adherence (`lab.adherence`), generation time;
4. studies beyond the paper (`lab.sensitivity`): per-layer / per-block sensitivity at W4A8, a mixed-precision
   W4A8 recipe against uniform W4A8 at equal memory, and the sqd timestep-group sweep;
5. MOS from a ratings CSV (`lab.mos`), CLAP score / FAD when a LAION-CLAP checkpoint is given.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

import quant
from lab import sensitivity
from lab.audio import log_mel_distance
from lab.generation import sample_length, snr_db
from lab.models import LoadedModel, load_model

REPO_ROOT = Path(__file__).resolve().parent.parent

# Stable Audio Open's DiT (shared/DESIGN.md §2); one forward sees SAO_LATENT_TOKENS latent frames (~12 s of
# audio) and the T5 prompt (128 tokens) + seconds_start + seconds_total as cross-attention tokens.
SAO_DIT = dict(io_channels=64, embed_dim=1536, depth=24, num_heads=24, cond_token_dim=768, global_cond_dim=1536,
               project_cond_tokens=False, transformer_type="continuous_transformer")
SAO_LATENT_TOKENS, SAO_COND_TOKENS, SAO_CFG_SCALE = 256, 130, 7.0
QUICK_DIT = dict(SAO_DIT, embed_dim=128, depth=2, num_heads=2, cond_token_dim=64, global_cond_dim=128)
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

FLOAT_ROWS = ("fp32", "bf16")
METHODS = ("static", "dynamic", "smoothquant", "sqd")
BENCH_RECIPES = tuple(f"w{w}a8-{method}{lora}" for w in (8, 4) for method in METHODS
                      for lora in ("", "+lora")) + ("w8a16", "w4a16")
QUICK_RECIPES = ("w8a8-static", "w8a8-dynamic", "w8a8-sqd+lora", "w4a8-static", "w4a8-dynamic", "w4a8-sqd+lora",
                 "w4a16")
SENSITIVITY_RECIPE, MIXED_HIGH_RECIPE = "w4a8-dynamic", "w8a8-dynamic"
EVAL_SEED, CALIBRATION_SEED, RECORD_SEED = 1234, 0, 77


@dataclass
class BenchConfig:
    quick: bool = False
    out: Path = REPO_ROOT / "results"
    recipes: tuple[str, ...] = BENCH_RECIPES
    dit_shape: dict = field(default_factory=lambda: dict(SAO_DIT))
    latent_tokens: int = SAO_LATENT_TOKENS
    cond_tokens: int = SAO_COND_TOKENS
    reps: int = 3                      # timed DiT forwards per row (after one warm-up), median reported
    simulated_reps: int = 1            # the simulated backend is the paper's reference path, not a speed path
    prompts_per_family: int = 1        # fidelity prompts: this many per caption family of lab.corpus (6 families)
    max_prompts: int | None = None     # cap on the fidelity prompts (quick mode)
    calibration_prompts: int = 6       # from assets/calibration_prompts.txt
    steps: int | None = None           # sampler steps; None = the model's generation.json
    seconds: float | None = None       # clip length; None = the model's generation.json
    sensitivity_calls: int = 4         # DiT calls (of a 2-prompt sampling run) replayed per layer in the study
    mixed_k: int = 4                   # layers kept at 8 bit in the mixed-precision recipe
    sweep_groups: tuple = (1, 2, 4, "all")
    model: str | None = None           # lab.models.load_model spec (None = embedded demo model)
    model_config: str | None = None
    ckpt_path: str | None = None
    ratings: Path | None = None
    clap: Path | None = None
    clap_amodel: str = "HTSAT-tiny"
    skip_speed: bool = False
    skip_fidelity: bool = False
    skip_studies: bool = False
    progress: bool = True

    @classmethod
    def quick_defaults(cls, **overrides) -> "BenchConfig":
        """Tiny random DiT instead of SAO's, a tiny random model instead of the embedded one (unless --model... is
        given), 2 prompts x 5 steps, a few recipes: about a minute, not fifteen."""
        settings = dict(quick=True, out=REPO_ROOT / "runs" / "bench-quick", recipes=QUICK_RECIPES,
                        dit_shape=dict(QUICK_DIT), latent_tokens=32, cond_tokens=8, reps=1, prompts_per_family=1,
                        max_prompts=2, calibration_prompts=2, steps=5, seconds=0.5, sensitivity_calls=2, mixed_k=1,
                        sweep_groups=(1, "all"))
        return cls(**{**settings, **overrides})

    @property
    def rows(self) -> tuple[str, ...]:
        return FLOAT_ROWS + self.recipes


# ================================================================ small helpers

def machine_info() -> dict:
    """CPU model, cores, instruction-set flags that matter for int8/bf16 kernels, torch version."""
    cpu, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    memory_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_gib = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "isa": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"}),
            "memory_gib": memory_gib, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def _progress(items, desc: str, enabled: bool, **kwargs):
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, **kwargs)


def _recipe(row: str | quant.Recipe) -> quant.Recipe:
    return row if isinstance(row, quant.Recipe) else quant.get_recipe(row)


def _memory(report: quant.MemoryReport) -> dict:
    return {"linear_bytes": report.linear_bytes, "linear_ratio_fp32": report.ratio_fp32,
            "dit_bytes": report.model_bytes, "dit_ratio_fp32": report.model_bytes / report.model_fp32_bytes}


@torch.no_grad()
def median_seconds(fn, reps: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `reps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _placeholder_stats(dit: nn.Module, n_timesteps: int) -> quant.CalibrationStats:
    """Calibration statistics of the right shape (all ones), for memory on meta-device models."""
    timesteps = [(i + 0.5) / n_timesteps for i in range(n_timesteps)]
    return quant.CalibrationStats(timesteps, {name: torch.ones(n_timesteps, layer.in_features)
                                              for name, layer in quant.linear_layers(dit).items()})


# ================================================================ 1-2. memory and speed at SAO's shape

def build_dit(shape: dict, *, device: str = "cpu", seed: int = 0) -> nn.Module:
    """A SAT DiffusionTransformer of `shape` with every Linear/Conv drawn N(0, 0.02) (SAT zero-inits the
    residual outputs, which would leave every block's branch dead)."""
    from stable_audio_tools.models.dit import DiffusionTransformer

    torch.manual_seed(seed)
    with torch.device(device):
        dit = DiffusionTransformer(**shape)
    if device != "meta":
        for module in dit.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                nn.init.normal_(module.weight, std=0.02)
    return dit.eval().requires_grad_(False)


def forward_inputs(shape: dict, latent_tokens: int, cond_tokens: int, seed: int = 0):
    """(x, t, kwargs) for one CFG forward of a DiT of `shape`: the DiT batches cond + uncond (batch 2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, shape["io_channels"], latent_tokens * shape.get("patch_size", 1), generator=g)
    kwargs = dict(cross_attn_cond=torch.randn(1, cond_tokens, shape["cond_token_dim"], generator=g),
                  global_embed=torch.randn(1, shape["global_cond_dim"], generator=g), cfg_scale=SAO_CFG_SCALE)
    return x, torch.tensor([0.5]), kwargs


def memory_at_shape(shape: dict, rows, *, progress: bool = True) -> dict[str, dict]:
    """Bytes held by the DiT of `shape` for each row, from quant.memory_report on meta-device models."""
    dit = build_dit(shape, device="meta")
    groups = max([_recipe(row).timestep_groups for row in rows if row not in FLOAT_ROWS] + [1])
    stats = _placeholder_stats(dit, groups)
    out = {}
    for row in _progress(rows, "memory at SAO shape", progress, unit="row"):
        out[row] = _memory(quant.memory_report(_variant_of_dit(dit, row, stats)))
    return out


def _variant_of_dit(dit: nn.Module, row: str | quant.Recipe, stats) -> nn.Module:
    """fp32 -> the DiT itself; bf16 -> a bf16 copy; a recipe -> a quantized copy (random low-rank factors)."""
    if row == "fp32":
        return dit
    if row == "bf16":
        return copy.deepcopy(dit).to(torch.bfloat16)
    recipe = _recipe(row).replace(lora_init="random")  # shape-only branch: see Recipe.lora_init
    model = copy.deepcopy(dit)
    quant.quantize_(model, recipe, stats if recipe.needs_calibration else None)
    return model


def speed_at_shape(cfg: BenchConfig):
    """Yield (row, seconds) per row: {"float_s"} for fp32/bf16, {"integer_s", "simulated_s"} for recipes.

    One random DiT of cfg.dit_shape is built once; each row quantizes a copy of it, is timed, and is freed
    before the next (an fp32 SAO DiT is 4 GiB)."""
    dit = build_dit(cfg.dit_shape)
    x, t, kwargs = forward_inputs(cfg.dit_shape, cfg.latent_tokens, cfg.cond_tokens)

    def seconds(model, reps):
        return median_seconds(lambda: model(x, t, **kwargs), reps)

    short_x, _, short_kwargs = forward_inputs(cfg.dit_shape, min(32, cfg.latent_tokens), cfg.cond_tokens, seed=1)
    stats = quant.calibrate(dit, lambda: [dit(short_x, torch.tensor([ti]), **short_kwargs)
                                          for ti in (0.1, 0.35, 0.6, 0.85)], progress=False)
    float_runs = {}
    for row in _progress(cfg.rows, "speed at SAO shape", cfg.progress, unit="row"):
        # each variant is built, timed and dropped within one expression: one quantized copy alive at a time
        if row in FLOAT_ROWS:
            float_runs[row] = [seconds(_variant_of_dit(dit, row, stats), cfg.reps)]
            timing = {"float_s": float_runs[row][0]}
        else:
            timing = {f"{backend}_s": seconds(_variant_of_dit(dit, _recipe(row).replace(backend=backend), stats),
                                              cfg.reps if backend == "integer" else cfg.simulated_reps)
                      for backend in _backends(row)}
        gc.collect()
        yield row, timing
    # The baselines again at the end: on a shared machine a busy moment can slow one measurement, and the
    # faster of the two makes every speed-up conservative.
    for row in FLOAT_ROWS:
        float_runs[row].append(seconds(_variant_of_dit(dit, row, stats), cfg.reps))
        yield row, {"float_s": min(float_runs[row]), "float_s_start_end": float_runs[row]}


def _backends(row: str) -> tuple[str, ...]:
    """Integer for every recipe; simulated too for W8A8 recipes without a branch. The simulated path multiplies
    a cached dequantized float weight, so its cost does not depend on the weight bits (W4A8 costs what W8A8
    does) and weight-only simulated is a plain float matmul: timing those again would only cost minutes."""
    recipe = _recipe(row)
    simulated = recipe.quantizes_activations and not recipe.lora_rank and recipe.w_bits == 8
    return ("integer", "simulated") if simulated else ("integer",)


# ================================================================ 3. fidelity on the evaluated model

@dataclass
class Batch:
    audio: np.ndarray                 # (prompts, channels, samples) float32
    trajectory: list[torch.Tensor]    # the sampler's state x at each step, (prompts, C, T) float32
    seconds: float                    # wall time of the whole batch


def generation_settings(loaded: LoadedModel, steps: int | None = None, seconds: float | None = None) -> dict:
    """The model's sampler settings (its generation.json, else SAO's recommendation), steps/seconds overridable."""
    settings = asdict(loaded.sampling)
    seconds = seconds or settings["seconds"] or loaded.sample_size / loaded.sample_rate
    return {**settings, "steps": steps or settings["steps"], "seconds": seconds}


class _Autocast(nn.Module):
    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=self.dtype):
            return self.inner(*args, **kwargs)


@contextlib.contextmanager
def dit_autocast(model: nn.Module, dtype: torch.dtype | None):
    """Run only the DiT (`model.model`, which SAT's samplers call) under CPU autocast in `dtype`. The quantized
    rows change only the DiT, so the bf16 row does too: the pretransform stays fp32 (the demo model's MDCT
    autoencoder adds 64 before each ELU, where bf16 keeps a resolution of 0.5)."""
    if dtype is None:
        yield
        return
    dit = model.model
    model.model = _Autocast(dit, dtype)
    try:
        yield
    finally:
        model.model = dit


def generate_batch(model: nn.Module, loaded: LoadedModel, prompts: list[str], *, seed: int, settings: dict,
                   compute_dtype: torch.dtype | None = None) -> Batch:
    """All prompts in one `generate_diffusion_cond` call (one seed -> one noise tensor for the batch), recording
    the sampler state x at every step. Same prompts + seed -> the same initial noise for every model.

    compute_dtype: run the DiT under CPU autocast in that dtype (the bf16 row): a bf16 *model* would make SAT
    draw the initial and Brownian noise in bf16, i.e. a different sample rather than a precision effect."""
    from stable_audio_tools.inference.generation import generate_diffusion_cond

    seconds = settings["seconds"]
    conditioning = [{"prompt": p, "seconds_start": 0, "seconds_total": seconds} for p in prompts]
    trajectory = []
    with torch.no_grad(), dit_autocast(model, compute_dtype), contextlib.redirect_stdout(io.StringIO()):  # SAT prints the seed
        start = time.perf_counter()
        audio = generate_diffusion_cond(
            model, steps=settings["steps"], cfg_scale=settings["cfg_scale"], conditioning=conditioning,
            batch_size=len(prompts), sample_size=sample_length(loaded, seconds), seed=seed, device="cpu",
            sampler_type=settings["sampler_type"], sigma_min=settings["sigma_min"], sigma_max=settings["sigma_max"],
            callback=lambda info: trajectory.append(info["x"].detach().float().clone()))
        elapsed = time.perf_counter() - start
    samples = round(seconds * loaded.sample_rate)
    return Batch(audio[:, :, :samples].float().numpy(), trajectory, elapsed)


def fidelity_prompts(per_family: int, limit: int | None = None) -> list[str]:
    """The first `per_family` captions of each family from lab.adherence's fixed evaluation set (at most `limit`)."""
    from lab import adherence, corpus

    by_family: dict[str, list[str]] = {}
    for prompt in dict.fromkeys(adherence.evaluation_prompts()):
        by_family.setdefault(corpus.parse_caption(prompt).family, []).append(prompt)
    return [p for family in corpus.FAMILIES for p in by_family.get(family, [])[:per_family]][:limit]


def calibration_prompts(count: int) -> list[str]:
    from lab.quantized import read_prompts
    return read_prompts(REPO_ROOT / "assets" / "calibration_prompts.txt")[:count]


def adherence_results(prompts: list[str], audio: np.ndarray, sample_rate: int) -> list[dict]:
    """lab.adherence verdicts per clip; a clip the evaluator cannot read (NaN, inf) counts as a miss."""
    from lab import adherence

    results = []
    for prompt, clip in zip(prompts, audio):
        try:
            results.append(adherence.evaluate(prompt, clip, sample_rate))
        except ValueError as error:
            results.append({"prompt": prompt, "ok": False, "error": str(error)})
    return results


def build_variant(loaded: LoadedModel, row: str | quant.Recipe,
                  stats: quant.CalibrationStats | None) -> tuple[nn.Module, torch.dtype | None]:
    """(model, compute dtype): fp32 -> the loaded model; bf16 -> the loaded model run under bf16 autocast;
    a recipe -> a quantized copy."""
    if row in FLOAT_ROWS:
        return loaded.model, (torch.bfloat16 if row == "bf16" else None)
    recipe = _recipe(row)
    model = loaded.fresh_copy()
    quant.quantize_(model, recipe, stats if recipe.needs_calibration else None)
    return model.eval(), None


def compare(reference: Batch, batch: Batch, sample_rate: int) -> dict:
    """Audio SNR / log-mel distance per clip (mean over clips) and the per-step relative error of x."""
    snrs = [snr_db(torch.from_numpy(r), torch.from_numpy(e)) for r, e in zip(reference.audio, batch.audio)]
    finite = np.isfinite(batch.audio).all()
    logmel = [log_mel_distance(r, e, sample_rate) for r, e in zip(reference.audio, batch.audio)] if finite else [math.nan]
    trajectory = [((q - f).norm() / f.norm().clamp_min(1e-12)).item()
                  for f, q in zip(reference.trajectory, batch.trajectory)]
    return {"snr_db": float(np.mean(snrs)) if finite else math.nan, "snr_db_min": float(np.min(snrs)) if finite else math.nan,
            "logmel_db": float(np.mean(logmel)), "trajectory_rel_error": float(np.mean(trajectory)),
            "trajectory_rel_error_per_step": [round(v, 5) for v in trajectory]}


@dataclass
class FidelityContext:
    """What the fidelity section shares with the studies: the model, its settings, stats and FP reference."""
    loaded: LoadedModel
    settings: dict
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
        metrics["adherence"] = 100.0 * float(np.mean([v["ok"] for v in verdicts]))
        metrics["adherence_delta"] = metrics["adherence"] - self.fp_adherence
        metrics["adherence_per_prompt"] = [bool(v["ok"]) for v in verdicts]
        dit = quant.find_dit(model)
        memory = _memory(quant.memory_report(copy.deepcopy(dit).to(compute_dtype) if compute_dtype else dit))
        e2e = {"seconds_per_clip": batch.seconds / len(self.prompts),
               "speedup_vs_fp": self.reference.seconds / batch.seconds}
        return {"fidelity": metrics, "memory_model": memory, "e2e": e2e}, batch


def quick_model(seed: int = 0) -> LoadedModel:
    """QUICK_MODEL_CONFIG with the embedded model's tokenizer and live random weights (N(0, 0.02))."""
    from lab.models import EMBEDDED_DIR, SamplingDefaults, build_model, resolve_tokenizer_paths

    config = resolve_tokenizer_paths(QUICK_MODEL_CONFIG, EMBEDDED_DIR)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(config)
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                nn.init.normal_(module.weight, std=0.02)
    return LoadedModel(model=model, config=config, model_id="quick: tiny random model", sample_rate=16000,
                       sample_size=32768, sampling=SamplingDefaults.read(EMBEDDED_DIR))


def prepare_fidelity(cfg: BenchConfig) -> FidelityContext:
    """Load the model, calibrate it over the calibration prompts, generate the full-precision reference."""
    if cfg.quick and not (cfg.model or cfg.model_config or cfg.ckpt_path):
        loaded = quick_model()
    else:
        loaded = load_model(cfg.model, model_config=cfg.model_config, ckpt_path=cfg.ckpt_path)
    settings = generation_settings(loaded, cfg.steps, cfg.seconds)
    prompts = fidelity_prompts(cfg.prompts_per_family, cfg.max_prompts)
    calibration = calibration_prompts(cfg.calibration_prompts)
    stats = quant.calibrate(loaded.model, lambda: generate_batch(loaded.model, loaded, calibration,
                                                                  seed=CALIBRATION_SEED, settings=settings),
                            progress=cfg.progress)
    reference = generate_batch(loaded.model, loaded, prompts, seed=EVAL_SEED, settings=settings)
    verdicts = adherence_results(prompts, reference.audio, loaded.sample_rate)
    fp_adherence = 100.0 * float(np.mean([v["ok"] for v in verdicts]))
    return FidelityContext(loaded, settings, prompts, stats, reference, fp_adherence)


def fidelity_rows(cfg: BenchConfig, context: FidelityContext):
    """Yield (row, result) as each row's generation is compared with full precision."""
    for row in _progress(cfg.rows, "fidelity", cfg.progress, unit="row"):
        try:
            result, batch = context.evaluate(row)
            context.clips[row] = batch.audio
        except Exception as error:  # a row that cannot generate is shown in the table, the run goes on
            result = {"error": f"{type(error).__name__}: {error}"}
        gc.collect()
        yield row, result


# ================================================================ 4. studies beyond the paper

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
    """w4a8-sqd with 1, 2, 4, ... timestep groups ("all" = one per calibrated timestep): fidelity vs memory."""
    base = quant.get_recipe("w4a8-sqd")
    n_timesteps = len(context.stats.timesteps)
    groups = sorted({n_timesteps if g == "all" else min(int(g), n_timesteps) for g in cfg.sweep_groups})
    sao = _sao_memory_by_groups(base, groups, cfg.dit_shape)
    out = []
    for g in _progress(groups, "sqd timestep-group sweep", cfg.progress, unit="setting"):
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


# ================================================================ 5. MOS and CLAP

def mos_rows(path: Path, rows) -> dict[str, dict]:
    """MOS with 95 % CI per row from the app's ratings CSV (rows the CSV does not rate are left out)."""
    from lab.mos import mos_from_csv
    from lab.quantized import describe

    table = {(r.precision, r.method): r for r in mos_from_csv(path)}
    out = {}
    for row in rows:
        key = ("FP32", "none") if row == "fp32" else None if row == "bf16" else describe(quant.get_recipe(row))
        if key in table:
            r = table[key]
            out[row] = {"mos": r.mos, "ci_low": r.ci_low, "ci_high": r.ci_high, "n": r.n}
    return out


def clap_metrics(checkpoint: Path | None, amodel: str, prompts: list[str], clips: dict[str, np.ndarray],
                 sample_rate: int) -> dict:
    """CLAP score (prompt-audio cosine x 100) per row and FAD of each row's CLAP embeddings against full
    precision's. Runs only when LAION-CLAP and its checkpoint are available; otherwise says why not."""
    if checkpoint is None:
        return {"status": "not run: pass --clap PATH to a LAION-CLAP checkpoint (e.g. 630k-audioset-best.pt); "
                          "CLAP weights cannot be downloaded on this machine"}
    if not Path(checkpoint).is_file():
        return {"status": f"not run: CLAP checkpoint {checkpoint} not found"}
    if not clips:
        return {"status": "not run: no generated clips (fidelity section skipped)"}
    try:
        import laion_clap
        import librosa

        model = laion_clap.CLAP_Module(enable_fusion=False, amodel=amodel)
        model.load_ckpt(str(checkpoint))
        text = model.get_text_embedding(prompts, use_tensor=False)  # (N, D), unit norm
    except Exception as error:  # missing package, tokenizer download refused offline, wrong checkpoint
        return {"status": f"not run: LAION-CLAP could not be loaded ({type(error).__name__}: {error})"}
    embeddings = {}
    for row, audio in clips.items():
        mono = librosa.resample(audio.mean(axis=1), orig_sr=sample_rate, target_sr=48000).astype(np.float32)
        embeddings[row] = model.get_audio_embedding_from_data(x=mono, use_tensor=False)  # (N, D)
    return {"status": "ok", "checkpoint": str(checkpoint), "rows": {
        row: {"clap_score": float(100 * np.mean(np.sum(e * text, axis=1))),
              "fad_vs_fp": frechet_distance(embeddings["fp32"], e) if "fp32" in embeddings else None}
        for row, e in embeddings.items()}}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two embedding sets (N, D) (FAD's formula)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))


# ================================================================ targets and outputs

def _speed(rows: dict, name: str) -> float | None:
    speed = rows.get(name, {}).get("speed", {})
    return speed.get("float_s") or speed.get("integer_s")


def add_speedups(rows: dict[str, dict]) -> None:
    """Speed-ups against fp32 (and bf16) from the same run's seconds."""
    fp32, bf16 = _speed(rows, "fp32"), _speed(rows, "bf16")
    for row in rows.values():
        speed = row.get("speed")
        if not speed or not fp32:
            continue
        for key in ("float", "integer", "simulated"):
            if speed.get(f"{key}_s"):
                speed[f"{key}_x_fp32"] = fp32 / speed[f"{key}_s"]
        if bf16 and (speed.get("integer_s") or speed.get("float_s")):
            speed["x_bf16"] = bf16 / (speed.get("integer_s") or speed["float_s"])


def check_targets(rows: dict[str, dict]) -> list[dict]:
    """The issue's performance targets, each measured value against its threshold (None = not measured)."""
    def value(row, section, key):
        v = rows.get(row, {}).get(section, {}).get(key)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    def ratio(a, b):
        return a / b if a is not None and b else None

    targets = []

    def add(name, measured, op, threshold):
        passed = None if measured is None else (measured >= threshold if op == ">=" else measured <= threshold)
        targets.append({"target": name, "value": measured, "op": op, "threshold": threshold,
                        "result": "not measured" if passed is None else "pass" if passed else "miss"})

    static8 = value("w8a8-static", "speed", "integer_s")
    add("W8A8 static integer DiT forward, speed-up vs fp32", ratio(_speed(rows, "fp32"), static8), ">=", 4.0)
    add("W8A8 static integer DiT forward, speed-up vs bf16", ratio(_speed(rows, "bf16"), static8), ">=", 1.5)
    for bits in (8, 4):
        for method in ("dynamic", "sqd"):
            add(f"W{bits}A8 {method} time / W{bits}A8 static time (integer)",
                ratio(value(f"w{bits}a8-{method}", "speed", "integer_s"), value(f"w{bits}a8-static", "speed", "integer_s")),
                "<=", 1.15)
    for method in METHODS:
        add(f"W4A8 {method} time / W8A8 {method} time (integer)",
            ratio(value(f"w4a8-{method}", "speed", "integer_s"), value(f"w8a8-{method}", "speed", "integer_s")), "<=", 1.0)
    for method in METHODS:
        add(f"memory at SAO shape, W8A8 {method} (linear bytes x fp32)",
            value(f"w8a8-{method}", "memory_sao", "linear_ratio_fp32"), "<=", 0.26)
    for method in METHODS:
        add(f"memory at SAO shape, W4A8 {method}+lora (linear bytes x fp32)",
            value(f"w4a8-{method}+lora", "memory_sao", "linear_ratio_fp32"), "<=", 0.15)
    for method in METHODS:
        for lora in ("", "+lora"):
            add(f"SNR vs FP, W8A8 {method}{lora} (dB)", value(f"w8a8-{method}{lora}", "fidelity", "snr_db"), ">=", 25.0)
    sqd, static4 = value("w4a8-sqd+lora", "fidelity", "snr_db"), value("w4a8-static", "fidelity", "snr_db")
    add("SNR of W4A8 sqd+lora minus W4A8 static (dB)", None if None in (sqd, static4) else sqd - static4, ">=", 6.0)
    for method in METHODS:
        for lora in ("", "+lora"):
            delta = value(f"w8a8-{method}{lora}", "fidelity", "adherence_delta")
            add(f"|adherence - FP|, W8A8 {method}{lora} (points)", None if delta is None else abs(delta), "<=", 2.0)
    return targets


def _fmt(value, spec: str = ".2f", dash: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return dash
    return format(value, spec)


def markdown_report(results: dict) -> str:
    meta, rows = results["meta"], results["rows"]
    machine = meta["machine"]
    lines = [
        f"# Benchmark results{' (quick mode: tiny models, not the real table)' if meta['quick'] else ''}",
        "",
        f"Command: `{meta['command']}` · started {meta['started_utc']} · {meta.get('duration_s', 0):.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in meta['section_seconds'].items())})",
        f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores ({machine['torch_threads']} torch "
        f"threads), {machine['memory_gib']} GiB, ISA {', '.join(machine['isa']) or '–'}; torch {machine['torch']}, "
        f"Python {machine['python']}. Load average (1/5/15 min) at start {meta['load_average_start']}, "
        f"at end {meta.get('load_average_end')} (the machine is shared: other processes slow every row alike)",
        f"Speed: one DiT forward at shape {_shape_text(meta['config'])}, median of {meta['config']['reps']} "
        f"(simulated: {meta['config']['simulated_reps']}). Fidelity: {meta.get('fidelity_model', '–')}.",
        "",
        "| row | SAO linear MiB | SAO linear x fp32 | SAO DiT x fp32 | model linear x fp32 | fwd int (s) | "
        "x fp32 | x bf16 | fwd sim (s) | sim x fp32 | e2e s/clip | e2e x FP | SNR dB | log-mel dB | traj err | "
        "adherence % (Δ) | MOS |",
        "|---|" + "---:|" * 16,
    ]
    for name, row in rows.items():
        mem, model_mem = row.get("memory_sao", {}), row.get("memory_model", {})
        speed, e2e, fid, mos = row.get("speed", {}), row.get("e2e", {}), row.get("fidelity", {}), row.get("mos")
        fwd = speed.get("integer_s", speed.get("float_s"))
        adherence = fid.get("adherence")
        adherence_text = "–" if adherence is None else (
            f"{adherence:.0f}" + ("" if name == "fp32" else f" ({fid['adherence_delta']:+.0f})"))
        snr = "ref" if name == "fp32" and fid else _fmt(fid.get("snr_db"), ".1f")
        mos_text = "–" if not mos else f"{mos['mos']:.2f} ± {_fmt((mos['ci_high'] - mos['ci_low']) / 2, '.2f', '?')} (n={mos['n']})"
        if row.get("error"):
            snr = f"error: {row['error'][:60]}"
        lines.append(
            f"| {name} | {_fmt(mem['linear_bytes'] / 2**20 if mem else None, '.0f')} | "
            f"{_fmt(mem.get('linear_ratio_fp32'), '.3f')} | {_fmt(mem.get('dit_ratio_fp32'), '.3f')} | "
            f"{_fmt(model_mem.get('linear_ratio_fp32'), '.3f')} | {_fmt(fwd, '.3f')} | "
            f"{_fmt(speed.get('integer_x_fp32', speed.get('float_x_fp32')), '.2f')} | {_fmt(speed.get('x_bf16'), '.2f')} | "
            f"{_fmt(speed.get('simulated_s'), '.3f')} | {_fmt(speed.get('simulated_x_fp32'), '.2f')} | "
            f"{_fmt(e2e.get('seconds_per_clip'), '.3f')} | {_fmt(e2e.get('speedup_vs_fp'), '.2f')} | {snr} | "
            f"{'ref' if name == 'fp32' and fid else _fmt(fid.get('logmel_db'), '.2f')} | "
            f"{'ref' if name == 'fp32' and fid else _fmt(fid.get('trajectory_rel_error'), '.4f')} | {adherence_text} | {mos_text} |")
    lines += ["", "## Targets (issue 6)", "", "| target | measured | threshold | result |", "|---|---:|---:|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {_fmt(t['value'], '.3f')} | {t['op']} {t['threshold']} | "
                     f"{'**miss**' if t['result'] == 'miss' else t['result']} |")
    lines += _studies_markdown(results)
    lines += ["", "## CLAP / FAD", "", results.get("clap", {}).get("status", "not run")]
    if results.get("clap", {}).get("rows"):
        lines += ["", "| row | CLAP score | FAD vs FP (CLAP embeddings) |", "|---|---:|---:|"]
        lines += [f"| {row} | {v['clap_score']:.2f} | {_fmt(v['fad_vs_fp'], '.4f')} |"
                  for row, v in results["clap"]["rows"].items()]
    lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def _shape_text(config: dict) -> str:
    s = config["dit_shape"]
    return (f"embed {s['embed_dim']}, depth {s['depth']}, heads {s['num_heads']}, {config['latent_tokens']} latent + "
            f"{config['cond_tokens']} cross-attention tokens, CFG batch 2")


def _studies_markdown(results: dict) -> list[str]:
    lines = []
    study = results.get("sensitivity")
    if study:
        lines += ["", f"## Per-layer sensitivity ({study['recipe']}, one layer at a time, DiT output SNR on "
                      f"{study['dit_calls']} recorded sampler calls; lowest = most sensitive)", "",
                  "| rank | layer | SNR dB | params | default skip |", "|---:|---|---:|---:|---|"]
        for rank, s in enumerate(study["layers"], 1):
            if rank <= 10 or s["default_skip"]:
                lines.append(f"| {rank} | {s['name']} | {s['snr_db']:.1f} | {s['parameters']} | "
                             f"{'yes' if s['default_skip'] else ''} |")
        ff_out = [rank for rank, s in enumerate(study["layers"], 1) if s["name"].endswith("ff.ff.2")]
        lines += ["", f"Feed-forward output projections (`*.ff.ff.2`) rank {ff_out} of {len(study['layers'])}.", "",
                  "| block | SNR dB |", "|---|---:|"]
        lines += [f"| {s['name']} | {s['snr_db']:.1f} |" for s in study["blocks"]]
    mixed = results.get("mixed_precision")
    if mixed:
        lines += ["", f"## Mixed precision: {mixed['base']} with the {len(mixed['high_layers'])} most sensitive "
                      f"layers at {mixed['high']} ({', '.join(mixed['high_layers'])})", "",
                  "| variant | model linear x fp32 | SNR dB | log-mel dB | traj err |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {v['name']} | {v['linear_ratio_fp32']:.4f} | {_fmt(v['snr_db'], '.2f')} | "
                  f"{_fmt(v['logmel_db'], '.2f')} | {_fmt(v['trajectory_rel_error'], '.4f')} |" for v in mixed["variants"]]
    sweep = results.get("sqd_sweep")
    if sweep:
        lines += ["", "## sqd timestep groups (w4a8-sqd): fidelity vs memory", "",
                  "| groups | SAO linear x fp32 | model linear x fp32 | SNR dB | log-mel dB | traj err |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {s['groups']}{' (all steps)' if s['all_steps'] else ''} | {s['sao_linear_ratio_fp32']:.3f} | "
                  f"{s['linear_ratio_fp32']:.3f} | {_fmt(s['snr_db'], '.2f')} | {_fmt(s['logmel_db'], '.2f')} | "
                  f"{_fmt(s['trajectory_rel_error'], '.4f')} |" for s in sweep]
    return lines


def write_chart(results: dict, path: Path) -> None:
    """Plotly HTML: memory vs fidelity, DiT forward speed-ups, per-step trajectory error."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = results["rows"]
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=(
        "Memory at SAO shape vs audio SNR", "DiT forward speed-up vs fp32 (SAO shape)", "Relative error of x per step"))
    quantized = [n for n in rows if n not in FLOAT_ROWS and rows[n].get("memory_sao") and rows[n].get("fidelity")]
    fig.add_trace(go.Scatter(x=[rows[n]["memory_sao"]["linear_ratio_fp32"] for n in quantized],
                             y=[rows[n]["fidelity"].get("snr_db") for n in quantized], text=quantized,
                             mode="markers+text", textposition="top center", textfont=dict(size=9),
                             marker=dict(color=["#1f77b4" if n.startswith("w8") else "#d62728" for n in quantized]),
                             name="recipes"), row=1, col=1)
    timed = [n for n in rows if rows[n].get("speed")]
    for key, label, color in (("integer_x_fp32", "integer (float rows: float)", "#2ca02c"),
                              ("simulated_x_fp32", "simulated", "#9467bd")):
        speed_ups = [rows[n]["speed"].get(key, rows[n]["speed"].get("float_x_fp32") if key.startswith("integer")
                                          else None) for n in timed]
        fig.add_trace(go.Bar(x=timed, y=speed_ups, name=label, marker_color=color), row=1, col=2)
    for n in rows:
        per_step = rows[n].get("fidelity", {}).get("trajectory_rel_error_per_step")
        if per_step and n != "fp32":
            fig.add_trace(go.Scatter(y=per_step, mode="lines", name=n, showlegend=False), row=1, col=3)
    fig.update_xaxes(title_text="linear bytes / fp32", row=1, col=1)
    fig.update_yaxes(title_text="SNR vs FP (dB)", row=1, col=1)
    fig.update_yaxes(title_text="x fp32", row=1, col=2)
    fig.update_xaxes(title_text="sampler step", row=1, col=3)
    fig.update_yaxes(type="log", row=1, col=3)
    fig.update_layout(height=480, width=1500, title=f"Audio DiT PTQ benchmark ({results['meta']['started_utc']})")
    fig.write_html(path, include_plotlyjs="cdn")


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(results: dict, out: Path, *, chart: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=1) + "\n")
    (out / "results.md").write_text(markdown_report(results))
    if chart:
        write_chart(results, out / "chart.html")


NOTES = [
    "Memory: bytes held as counted by quant.memory_report (integer codes, every timestep-group weight copy, scales, "
    "smoothing vectors, low-rank branches, biases); 'SAO' = SAO's DiT shape built on the meta device; 'model' = the "
    "evaluated model's DiT. The simulated backend additionally caches one dequantized float weight per layer.",
    "Speed at SAO shape: random N(0, 0.02) weights, calibrated on 4 short forwards; fp32 and bf16 are timed at "
    "the start and at the end of the section and the faster is the baseline (conservative speed-ups); +lora rows get random branch "
    "factors of the right shape instead of an SVD (run time and bytes depend on shape only; the SVD would cost "
    "minutes per recipe on 2 cores). Fidelity rows always use quant's real SVD.",
    "Fidelity: every prompt of a row is generated in one batch from one seed, so full precision and each recipe "
    "start from identical noise; quantized rows run the recipes' integer backend (the default of every preset). "
    "SNR and log-mel distance compare final audio; 'traj err' = mean over steps of |x_q - x_fp| / |x_fp| for the "
    "sampler state x. Adherence = % of clips lab.adherence judges correct (one clip = 100 / n_prompts points).",
    "bf16 fidelity row: the fp32 model with its DiT under torch.autocast(bfloat16) (matmuls in bf16), so the "
    "sampler state, its noise and the pretransform stay fp32, as in the quantized rows; a bf16 model would make "
    "SAT draw its noise in bf16, a different sample. Its memory columns are those of a bf16 copy.",
    "Calibration uses the calibration prompts (assets/calibration_prompts.txt) with the same sampler settings, "
    "other seeds; the fidelity prompts come from lab.adherence's evaluation set.",
]


# ================================================================ orchestration and CLI

def run(cfg: BenchConfig, command: str = "python -m lab.bench") -> dict:
    """Run every section `cfg` asks for and write results.json / results.md / chart.html into cfg.out."""
    started = time.time()
    sections: dict[str, float] = {}
    results = {
        "meta": {"command": command, "quick": cfg.quick,
                 "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(),
                 "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                 "section_seconds": sections, "load_average_start": [round(v, 2) for v in os.getloadavg()]},
        "rows": {row: {} for row in cfg.rows}, "targets": [], "notes": list(NOTES)}
    rows = results["rows"]

    def save(chart: bool = False):
        """Write everything measured so far: a crash or an interruption later loses nothing."""
        results["meta"]["duration_s"] = time.time() - started
        results["meta"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        add_speedups(rows)
        results["targets"] = check_targets(rows)
        write_outputs(results, cfg.out, chart=chart)

    @contextlib.contextmanager
    def section(name: str, chart: bool = False):
        start = time.time()
        yield
        sections[name] = round(time.time() - start, 1)
        save(chart)

    with section("memory"):
        for row, memory in memory_at_shape(cfg.dit_shape, cfg.rows, progress=cfg.progress).items():
            rows[row]["memory_sao"] = memory
    if not cfg.skip_speed:
        with section("speed"):
            for row, speed in speed_at_shape(cfg):
                rows[row]["speed"] = speed
                save()
    context = None
    if not cfg.skip_fidelity:
        with section("fidelity"):
            context = prepare_fidelity(cfg)
            results["meta"]["fidelity_model"] = (
                f"{context.loaded.model_id}, {len(context.prompts)} prompts x {context.settings['steps']} steps "
                f"({context.settings['sampler_type']}, cfg {context.settings['cfg_scale']}, "
                f"{context.settings['seconds']:g} s), calibrated on {cfg.calibration_prompts} prompts "
                f"({len(context.stats.timesteps)} timesteps)")
            results["meta"]["fidelity_prompts"] = context.prompts
            for row, result in fidelity_rows(cfg, context):
                rows[row].update(result)
                save()
        if not cfg.skip_studies:
            with section("sensitivity"):
                results["sensitivity"] = sensitivity_study(cfg, context)
            with section("mixed_precision"):
                results["mixed_precision"] = mixed_precision_study(cfg, context, results["sensitivity"]["layers"], rows)
            with section("sqd_sweep"):
                results["sqd_sweep"] = sqd_sweep(cfg, context, rows)
    with section("clap"):
        results["clap"] = clap_metrics(cfg.clap, cfg.clap_amodel, context.prompts if context else [],
                                       context.clips if context else {}, context.loaded.sample_rate if context else 0)
    with section("mos", chart=True):
        if cfg.ratings is not None:
            for row, mos in mos_rows(cfg.ratings, cfg.rows).items():
                rows[row]["mos"] = mos
    return results


def parse_args(argv=None) -> BenchConfig:
    parser = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random models, 2 prompts x 5 steps, 7 recipes (what the test runs)")
    parser.add_argument("--out", type=Path, help="output folder (default: results/, or runs/bench-quick with --quick)")
    parser.add_argument("--recipes", help=f"comma-separated presets (default: all {len(BENCH_RECIPES)}); "
                                          "fp32 and bf16 are always included")
    parser.add_argument("--ratings", type=Path, help="ratings CSV of the app: adds MOS with 95%% CI per row")
    parser.add_argument("--clap", type=Path, help="LAION-CLAP checkpoint: adds CLAP score and FAD per row")
    parser.add_argument("--clap-amodel", default="HTSAT-tiny", help="CLAP audio encoder of that checkpoint")
    parser.add_argument("--skip-speed", action="store_true", help="skip the SAO-shape DiT forward timings")
    parser.add_argument("--skip-fidelity", action="store_true", help="skip generation (and the studies)")
    parser.add_argument("--skip-studies", action="store_true", help="skip sensitivity, mixed precision, sqd sweep")
    parser.add_argument("--reps", type=int, help="timed DiT forwards per row (default 3; quick 1)")
    parser.add_argument("--prompts-per-family", type=int, help="fidelity prompts per caption family (default 1: 6 prompts)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model's generation.json)")
    parser.add_argument("--model", help="model to evaluate: Hugging Face repo id (default: embedded demo model)")
    parser.add_argument("--model-config", help="local SAT model_config.json (with --ckpt-path)")
    parser.add_argument("--ckpt-path", help="local checkpoint (with --model-config)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = parser.parse_args(argv)

    overrides = {key: value for key, value in dict(
        out=args.out, ratings=args.ratings, clap=args.clap, clap_amodel=args.clap_amodel, skip_speed=args.skip_speed,
        skip_fidelity=args.skip_fidelity, skip_studies=args.skip_studies, reps=args.reps,
        prompts_per_family=args.prompts_per_family, steps=args.steps, model=args.model,
        model_config=args.model_config, ckpt_path=args.ckpt_path, progress=not args.no_progress).items()
        if value is not None}
    if args.recipes:
        names = tuple(dict.fromkeys(n.strip() for n in args.recipes.split(",") if n.strip() not in ("", *FLOAT_ROWS)))
        for name in names:
            quant.get_recipe(name)  # ValueError listing the valid presets
        overrides["recipes"] = names
    for key in ("reps", "prompts_per_family", "steps"):
        if key in overrides and overrides[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {overrides[key]}")
    if args.ratings is not None and not args.ratings.is_file():
        raise ValueError(f"--ratings: no such file {args.ratings}")
    return BenchConfig.quick_defaults(**overrides) if args.quick else BenchConfig(**overrides)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = parse_args(argv)
    except ValueError as error:
        raise SystemExit(f"python -m lab.bench: error: {error}") from None
    results = run(cfg, command=" ".join(["python -m lab.bench", *argv]))
    print(f"wrote {cfg.out / 'results.md'} ({results['meta']['duration_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
