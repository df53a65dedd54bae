"""Quantized copies of the loaded model, one per recipe, built once and kept while memory allows.

Building a quantized model = a copy of the FP model that shares every tensor quantization leaves alone (the
autoencoder, the conditioners, and the weights of the linears it replaces until they are replaced), plus (if
the recipe calibrates) activation statistics, plus swapping the DiT's linears: memory is the FP model + the
quantized DiT, never a second FP model.

Calibration is sized per model by `CalibrationPlan.default` (see CALIBRATION_* below): a few prompts, a few
dozen DiT forwards, a clip of CALIBRATION_TOKENS DiT tokens (1.024 s of the demo model, 3 s of SAO). Statistics
are cached on disk next to the quantized models and can be given as a file (`ptq-quantize calibrate`,
`--calibration-stats`), like quantized models (`--quantized`).

A quantized-model file holds the DiT alone (`quant.save` of the DiffusionTransformer: its quantized linears
and its float tensors); the autoencoder and conditioners come from the FP checkpoint, which the app and the
CLI load anyway. `save_quantized` / `load_quantized` are the only writer and reader: the CLI, the app's cache
and `--quantized` share one format.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

import quant
from lab import sat
from lab.sat import LoadedModel, SamplerSettings

PRECISIONS = ("W8A8", "W4A8", "W8A16", "W4A16")
WEIGHT_ONLY = ("W8A16", "W4A16")  # no activation method applies
METHODS = quant.ACTIVATION_METHODS

# The calibration every entry point runs unless told otherwise (`CalibrationPlan.default`). On the demo model,
# 4 prompts x 25 steps of 1.024 s (25 DiT forwards) calibrate as well as 24 prompts x 25 steps of 2.048 s (150
# forwards, 8x the compute): scripts/calibration_size.py, table in docs/app.md.
CALIBRATION_PROMPTS = 4  # prompts, spread evenly over the prompt file
CALIBRATION_STEPS = 25  # sampler steps per prompt (the model's own steps when fewer)
CALIBRATION_TOKENS = 64  # clip length cap in DiT tokens (the model's clip when shorter)
CALIBRATION_BATCH = 4  # prompts per sampler call
FILE_CONTENT = "dit"  # what a quantized-model file holds; part of the cache key


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


def spread(items: list[str], count: int) -> list[str]:
    """`count` items evenly spaced over `items` (all of them when there are no more): a prompt file is usually
    grouped by kind, so its first lines alone would calibrate on one kind of sound."""
    if count >= len(items):
        return list(items)
    return [items[math.floor(i * len(items) / count)] for i in range(count)]


# ---- calibration ----------------------------------------------------------------------------------------

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

    def describe(self) -> str:
        return (f"{len(self.prompts)} prompts x {self.sampling.steps} steps of {self.seconds:.4g} s audio "
                f"({self.forwards} DiT forwards)")

    def run(self, loaded: LoadedModel, model: torch.nn.Module | None = None, *,
            progress: bool = True) -> quant.CalibrationStats:
        """Activation statistics of `model` (default: the loaded FP model) under this plan; the plan and the
        model it ran on are kept in the statistics' `meta`."""
        model = loaded.model if model is None else model

        def sample_every_batch() -> None:
            for start in range(0, len(self.prompts), self.batch):
                sat.sample(model, list(self.prompts[start:start + self.batch]), settings=self.sampling, seed=start,
                           seconds=self.seconds, sample_size=loaded.sample_length(self.seconds), return_latents=True)

        stats = quant.calibrate(model, sample_every_batch, progress=progress, total=self.forwards,
                                description=f"calibrating: {self.describe()}")
        stats.meta = {"model": loaded.model_id, "prompts": list(self.prompts), "steps": self.sampling.steps,
                      "seconds": self.seconds, "cfg_scale": self.sampling.cfg_scale,
                      "sampler": self.sampling.sampler_type, "batch": self.batch}
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


# ---- copies and files -----------------------------------------------------------------------------------

def _copy_sharing(model: torch.nn.Module, tensors) -> torch.nn.Module:
    """A new module tree for `model` whose parts outside the DiT, and the given `tensors`, are the FP model's own
    objects (not copies). The copy carries no hooks: a hook on the FP model at copy time belongs to its caller."""
    dit = quant.find_dit(model)
    memo = {id(child): child for child in model.children() if not any(m is dit for m in child.modules())}
    memo.update({id(tensor): tensor for tensor in tensors})
    duplicate = copy.deepcopy(model, memo)
    for module in duplicate.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._forward_hooks_with_kwargs,
                      module._forward_pre_hooks_with_kwargs, module._forward_hooks_always_called):
            hooks.clear()
    return duplicate


