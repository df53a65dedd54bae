"""Quantized copies of the loaded model, one per recipe, built once and kept while memory allows.

Building a quantized model = a fresh FP copy + (if the recipe calibrates) activation statistics + swapping
the DiT's linears. The statistics come from running SAT's own sampler over the calibration prompts
(assets/calibration_prompts.txt), so they cover the timesteps real generation visits; they are computed
once per model and cached on disk, as is every quantized model (`quant.save`), so a restart costs a load,
not a recalibration. At most `max_models` quantized models stay in memory (least recently used goes).
"""
from __future__ import annotations

import functools
import hashlib
import math
import threading
from collections import OrderedDict
from pathlib import Path

import torch

import quant
from lab import sat
from lab.sat import LoadedModel

PRECISIONS = ("W8A8", "W4A8", "W8A16", "W4A16")
WEIGHT_ONLY = ("W8A16", "W4A16")  # no activation method applies
METHODS = quant.ACTIVATION_METHODS


def recipe_name(precision: str, method: str, lora: bool = False) -> str:
    """UI choices -> preset name: ("W8A8", "sqd", True) -> "w8a8-sqd+lora"; weight-only ignores the method."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    w_bits, a_bits = (int(bits) for bits in precision[1:].split("A"))
    if precision in WEIGHT_ONLY:
        method = "weight-only"
    elif method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    return quant.preset_name(w_bits, a_bits, method, lora)


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
        self.calibration_seconds = calibration_seconds or loaded.seconds
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
                    self._stats = calibrate(self.loaded, self.calibration_prompts, steps=self.calibration_steps,
                                            seconds=self.calibration_seconds)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self._stats.save(path)
            return self._stats

    @property
    def cached_names(self) -> list[str]:
        return list(self._models)

    def _load_or_build(self, recipe: quant.Recipe) -> torch.nn.Module:
        path = self.cache_dir / f"{recipe.name}-{recipe.hash()}-{self._calibration_key()}.safetensors"
        stats = None if path.exists() or not recipe.needs_calibration else self.calibration_stats()
        model = self.loaded.fresh_copy()  # after calibration: no idle copy of the model while it runs
        if path.exists():
            quant.load(model, path)
            return model.eval()
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
                     self.loaded.sampling, quant_source_hash()))
        return hashlib.sha256(spec.encode()).hexdigest()[:10]

@functools.cache
def quant_source_hash() -> str:
    """Id of the quant library's code: a fix in quant/ changes quantized outputs without changing a recipe hash,
    so whatever is cached or built from them keys on this too."""
    digest = hashlib.sha256()
    for path in sorted(Path(quant.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def calibrate(loaded: LoadedModel, prompts: list[str], *, steps: int | None = None, seconds: float | None = None,
              cfg_scale: float | None = None, batch: int = 4, progress: bool = True) -> quant.CalibrationStats:
    """Activation statistics of the FP model, from SAT's sampler run over `prompts` (batches of `batch`) with
    the model's own sampler settings (steps, seconds and CFG overridable), so they cover the timesteps real
    generation visits. The app, the quantize CLI and the benchmark all calibrate through here."""
    if not prompts:
        raise ValueError("Calibration needs at least one prompt.")
    settings = loaded.sampling.replace(steps=steps, cfg_scale=cfg_scale)
    seconds = seconds or loaded.seconds

    def run() -> None:
        for start in range(0, len(prompts), batch):
            sat.sample(loaded.model, prompts[start:start + batch], settings=settings, seed=start, seconds=seconds,
                       sample_size=loaded.sample_length(seconds), return_latents=True)

    batches = math.ceil(len(prompts) / batch)
    total = batches * sat.dit_forwards(settings.sampler_type, settings.steps)
    return quant.calibrate(loaded.model, run, progress=progress, total=total,
                           description=f"calibrating: {len(prompts)} prompts x {settings.steps} steps, "
                                       f"{seconds:g} s of audio")
