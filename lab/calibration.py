"""What calibration runs on a loaded model, and the statistics files it reads and checks.

Calibration is sized per model by `CalibrationPlan.default` (see CALIBRATION_* below): a few prompts, a few
dozen DiT forwards, a clip of CALIBRATION_TOKENS DiT tokens (1.024 s of the demo model, 3 s of SAO). Statistics
are cached on disk next to the quantized models (lab.quantized) and can be given as a file
(`ptq-quantize calibrate`, `--calibration-stats`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

import quant
from lab import sat
from lab.requests import check_prompt_words
from lab.sat import LoadedModel, SamplerSettings

# The calibration every entry point runs unless told otherwise (`CalibrationPlan.default`). On the demo model,
# 4 prompts x 25 steps of 1.024 s (25 DiT forwards) calibrate as well as 24 prompts x 25 steps of 2.048 s (150
# forwards, 8x the compute): scripts/calibration_size.py, table in docs/app.md.
CALIBRATION_PROMPTS = 4  # prompts, spread evenly over the prompt file
CALIBRATION_STEPS = 25  # sampler steps per prompt (the model's own steps when fewer)
CALIBRATION_TOKENS = 64  # clip length cap in DiT tokens (the model's clip when shorter)
CALIBRATION_BATCH = 4  # prompts per sampler call
# Token rows kept per layer and timestep (`quant.calibrate(sample_rows=...)`): as many as fit in
# CALIBRATION_ROW_BYTES, between quant's default and CALIBRATION_MAX_ROWS. GPTQ's input statistics H need more
# rows than a layer has inputs or it fits the calibration rows too closely: on the demo model 128 rows per step
# instead of 8 raise 4-bit GPTQ recipes by ~1 dB on held-out prompts (docs/fidelity.md), while SAO (~358 k input
# channels in all, 25 steps) keeps 11 and its calibration peak stays under 6.5 GiB.
CALIBRATION_ROW_BYTES = 200 * 2**20
CALIBRATION_MAX_ROWS = 128


def spread(items: list[str], count: int) -> list[str]:
    """`count` items evenly spaced over `items` (all of them when there are no more): a prompt file is usually
    grouped by kind, so its first lines alone would calibrate on one kind of sound."""
    if count >= len(items):
        return list(items)
    return [items[math.floor(i * len(items) / count)] for i in range(count)]


@dataclass(frozen=True)
class CalibrationPlan:
    """What calibration runs: SAT's sampler over `prompts` in batches of `batch`, `seconds` of audio each, with
    the model's sampler settings at calibration's steps (and CFG)."""
    prompts: tuple[str, ...]
    sampling: SamplerSettings
    seconds: float
    batch: int = CALIBRATION_BATCH

    @classmethod
    def default(cls, loaded: LoadedModel, prompts: list[str], *, count: int | None = None, steps: int | None = None,
                seconds: float | None = None, cfg_scale: float | None = None,
                batch: int | None = None) -> CalibrationPlan:
        """The rule every entry point uses: CALIBRATION_PROMPTS prompts spread over `prompts`, CALIBRATION_STEPS
        steps (or the model's, when fewer), the model's clip length capped at CALIBRATION_TOKENS DiT tokens.
        Any argument given overrides its part of the rule."""
        if not prompts:
            raise ValueError("Calibration needs at least one prompt.")
        steps = steps or min(CALIBRATION_STEPS, loaded.sampling.steps)
        seconds = seconds or min(loaded.seconds, CALIBRATION_TOKENS * loaded.seconds_per_token)
        return cls(tuple(spread(prompts, count or CALIBRATION_PROMPTS)),
                   loaded.sampling.replace(steps=steps, cfg_scale=cfg_scale), seconds, batch or CALIBRATION_BATCH)

    @property
    def forwards(self) -> int:
        """DiT forwards calibration makes (each carries one batch, CFG included)."""
        return math.ceil(len(self.prompts) / self.batch) * sat.dit_forwards(self.sampling.sampler_type,
                                                                           self.sampling.steps)

    @property
    def prompt_forwards(self) -> int:
        """Forwards x prompts per forward: what calibration costs, in DiT forwards of one prompt."""
        return len(self.prompts) * sat.dit_forwards(self.sampling.sampler_type, self.sampling.steps)

    def sample_rows(self, model: torch.nn.Module) -> int:
        """Rows kept per layer and timestep for `model` under this plan (see CALIBRATION_ROW_BYTES)."""
        widths = sum(layer.in_features for layer in quant.linear_layers(quant.find_dit(model)).values())
        timesteps = sat.dit_forwards(self.sampling.sampler_type, self.sampling.steps)
        fit = CALIBRATION_ROW_BYTES // (2 * widths * timesteps)  # bfloat16 rows
        return int(min(CALIBRATION_MAX_ROWS, max(quant.SAMPLE_ROWS, fit)))

    def describe(self) -> str:
        return (f"{len(self.prompts)} prompts x {self.sampling.steps} steps of {self.seconds:.4g} s audio "
                f"({self.forwards} DiT forwards)")

    def run(self, loaded: LoadedModel, model: torch.nn.Module | None = None, *,
            progress: bool = True) -> quant.CalibrationStats:
        """Activation statistics of `model` (default: the loaded FP model) under this plan; the plan and the
        model it ran on are kept in the statistics' `meta`. Prompts with words the model does not know are refused
        before anything runs (`lab.requests.check_prompt_words`)."""
        check_prompt_words(loaded, self.prompts)
        model = loaded.model if model is None else model

        def sample_every_batch() -> None:
            for start in range(0, len(self.prompts), self.batch):
                sat.sample(model, list(self.prompts[start:start + self.batch]), settings=self.sampling, seed=start,
                           seconds=self.seconds, sample_size=loaded.sample_length(self.seconds), return_latents=True)

        rows = self.sample_rows(model)
        stats = quant.calibrate(model, sample_every_batch, progress=progress, total=self.forwards,
                                description=f"calibrating: {self.describe()}", sample_rows=rows)
        stats.meta = {"model": loaded.model_id, "prompts": list(self.prompts), "steps": self.sampling.steps,
                      "seconds": self.seconds, "cfg_scale": self.sampling.cfg_scale,
                      "sampler": self.sampling.sampler_type, "batch": self.batch, "sample_rows": rows}
        return stats


def calibrate(loaded: LoadedModel, prompts: list[str], *, steps: int | None = None, seconds: float | None = None,
              cfg_scale: float | None = None, batch: int = CALIBRATION_BATCH,
              progress: bool = True) -> quant.CalibrationStats:
    """Activation statistics over exactly `prompts` (None = the model's steps, full clip and CFG): for callers
    that choose their own calibration set, as the benchmark does."""
    plan = CalibrationPlan(tuple(prompts), loaded.sampling.replace(steps=steps, cfg_scale=cfg_scale),
                           seconds or loaded.seconds, batch)
    return plan.run(loaded, progress=progress)


def check_stats(stats: quant.CalibrationStats, model: torch.nn.Module, source: str = "the statistics") -> None:
    """Raise ValueError naming what differs when `stats` were not recorded on a DiT of this model's shape."""
    layers = quant.linear_layers(quant.find_dit(model))
    missing = sorted(set(layers) - set(stats.absmax))
    widths = [f"{name}: {stats.absmax[name].shape[1]} channels, model {layer.in_features}"
              for name, layer in layers.items() if name in stats.absmax
              and stats.absmax[name].shape[1] != layer.in_features]
    if missing or widths:
        raise ValueError(f"{source} do not fit this model: "
                         + "; ".join(filter(None, [f"no statistics for {len(missing)} layers, e.g. {missing[:3]}"
                                                   if missing else "", f"widths differ: {widths[:3]}" if widths
                                                   else ""])))


def read_stats(path: str | Path) -> quant.CalibrationStats:
    """`quant.CalibrationStats.load` with a clear error for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Calibration statistics file not found: {path}")
    try:
        return quant.CalibrationStats.load(path)
    except ValueError:
        raise
    except Exception as error:  # safetensors' own error type for a truncated or damaged file
        raise ValueError(f"{path} is not a readable calibration file (truncated or damaged?): {error}") from None
