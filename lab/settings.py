"""Settings read from environment variables, so a Hugging Face Space is configured without code changes.

Command-line flags of app.py override the model and ratings settings; everything else is env-only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Environment variable {name} must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class Settings:
    model: str | None  # LAB_MODEL: Hub repo id; unset = embedded demo model
    model_config: str | None  # LAB_MODEL_CONFIG + LAB_CKPT_PATH: local model files
    ckpt_path: str | None
    ratings_csv: Path  # LAB_RATINGS_CSV
    ratings_dataset: str | None  # LAB_RATINGS_DATASET: HF dataset repo that receives the CSV (optional)
    ratings_push_minutes: int  # LAB_RATINGS_PUSH_MINUTES: how often CommitScheduler pushes
    cache_dir: Path  # LAB_CACHE_DIR: calibration statistics and quantized models
    output_dir: Path  # LAB_OUTPUT_DIR: generated WAV files handed to the browser
    calibration_prompts: Path  # LAB_CALIBRATION_PROMPTS: one prompt per line
    calibration_steps: int  # LAB_CALIBRATION_STEPS: sampler steps per calibration prompt
    max_quantized_models: int  # LAB_MAX_QUANTIZED_MODELS: LRU bound on quantized models kept in memory
    concurrency_limit: int  # LAB_CONCURRENCY: simultaneous generations (CPU-bound: keep 1)

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ.get
        return cls(
            model=env("LAB_MODEL") or None,
            model_config=env("LAB_MODEL_CONFIG") or None,
            ckpt_path=env("LAB_CKPT_PATH") or None,
            ratings_csv=Path(env("LAB_RATINGS_CSV") or REPO_ROOT / "ratings" / "ratings.csv"),
            ratings_dataset=env("LAB_RATINGS_DATASET") or None,
            ratings_push_minutes=_env_int("LAB_RATINGS_PUSH_MINUTES", 5),
            cache_dir=Path(env("LAB_CACHE_DIR") or REPO_ROOT / "runs" / "cache"),
            output_dir=Path(env("LAB_OUTPUT_DIR") or REPO_ROOT / "outputs"),
            calibration_prompts=Path(env("LAB_CALIBRATION_PROMPTS")
                                     or REPO_ROOT / "assets" / "calibration_prompts.txt"),
            calibration_steps=_env_int("LAB_CALIBRATION_STEPS", 25),
            max_quantized_models=_env_int("LAB_MAX_QUANTIZED_MODELS", 3),
            concurrency_limit=_env_int("LAB_CONCURRENCY", 1),
        )
