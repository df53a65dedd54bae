"""Quantized copies of the loaded model, one per recipe, built once and kept while memory allows.

Building a quantized model = a fresh FP copy + (if the recipe calibrates) activation statistics + swapping
the DiT's linears. The statistics come from running SAT's own sampler over the calibration prompts
(assets/calibration_prompts.txt), so they cover the timesteps real generation visits; they are computed
once per model and cached on disk, as is every quantized model (`quant.save`), so a restart costs a load,
not a recalibration. At most `max_models` quantized models stay in memory (least recently used goes).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import threading
from collections import OrderedDict
from pathlib import Path

import torch

import quant
from lab.generation import model_device, sample_length
from lab.models import LoadedModel

PRECISIONS = ("W8A8", "W4A8", "W8A16", "W4A16")
METHODS = ("static", "dynamic", "smoothquant", "sqd")
WEIGHT_ONLY = ("W8A16", "W4A16")


def recipe_name(precision: str, method: str, lora: bool = False) -> str:
    """UI choices -> preset name: ("W8A8", "sqd", True) -> "w8a8-sqd+lora"; weight-only ignores the method."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    if precision in WEIGHT_ONLY:
        name = precision.lower()
    else:
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
        name = f"{precision.lower()}-{method}"
    return name + ("+lora" if lora else "")


def describe(recipe: quant.Recipe) -> tuple[str, str]:
    """(precision, method) of a recipe as the ratings CSV and MOS table name them: ("W4A8", "sqd+lora")."""
    return f"W{recipe.w_bits}A{recipe.a_bits}", recipe.method + ("+lora" if recipe.lora_rank else "")


class QuantizedModels:
    """LRU cache of quantized models for one loaded FP model."""

    def __init__(self, loaded: LoadedModel, *, cache_dir: str | Path, calibration_prompts: list[str],
                 calibration_steps: int = 25, calibration_seconds: float | None = None, max_models: int = 3):
        if not calibration_prompts:
            raise ValueError("Calibration needs at least one prompt.")
        if max_models < 1:
            raise ValueError("max_models must be at least 1.")
        self.loaded = loaded
        self.cache_dir = Path(cache_dir) / loaded.fingerprint
        self.calibration_prompts = list(calibration_prompts)
        self.calibration_steps = calibration_steps
        self.calibration_seconds = (calibration_seconds or loaded.sampling.seconds
                                    or loaded.sample_size / loaded.sample_rate)
        self.max_models = max_models
        self._models: OrderedDict[str, tuple[torch.nn.Module, quant.Recipe]] = OrderedDict()
        self._stats: quant.CalibrationStats | None = None
        self._lock = threading.RLock()

    def get(self, name: str) -> tuple[torch.nn.Module, quant.Recipe]:
        """The quantized model for preset `name` (ValueError listing valid names when unknown)."""
        recipe = quant.get_recipe(name)
        with self._lock:
            if name not in self._models:
                self._remember(name, (self._load_or_build(recipe), recipe))
            self._models.move_to_end(name)
            return self._models[name]

    def add_saved(self, path: str | Path) -> quant.Recipe:
        """Load a `quant.save` file (made for this model's config) and serve it under its recipe name."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"Quantized model file not found: {path}")
        model = self.loaded.fresh_copy()
        recipe = quant.load(model, path)
        with self._lock:
            self._remember(recipe.name, (model.eval(), recipe))
        return recipe

    def calibration_stats(self) -> quant.CalibrationStats:
        """Per-layer, per-timestep activation statistics of the FP model; computed once, cached on disk."""
        with self._lock:
            if self._stats is None:
                path = self.cache_dir / f"calibration-{self._calibration_key()}.safetensors"
                if path.exists():
                    self._stats = quant.CalibrationStats.load(path)
                else:
                    self._stats = quant.calibrate(self.loaded.model, self._calibration_loop, progress=True)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self._stats.save(path)
            return self._stats

    @property
    def cached_names(self) -> list[str]:
        return list(self._models)

    def _load_or_build(self, recipe: quant.Recipe) -> torch.nn.Module:
        path = self.cache_dir / f"{recipe.name}-{recipe.hash()}-{self._calibration_key()}.safetensors"
        model = self.loaded.fresh_copy()
        if path.exists():
            quant.load(model, path)
            return model.eval()
        stats = self.calibration_stats() if recipe.needs_calibration else None
        quant.quantize_(model, recipe, stats)
        path.parent.mkdir(parents=True, exist_ok=True)
        quant.save(model, recipe, path)
        return model.eval()

    def _remember(self, name: str, entry: tuple[torch.nn.Module, quant.Recipe]) -> None:
        self._models[name] = entry
        self._models.move_to_end(name)
        while len(self._models) > self.max_models:
            self._models.popitem(last=False)

    def _calibration_key(self) -> str:
        """Id of everything cached files depend on besides the model and recipe, the quant code included:
        a fix in quant/ must not be hidden by a stale cache."""
        spec = repr((self.calibration_prompts, self.calibration_steps, self.calibration_seconds,
                     self.loaded.sampling, _quant_source_hash()))
        return hashlib.sha256(spec.encode()).hexdigest()[:10]

    def _calibration_loop(self) -> None:
        """Drive the FP model through SAT's sampler over every calibration prompt (batches of 4), with the
        model's own sampler settings, so the statistics cover the timesteps generation visits."""
        from stable_audio_tools.inference.generation import generate_diffusion_cond

        sampling = self.loaded.sampling
        prompts = self.calibration_prompts
        for start in range(0, len(prompts), 4):
            batch = prompts[start:start + 4]
            conditioning = [{"prompt": p, "seconds_start": 0, "seconds_total": self.calibration_seconds}
                            for p in batch]
            with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                generate_diffusion_cond(
                    self.loaded.model, steps=self.calibration_steps, cfg_scale=sampling.cfg_scale,
                    conditioning=conditioning, batch_size=len(batch), seed=start,
                    sample_size=sample_length(self.loaded, self.calibration_seconds),
                    device=model_device(self.loaded.model),
                    sampler_type=sampling.sampler_type, sigma_min=sampling.sigma_min, sigma_max=sampling.sigma_max,
                    return_latents=True)


@functools.cache
def _quant_source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(quant.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Calibration prompt file not found: {path}")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]
