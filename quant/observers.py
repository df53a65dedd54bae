"""Calibration: per-layer, per-timestep, per-input-channel max |x| of every linear's input.

That one statistic serves every method: static takes its per-tensor maximum, SmoothQuant its
per-channel maximum over all timesteps, SQD its per-channel maximum within each timestep group.
Timesteps come from `TimestepTracker` (the DiT forward's `t`), never from the caller.
"""
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from .model import find_dit, linear_layers
from .timestep import TimestepTracker, group_index

_FORMAT = "audio-dit-ptq/calibration-1"


@dataclass
class CalibrationStats:
    """`absmax[layer]`: float32 (T, in), row i = per-input-channel max |x| at `timesteps[i]`.

    `timesteps` is ascending. Layers are named relative to the DiT (e.g. `transformer.layers.0.ff.ff.2`).
    """

    timesteps: list[float]
    absmax: dict[str, torch.Tensor]
    forwards: int = 0  # DiT forward calls observed
    meta: dict = field(default_factory=dict)

    # ---- timestep groups ----------------------------------------------------------------------

    def group_boundaries(self, n_groups: int) -> list[float]:
        """Split the calibrated timesteps into `n_groups` contiguous groups of (nearly) equal count.

        Returns the G-1 ascending boundaries in t (midpoints between neighbouring groups), so a
        sampler with a different number of steps still maps any t to a group.
        """
        n = len(self.timesteps)
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        if n_groups > n:
            raise ValueError(f"{n_groups} timestep groups need at least {n_groups} calibrated "
                             f"timesteps; the stats hold {n}. Calibrate with more sampler steps.")
        cuts = [round(k * n / n_groups) for k in range(1, n_groups)]
        return [(self.timesteps[c - 1] + self.timesteps[c]) / 2 for c in cuts]

    def grouped_absmax(self, layer: str, boundaries: list[float]) -> torch.Tensor:
        """Per-channel max |x| of `layer` within each timestep group: (G, in), G = len(boundaries) + 1."""
        if layer not in self.absmax:
            raise ValueError(f"no calibration statistics for layer '{layer}' "
                             f"(were the stats recorded on a different model?)")
        per_t = self.absmax[layer]
        groups = torch.tensor([group_index(t, boundaries) for t in self.timesteps])
        out = torch.zeros(len(boundaries) + 1, per_t.shape[1])
        for g in range(out.shape[0]):
            out[g] = per_t[groups == g].amax(dim=0)
        return out

    @classmethod
    def placeholder(cls, model: nn.Module, n_timesteps: int = 1) -> "CalibrationStats":
        """Statistics of the right shapes (all ones) for every linear of the DiT: enough to quantize a model whose
        bytes, not values, matter (memory reports of meta-device models)."""
        timesteps = [(i + 0.5) / n_timesteps for i in range(n_timesteps)]
        return cls(timesteps, {name: torch.ones(n_timesteps, layer.in_features)
                               for name, layer in linear_layers(find_dit(model)).items()})

    # ---- persistence --------------------------------------------------------------------------

    def save(self, path) -> None:
        from safetensors.torch import save_file
        tensors = {f"absmax::{name}": value.contiguous() for name, value in self.absmax.items()}
        tensors["timesteps"] = torch.tensor(self.timesteps, dtype=torch.float64)
        save_file(tensors, str(path), metadata={
            "format": _FORMAT, "forwards": str(self.forwards), "meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path) -> "CalibrationStats":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _FORMAT:
                raise ValueError(f"{path} is not a calibration file (format {metadata.get('format')!r})")
            absmax = {key.split("::", 1)[1]: f.get_tensor(key) for key in f.keys() if key.startswith("absmax::")}
            timesteps = f.get_tensor("timesteps").tolist()
        return cls(timesteps, absmax, int(metadata.get("forwards", 0)), json.loads(metadata.get("meta", "{}")))


class _Recorder:
    """Forward hooks that fold each linear's input into per-timestep channel maxima."""

    def __init__(self, tracker: TimestepTracker):
        self.tracker = tracker
        self.per_layer: dict[str, dict[float, torch.Tensor]] = {}

    def hook_for(self, name: str):
        per_t = self.per_layer.setdefault(name, {})

        def observe(module, args):
            x = args[0].detach()
            channel_max = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float().cpu()  # (in,)
            key = round(self.tracker.t, 6) if self.tracker.t is not None else 0.0
            seen = per_t.get(key)
            per_t[key] = channel_max if seen is None else torch.maximum(seen, channel_max)
        return observe

    def stats(self) -> CalibrationStats:
        timesteps = sorted({t for per_t in self.per_layer.values() for t in per_t})
        absmax = {}
        for name, per_t in self.per_layer.items():
            if not per_t:
                continue
            width = next(iter(per_t.values())).shape[0]
            absmax[name] = torch.stack([per_t.get(t, torch.zeros(width)) for t in timesteps])
        return CalibrationStats(timesteps, absmax, self.tracker.calls)


@torch.no_grad()
def calibrate(model: nn.Module, forward_loop, *, progress: bool = True, total: int | None = None,
              description: str = "calibrating (DiT forwards)") -> CalibrationStats:
    """Run `forward_loop()` (a zero-argument callable that drives the FP model, e.g. the SAT sampler
    over calibration prompts) and record, for every linear of the DiT and every timestep seen, the
    per-input-channel max |x|.

    Timesteps are rounded to 6 decimals; calls at the same t (several prompts, same schedule) merge.
    total: the DiT forwards `forward_loop` will make, when the caller knows: the progress bar then shows an ETA.
    """
    dit = find_dit(model)
    layers = linear_layers(dit)
    if not layers:
        raise ValueError("calibrate: the model has no nn.Linear layers to observe")
    handles = []
    with TimestepTracker(dit) as tracker:
        recorder = _Recorder(tracker)
        handles = [layer.register_forward_pre_hook(recorder.hook_for(name)) for name, layer in layers.items()]
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(desc=description, unit="fwd", total=total)
            handles.append(dit.register_forward_hook(lambda *_: bar.update(1)))
        try:
            forward_loop()
        finally:
            for handle in handles:
                handle.remove()
            if progress:
                bar.close()
    stats = recorder.stats()
    if not stats.absmax:
        raise ValueError("calibrate: forward_loop() never ran the model's linear layers")
    return stats