def shared_view(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` sharing every tensor: costs no tensor memory. Calibration runs its hooks here, so a
    generation of the FP model in another thread neither sees them nor is recorded by them."""
    return _copy_sharing(model, [*model.parameters(), *model.buffers()])


def copy_for_quantization(model: torch.nn.Module, recipe: quant.Recipe) -> torch.nn.Module:
    """A copy of the FP `model` to quantize with `recipe`: the weights of the linears the recipe replaces are
    shared (read once by `QuantLinear.from_float`, then dropped from the copy); the DiT's other tensors are
    the copy's own, since loading a file writes into them."""
    targets = quant.quantization_targets(model, recipe).values()
    return _copy_sharing(model, [t for layer in targets for t in (layer.weight, layer.bias) if t is not None])


def save_quantized(model: torch.nn.Module, recipe: quant.Recipe | str, path: str | Path) -> None:
    """Write the quantized DiT of `model` (see the module docstring for what the file holds)."""
    quant.save(quant.find_dit(model), recipe, path)


def load_quantized(loaded: LoadedModel, path: str | Path,
                   recipe: quant.Recipe | str | None = None) -> tuple[torch.nn.Module, quant.Recipe]:
    """(model, recipe) from a `save_quantized` file: the loaded model with the file's DiT. ValueError naming
    what differs when the file is missing, unreadable (truncated), for another recipe than `recipe`, for a DiT
    of another shape, or quantized from other weights than the loaded model's."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Quantized model file not found: {path}")
    try:
        file_recipe = quant.read_recipe(path)
    except ValueError:
        raise
    except Exception as error:  # safetensors raises its own error type for a truncated or damaged file
        raise ValueError(f"{path} is not a readable quantized model file (truncated or damaged?): {error}") from None
    _check_holds_a_dit(loaded.model, path)
    model = copy_for_quantization(loaded.model, file_recipe)
    quant.load(quant.find_dit(model), path, recipe=recipe)
    fp_state, q_state = quant.find_dit(loaded.model).state_dict(), quant.find_dit(model).state_dict()
    differ = [key for key, value in q_state.items() if key in fp_state and fp_state[key].shape == value.shape
              and not torch.equal(fp_state[key], value)]
    if differ:
        raise ValueError(f"{path} was quantized from other weights than the loaded model ({loaded.model_id}): "
                         f"{len(differ)} float tensors differ, e.g. {differ[:3]}")
    return model.eval(), file_recipe


def _check_holds_a_dit(model: torch.nn.Module, path: Path) -> None:
    """A `quant.save` of the whole SAT model (its DiT's tensors under the wrapper's prefix) is not this format."""
    from safetensors import safe_open

    dit = quant.find_dit(model)
    prefix = next(name for name, module in model.named_modules() if module is dit)
    with safe_open(str(path), framework="pt") as file:
        if prefix and any(key.startswith(prefix + ".") for key in file.keys()):
            raise ValueError(f"{path} holds a whole model, not its DiT: write files with `ptq-quantize quantize` "
                             f"or lab.quantized.save_quantized (quant.save of quant.find_dit(model))")


@functools.cache
def quant_source_hash() -> str:
    """Id of the quant library's code: a fix in quant/ changes quantized outputs without changing a recipe hash,
    so whatever is cached or built from them keys on this too."""
    digest = hashlib.sha256()
    for path in sorted(Path(quant.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


# ---- the cache ------------------------------------------------------------------------------------------

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
            text += f", about {_duration(self.plan.prompt_forwards * self.forward_seconds)} on this machine"
        return text

    def _stats_path(self) -> Path:
        return self.cache_dir / f"calibration-{self._cache_key()}.safetensors"

    def _cache_key(self) -> str:
        """Id of everything cached files depend on besides the model and recipe, the quant code included:
        a fix in quant/ must not be hidden by a stale cache."""
        spec = repr((self.plan, self._stats_source, FILE_CONTENT, quant_source_hash()))
        return hashlib.sha256(spec.encode()).hexdigest()[:10]


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


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
