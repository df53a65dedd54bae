"""Quantized copies of the loaded model, one per recipe, built once and kept while memory allows, with the
calibration statistics they start from (computed once under the model's plan, or given as a file), cached on
disk and keyed by everything they depend on.
"""
from __future__ import annotations

import functools
import hashlib
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

import quant
from lab import sat
from lab.calibration import CalibrationPlan, check_stats, read_stats
from lab.model_copies import copy_for_quantization, shared_view
from lab.quantized_files import load_quantized, save_quantized
from lab.sat import LoadedModel

FILE_CONTENT = "dit"  # what a quantized-model file holds; part of the cache key


@functools.cache
def quant_source_hash() -> str:
    """Id of the quant library's code: a fix in quant/ changes quantized outputs without changing a recipe hash,
    so whatever is cached or built from them keys on this too."""
    digest = hashlib.sha256()
    for path in sorted(Path(quant.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


class QuantizedModels:
    """LRU cache of quantized models for one loaded FP model, with its calibration statistics.

    Two locks: `_lock` guards the models (building one holds it), `_stats_lock` guards calibration, which runs
    on a shared view of the FP model: a calibration in progress never blocks serving a model that needs none.
    """

    def __init__(self, loaded: LoadedModel, *, cache_dir: str | Path, calibration_prompts: list[str],
                 calibration_count: int | None = None, calibration_steps: int | None = None,
                 calibration_seconds: float | None = None, calibration_stats: str | Path | None = None,
                 max_models: int = 3):
        if max_models < 1:
            raise ValueError("max_models must be at least 1.")
        self.loaded = loaded
        self.cache_dir = Path(cache_dir) / loaded.fingerprint
        self.plan = CalibrationPlan.default(loaded, calibration_prompts, count=calibration_count,
                                            steps=calibration_steps, seconds=calibration_seconds)
        self.max_models = max_models
        self.forward_seconds: float | None = None  # one prompt through one DiT forward at the plan's length
        self._models: OrderedDict[str, tuple[torch.nn.Module, quant.Recipe]] = OrderedDict()
        self._files: dict[str, Path] = {}  # recipe name -> served file (reloaded from it, never rebuilt)
        self._stats: quant.CalibrationStats | None = None
        self._stats_source = "plan"
        if calibration_stats is not None:
            self._stats = read_stats(calibration_stats)
            check_stats(self._stats, loaded.model, f"calibration statistics {calibration_stats}")
            self._stats_source = hashlib.sha256(Path(calibration_stats).read_bytes()).hexdigest()[:10]
        self._lock = threading.RLock()
        self._stats_lock = threading.Lock()

    # ---- models

    def get(self, name: str) -> tuple[torch.nn.Module, quant.Recipe]:
        """The quantized model for preset `name` (ValueError listing valid names when unknown); calibrates first
        when the recipe needs statistics that are not there yet (see `ready`)."""
        recipe = quant.get_recipe(name)
        with self._lock:
            if name not in self._models:
                self._make_room(self.max_models - 1)  # before building: never max_models + 1 models at once
                self._remember(name, self._load_or_build(recipe))
            self._models.move_to_end(name)
            return self._models[name]

    def add_saved(self, path: str | Path) -> quant.Recipe:
        """Serve a `save_quantized` file (made for this model) under its recipe name, no calibration."""
        model, recipe = load_quantized(self.loaded, path)
        with self._lock:
            self._files[recipe.name] = Path(path)
            self._remember(recipe.name, (model, recipe))
        return recipe

    def ready(self, name: str) -> bool:
        """Whether `get(name)` can run without calibrating."""
        recipe = quant.get_recipe(name)
        return (name in self._models or name in self._files or not recipe.needs_calibration or self.stats_ready
                or self._model_path(recipe).exists())

    @property
    def served(self) -> list[str]:
        """Recipe names served from files given at start (`--quantized`)."""
        return list(self._files)

    @property
    def cached_names(self) -> list[str]:
        return list(self._models)

    def _load_or_build(self, recipe: quant.Recipe) -> tuple[torch.nn.Module, quant.Recipe]:
        if recipe.name in self._files:
            return load_quantized(self.loaded, self._files[recipe.name], recipe)
        path = self._model_path(recipe)
        if path.exists():
            return load_quantized(self.loaded, path, recipe)
        stats = self.calibration_stats() if recipe.needs_calibration else None
        model = copy_for_quantization(self.loaded.model, recipe)
        quant.quantize_(model, recipe, stats)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_quantized(model, recipe, path)
        return model.eval(), recipe

    def _remember(self, name: str, entry: tuple[torch.nn.Module, quant.Recipe]) -> None:
        self._models[name] = entry
        self._models.move_to_end(name)
        self._make_room(self.max_models)

    def _make_room(self, keep: int) -> None:
        """Drop least recently used models until at most `keep` remain."""
        while len(self._models) > keep:
            self._models.popitem(last=False)

    def _model_path(self, recipe: quant.Recipe) -> Path:
        return self.cache_dir / f"{recipe.name}-{recipe.hash()}-{self._cache_key()}.safetensors"

    # ---- calibration

    @property
    def stats_ready(self) -> bool:
        return self._stats is not None or self._stats_path().exists()

    def calibration_stats(self, progress: bool = True) -> quant.CalibrationStats:
        """Per-layer, per-timestep activation statistics of the FP model: given at start, cached on disk, or
        computed once under `plan` (on a shared view of the model) and cached."""
        with self._stats_lock:
            if self._stats is None:
                path = self._stats_path()
                if path.exists():
                    self._stats = read_stats(path)
                else:
                    stats = self.plan.run(self.loaded, shared_view(self.loaded.model), progress=progress)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    stats.save(path)
                    self._stats = stats
            return self._stats

    def measure_speed(self) -> float:
        """Time one prompt's DiT forward at the plan's clip length (2 sampler steps, the fastest kept), for
        calibration cost estimates; returns and keeps the seconds."""
        dit, durations = quant.find_dit(self.loaded.model), []
        handles = [dit.register_forward_pre_hook(lambda *_: durations.append(-time.perf_counter())),
                   dit.register_forward_hook(lambda *_: durations.append(durations.pop() + time.perf_counter()))]
        try:
            sat.sample(self.loaded.model, [self.plan.prompts[0]], settings=self.plan.sampling.replace(steps=2),
                       seed=0, seconds=self.plan.seconds, sample_size=self.loaded.sample_length(self.plan.seconds),
                       return_latents=True)
        finally:
            for handle in handles:
                handle.remove()
        self.forward_seconds = min(durations)
        return self.forward_seconds

    def calibration_cost(self) -> str:
        """What calibrating costs, in words: the plan, and the time it takes here when measured."""
        text = self.plan.describe()
        if self.forward_seconds is not None:
            text += f", about {duration(self.plan.prompt_forwards * self.forward_seconds)} on this machine"
        return text

    def _stats_path(self) -> Path:
        return self.cache_dir / f"calibration-{self._cache_key()}.safetensors"

    def _cache_key(self) -> str:
        """Id of everything cached files depend on besides the model and recipe, the quant code included:
        a fix in quant/ must not be hidden by a stale cache."""
        spec = repr((self.plan, self._stats_source, FILE_CONTENT, quant_source_hash()))
        return hashlib.sha256(spec.encode()).hexdigest()[:10]


def duration(seconds: float) -> str:
    """Seconds in the unit a person reads them in (for cost estimates)."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"
