"""Settings read from environment variables, so a Hugging Face Space is configured without code changes.

Flags of `ptq-lab` override the model, quantized files, calibration statistics, studies folder, console
password and trusted proxy; the rest is env-only. Reading them imports no torch, so `--help` answers at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lab.resources import CALIBRATION_PROMPTS, ROOT


def _env_number(name: str, default, kind=int):
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return kind(value)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ValueError(f"Environment variable {name} must be {noun}, got {value!r}") from None


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # LAB_MODEL: Hub repo id; unset = embedded demo model
    model_config: str | None = None  # LAB_MODEL_CONFIG + LAB_CKPT_PATH: local model files
    ckpt_path: str | None = None
    quantized_files: tuple[str, ...] = ()  # LAB_QUANTIZED: quant.save files to serve, separated by ":"
    studies_dir: Path = ROOT / "runs" / "studies"  # LAB_STUDIES_DIR: built studies and their ratings
    ratings_dataset: str | None = None  # LAB_RATINGS_DATASET: HF dataset repo that receives the ratings
    ratings_push_minutes: int = 5  # LAB_RATINGS_PUSH_MINUTES: how often CommitScheduler pushes
    admin_password: str | None = None  # LAB_ADMIN_PASSWORD: the experimenter console's; unset = random
    cache_dir: Path = ROOT / "runs" / "cache"  # LAB_CACHE_DIR: calibration statistics and quantized models
    output_dir: Path = ROOT / "outputs"  # LAB_OUTPUT_DIR: the Compare tab's WAV files
    calibration_prompts: Path = CALIBRATION_PROMPTS  # LAB_CALIBRATION_PROMPTS: one prompt per line
    # Calibration size; unset = the model's plan (lab.calibration.CalibrationPlan.default)
    calibration_count: int | None = None  # LAB_CALIBRATION_COUNT: prompts, spread over the file
    calibration_steps: int | None = None  # LAB_CALIBRATION_STEPS: sampler steps per prompt
    calibration_seconds: float | None = None  # LAB_CALIBRATION_SECONDS: audio length per prompt
    calibration_stats: Path | None = None  # LAB_CALIBRATION_STATS: statistics file to use instead of calibrating
    max_quantized_models: int = 3  # LAB_MAX_QUANTIZED_MODELS: LRU bound on quantized models kept in memory
    # LAB_QUANTIZED_MEMORY_GIB: memory the quantized models kept may hold; unset = half the RAM available at start
    quantized_memory_gib: float | None = None
    concurrency_limit: int = 1  # LAB_CONCURRENCY: simultaneous generations (CPU-bound: keep 1)
    forwarded_allow_ips: str | None = None  # LAB_FORWARDED_ALLOW_IPS: proxies whose X-Forwarded-For is trusted

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get
        defaults = cls()
        return cls(
            model=env("LAB_MODEL") or None,
            model_config=env("LAB_MODEL_CONFIG") or None,
            ckpt_path=env("LAB_CKPT_PATH") or None,
            quantized_files=tuple(path for path in (env("LAB_QUANTIZED") or "").split(":") if path),
            studies_dir=Path(env("LAB_STUDIES_DIR") or defaults.studies_dir),
            ratings_dataset=env("LAB_RATINGS_DATASET") or None,
            ratings_push_minutes=_env_number("LAB_RATINGS_PUSH_MINUTES", defaults.ratings_push_minutes),
            admin_password=env("LAB_ADMIN_PASSWORD") or None,
            cache_dir=Path(env("LAB_CACHE_DIR") or defaults.cache_dir),
            output_dir=Path(env("LAB_OUTPUT_DIR") or defaults.output_dir),
            calibration_prompts=Path(env("LAB_CALIBRATION_PROMPTS") or defaults.calibration_prompts),
            calibration_count=_env_number("LAB_CALIBRATION_COUNT", None),
            calibration_steps=_env_number("LAB_CALIBRATION_STEPS", None),
            calibration_seconds=_env_number("LAB_CALIBRATION_SECONDS", None, float),
            calibration_stats=Path(env("LAB_CALIBRATION_STATS")) if env("LAB_CALIBRATION_STATS") else None,
            max_quantized_models=_env_number("LAB_MAX_QUANTIZED_MODELS", defaults.max_quantized_models),
            quantized_memory_gib=_env_number("LAB_QUANTIZED_MEMORY_GIB", None, float),
            concurrency_limit=_env_number("LAB_CONCURRENCY", defaults.concurrency_limit),
            forwarded_allow_ips=env("LAB_FORWARDED_ALLOW_IPS") or None,
        )
