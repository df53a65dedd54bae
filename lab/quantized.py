"""Quantized copies of the loaded model, one per recipe, built once and kept while memory allows, with the
calibration statistics they start from (computed once under the model's plan, or given as a file), cached on
disk and keyed by everything they depend on.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import hashlib
import os
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
GIB = 2**30


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

    Bounded by a count (`max_models`) and by memory (`memory_budget_gib`, default `default_memory_budget_gib`):
    before a model is built or loaded, the least recently used ones go until the models kept plus the new one's
    expected bytes fit; each model is prepared (`prepare`) as it enters, so its bytes are measured resident.

    Two locks: `_lock` guards the models (building one holds it), `_stats_lock` guards calibration, which runs
    on a shared view of the FP model: a calibration in progress never blocks serving a model that needs none.
    """

    def __init__(self, loaded: LoadedModel, *, cache_dir: str | Path, calibration_prompts: list[str],
                 calibration_count: int | None = None, calibration_steps: int | None = None,
                 calibration_seconds: float | None = None, calibration_stats: str | Path | None = None,
                 max_models: int = 3, memory_budget_gib: float | None = None):
        if max_models < 1:
            raise ValueError("max_models must be at least 1.")
        if memory_budget_gib is not None and memory_budget_gib < 0:
            raise ValueError("memory_budget_gib must not be negative.")
        self.loaded = loaded
        self.cache_dir = Path(cache_dir) / loaded.fingerprint
        self.plan = CalibrationPlan.default(loaded, calibration_prompts, count=calibration_count,
                                            steps=calibration_steps, seconds=calibration_seconds)
        self.max_models = max_models
        budget = default_memory_budget_gib() if memory_budget_gib is None else memory_budget_gib
        self.memory_budget = int(budget * GIB)  # bytes the kept quantized models may hold together
        self._sizes: dict[str, int] = {}  # recipe name -> resident bytes, measured when it entered the cache
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
                # before building: never max_models + 1 models at once, nor more bytes than the budget expects
                self._make_room(self.max_models - 1, incoming=self._expected_bytes(name))
                self._remember(name, self._load_or_build(recipe))
            self._models.move_to_end(name)
            return self._models[name]

    def add_saved(self, path: str | Path) -> quant.Recipe:
        """Serve a `save_quantized` file (made for this model) under its recipe name, no calibration."""
        with self._lock:
            self._make_room(self.max_models - 1, incoming=self._expected_bytes(""))  # room first, as `get` makes
            model, recipe = load_quantized(self.loaded, path)
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

    @property
    def held_bytes(self) -> int:
        """Resident bytes of the quantized models kept (each measured when it entered the cache)."""
        return sum(self._sizes[name] for name in self._models)

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
        prepare(entry[0], self.loaded)
        self._sizes[name] = resident_bytes(entry[0])
        self._models[name] = entry
        self._models.move_to_end(name)
        self._make_room(self.max_models, floor=1)

    def _expected_bytes(self, name: str) -> int:
        """What model `name` will hold: as measured when it was last here, else as the largest model seen."""
        return self._sizes.get(name, max(self._sizes.values(), default=0))

    def _make_room(self, keep: int, incoming: int = 0, floor: int = 0) -> None:
        """Drop least recently used models until at most `keep` remain and their bytes plus `incoming` fit the
        memory budget, keeping at least `floor` (the model just added, even when it alone passes the budget).
        Dropped models' memory goes back to the system before anything new is allocated."""
        dropped = False
        while len(self._models) > floor and (
                len(self._models) > keep or self.held_bytes + incoming > self.memory_budget):
            self._models.popitem(last=False)
            dropped = True
        if dropped:
            release_memory()

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


@torch.no_grad()
def prepare(model: torch.nn.Module, loaded: LoadedModel) -> None:
    """Run a quantized model once on a minimal clip (2 steps, one latent frame, latents only), so the one-off work
    of its first forward (int8 weights prepacked for the kernel, the weight-only path's timing probe) happens when
    it is built or loaded, not inside the first comparison's clip. The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        sat.sample(model, ["warm up"], settings=loaded.sampling.replace(steps=2, cfg_scale=1.0), seed=0,
                   sample_size=int(loaded.model.min_input_length), return_latents=True)


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes a quantized model holds beyond the FP model it shares the rest with: its DiT's tensors plus the run-time
    weight forms its layers keep (after `prepare`, what generating holds)."""
    report = quant.memory_report(quant.find_dit(model))
    return report.model_bytes + report.by_kind["cache"]


def default_memory_budget_gib() -> float:
    """Half the memory the system has available now (the FP model loaded): the other half stays free for
    generating and for building a model. Without /proc/meminfo (not Linux), the free physical pages."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:")))
        return available * 1024 / GIB / 2
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB / 2


def release_memory() -> None:
    """Collect dropped models now (module trees hold reference cycles) and hand the freed heap pages back to the
    system: glibc keeps them otherwise, and the next model would be allocated beside them."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    """glibc, where `malloc_trim` exists (Linux); None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def duration(seconds: float) -> str:
    """Seconds in the unit a person reads them in (for cost estimates)."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"
