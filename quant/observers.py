"""Calibration: what every linear of the DiT sees, per timestep, kept in three forms.

Per layer and per timestep t (rounded to 6 decimals; calls at the same t merge):
  absmax     float32 (T, in)       per-input-channel max |x|. Static scales take its maximum, SmoothQuant its
                                   per-channel maximum over all timesteps, SQD its maximum within each group.
  histogram  float64 (T, N_BINS)   counts of |x| over `estimators.BIN_EDGES` (fixed log-spaced bins, so they
                                   add up across calls and timesteps): the exact distribution of the layer's
                                   raw input that the "percentile" and "mse" estimators clip.
  samples    bfloat16 (T, R, in)   R token rows drawn uniformly without replacement from every row the layer
                                   saw at t (seeded priority sampling: the same forwards give the same rows).
                                   Transformed activations (smoothed x / s, rotated x R) have a distribution
                                   calibration cannot know in advance: estimators and the per-layer alpha
                                   search compute it from these rows.
Timesteps come from `TimestepTracker` (the DiT forward's `t`), never from the caller.

Cost at Stable Audio Open's scale (176 linears, 14.6 k input channels per block x 24 blocks ~ 350 k input
channels in all, 25 timesteps): absmax 35 MB, histograms 176 x 25 x 386 x 8 B = 14 MB, samples with the
default R = 8 rows 350 k x 25 x 8 x 2 B = 140 MB (R = 4: 70 MB), on the CPU during calibration and in the
file. The recording itself adds one bincount over every input element and one top-k over the rows per layer
and forward. It streams: each call is reduced at once into its layer's statistics, held in tensors allocated
at the layer's first call with a slot per timestep (32, doubled when more arrive), so nothing outlives a
forward but those tensors. (One small tensor per layer and timestep instead pinned the heap between the
forwards' transient activations: on a 4-block SAO-width DiT the process grew ~50 MB per forward, 1.35 GiB over
4 prompts x 25 steps, against 0.2 GiB now.)

Files: `save` writes format "audio-dit-ptq/calibration-2"; `load` also reads "calibration-1" files (per-
channel maxima only): such statistics serve the "max" estimator and every method as before, and recipes that
need histograms or samples raise a ValueError saying to recalibrate.
"""
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from .estimators import N_BINS, histogram
from .model import find_dit, linear_layers
from .timestep import TimestepTracker, group_index

_FORMAT = "audio-dit-ptq/calibration-2"
_FORMAT_MAX_ONLY = "audio-dit-ptq/calibration-1"
SAMPLE_ROWS = 8     # token rows kept per layer and timestep (see the module docstring for what they cost)
SAMPLE_SEED = 0
SAMPLE_DTYPE = torch.bfloat16


@dataclass
class LayerCalibration:
    """One layer's statistics, split into the G timestep groups of a recipe (what `QuantLinear.from_float` reads).

    absmax: float32 (G, in) per-channel max |x| per group. timestep_absmax: float32 (T, in), one row per
    calibrated timestep, and timestep_group: long (T,) the group of each. histogram: float64 (G, N_BINS) or
    None; samples: G float32 tensors (rows, in) or None (statistics without them: old files).
    """

    absmax: torch.Tensor
    timestep_absmax: torch.Tensor
    timestep_group: torch.Tensor
    histogram: torch.Tensor | None = None
    samples: list[torch.Tensor] | None = None

    @property
    def n_groups(self) -> int:
        return self.absmax.shape[0]

    def all_samples(self) -> torch.Tensor | None:
        """Every sampled row of every group: (rows, in) float32, or None."""
        return None if self.samples is None else torch.cat(self.samples)


@dataclass
class CalibrationStats:
    """`absmax[layer]`: float32 (T, in), row i = per-input-channel max |x| at `timesteps[i]`; `histograms[layer]`:
    float64 (T, N_BINS); `samples[layer]`: bfloat16 (T, R, in) and `sample_counts[layer]`: long (T,) how many of
    the R rows at each timestep are filled (all of them unless a timestep saw fewer than R rows).

    `timesteps` is ascending. Layers are named relative to the DiT (e.g. `transformer.layers.0.ff.ff.2`).
    Statistics loaded from a format-1 file, or built by `placeholder`, may lack histograms and samples (empty
    dicts).
    """

    timesteps: list[float]
    absmax: dict[str, torch.Tensor]
    forwards: int = 0  # DiT forward calls observed
    meta: dict = field(default_factory=dict)
    histograms: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    sample_counts: dict[str, torch.Tensor] = field(default_factory=dict)

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

    def _check_layer(self, layer: str) -> None:
        if layer not in self.absmax:
            raise ValueError(f"no calibration statistics for layer '{layer}' "
                             f"(were the stats recorded on a different model?)")

    def _groups(self, boundaries: list[float]) -> torch.Tensor:
        return torch.tensor([group_index(t, boundaries) for t in self.timesteps], dtype=torch.long)

    def grouped_absmax(self, layer: str, boundaries: list[float]) -> torch.Tensor:
        """Per-channel max |x| of `layer` within each timestep group: (G, in), G = len(boundaries) + 1."""
        self._check_layer(layer)
        per_t = self.absmax[layer]
        groups = self._groups(boundaries)
        out = torch.zeros(len(boundaries) + 1, per_t.shape[1])
        for g in range(out.shape[0]):
            out[g] = per_t[groups == g].amax(dim=0)
        return out

    @property
    def has_histograms(self) -> bool:
        return bool(self.histograms) and set(self.histograms) >= set(self.absmax)

    @property
    def has_samples(self) -> bool:
        return bool(self.samples) and set(self.samples) >= set(self.absmax)

    def layer(self, layer: str, boundaries: list[float]) -> LayerCalibration:
        """Everything recorded for `layer`, split into the timestep groups that `boundaries` define."""
        self._check_layer(layer)
        groups = self._groups(boundaries)
        n_groups = len(boundaries) + 1
        hist = samples = None
        if layer in self.histograms:
            per_t = self.histograms[layer].double()
            hist = torch.stack([per_t[groups == g].sum(dim=0) for g in range(n_groups)])
        if layer in self.samples:
            rows, counts = self.samples[layer], self.sample_counts[layer]
            samples = [torch.cat([rows[i, :int(counts[i])].float() for i in torch.nonzero(groups == g).flatten()])
                       for g in range(n_groups)]
        return LayerCalibration(self.grouped_absmax(layer, boundaries), self.absmax[layer].float(), groups,
                                hist, samples)

    @classmethod
    def placeholder(cls, model: nn.Module, n_timesteps: int = 1) -> "CalibrationStats":
        """Statistics of the right shapes for every linear of the DiT (all ones; one sampled row per timestep):
        enough to quantize a model whose bytes, not values, matter (memory reports of meta-device models)."""
        timesteps = [(i + 0.5) / n_timesteps for i in range(n_timesteps)]
        layers = linear_layers(find_dit(model))
        hist = histogram(torch.ones(1))
        return cls(timesteps, {name: torch.ones(n_timesteps, layer.in_features) for name, layer in layers.items()},
                   histograms={name: hist.repeat(n_timesteps, 1) for name in layers},
                   samples={name: torch.ones(n_timesteps, 1, layer.in_features, dtype=SAMPLE_DTYPE)
                            for name, layer in layers.items()},
                   sample_counts={name: torch.ones(n_timesteps, dtype=torch.long) for name in layers})

    # ---- persistence --------------------------------------------------------------------------

    def save(self, path) -> None:
        from safetensors.torch import save_file
        tensors = {f"absmax::{name}": value.contiguous() for name, value in self.absmax.items()}
        tensors.update({f"histogram::{name}": value.contiguous() for name, value in self.histograms.items()})
        tensors.update({f"samples::{name}": value.contiguous() for name, value in self.samples.items()})
        tensors.update({f"sample_counts::{name}": value.contiguous() for name, value in self.sample_counts.items()})
        tensors["timesteps"] = torch.tensor(self.timesteps, dtype=torch.float64)
        save_file(tensors, str(path), metadata={
            "format": _FORMAT, "forwards": str(self.forwards), "meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path) -> "CalibrationStats":
        """Statistics written by `save` (format 2), or an older format-1 file (per-channel maxima only)."""
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") not in (_FORMAT, _FORMAT_MAX_ONLY):
                raise ValueError(f"{path} is not a calibration file (format {metadata.get('format')!r}; "
                                 f"this version reads {_FORMAT!r} and {_FORMAT_MAX_ONLY!r})")
            parts: dict[str, dict[str, torch.Tensor]] = {}
            for key in f.keys():
                if "::" in key:
                    kind, name = key.split("::", 1)
                    parts.setdefault(kind, {})[name] = f.get_tensor(key)
            timesteps = f.get_tensor("timesteps").tolist()
        return cls(timesteps, parts.get("absmax", {}), int(metadata.get("forwards", 0)),
                   json.loads(metadata.get("meta", "{}")), parts.get("histogram", {}), parts.get("samples", {}),
                   parts.get("sample_counts", {}))


class _LayerBank:
    """One layer's statistics, one slot per timestep, in tensors allocated once (grown by doubling when more
    timesteps arrive than slots): the recording allocates nothing that outlives a forward, so the forward's
    transient activations leave no holes pinned by small long-lived tensors (with one small tensor per layer
    and timestep, glibc's heap grew by ~50 MB per forward of a 4-block SAO-width DiT and could not shrink)."""

    def __init__(self, width: int, sample_rows: int, capacity: int):
        self.absmax = torch.zeros(capacity, width)
        self.histogram = torch.zeros(capacity, N_BINS, dtype=torch.float64)
        self.keys = torch.empty(capacity, sample_rows)
        self.rows = torch.zeros(capacity, sample_rows, width, dtype=SAMPLE_DTYPE)
        self.counts = torch.zeros(capacity, dtype=torch.long)  # sampled rows filled per slot
        self.seen = torch.zeros(capacity, dtype=torch.bool)

    def grow(self, capacity: int) -> None:
        for name in ("absmax", "histogram", "keys", "rows", "counts", "seen"):
            old = getattr(self, name)
            new = old.new_zeros((capacity, *old.shape[1:]))
            new[:old.shape[0]] = old
            setattr(self, name, new)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.absmax, self.histogram, self.keys, self.rows, self.counts, self.seen


class _Recorder:
    """Forward hooks that fold each linear's input into per-timestep channel maxima, |x| histograms and a
    uniform sample of its rows (priority sampling: every row gets a random key from one seeded generator;
    the R smallest keys seen so far are kept), streamed: each call is reduced into its layer's bank at once."""

    INITIAL_SLOTS = 32  # timesteps before the banks grow (calibration runs 25 steps by default)

    def __init__(self, tracker: TimestepTracker, sample_rows: int, seed: int = SAMPLE_SEED):
        self.tracker = tracker
        self.sample_rows = sample_rows
        self.generator = torch.Generator().manual_seed(seed)
        self.slots: dict[float, int] = {}  # timestep -> slot, shared by every layer
        self.capacity = self.INITIAL_SLOTS
        self.banks: dict[str, _LayerBank] = {}

    def _slot(self, t: float) -> int:
        slot = self.slots.get(t)
        if slot is None:
            slot = self.slots[t] = len(self.slots)
            if slot == self.capacity:
                self.capacity *= 2
                for bank in self.banks.values():
                    bank.grow(self.capacity)
        return slot

    def hook_for(self, name: str):
        def observe(module, args):
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1])
            key = round(self.tracker.t, 6) if self.tracker.t is not None else 0.0
            slot = self._slot(key)
            bank = self.banks.get(name)
            if bank is None:
                bank = self.banks[name] = _LayerBank(rows.shape[1], self.sample_rows, self.capacity)
            channel_max = torch.maximum(rows.amax(dim=0), rows.amin(dim=0).neg()).float().cpu()  # (in,) max |x|
            if bank.seen[slot]:
                torch.maximum(bank.absmax[slot], channel_max, out=bank.absmax[slot])
            else:
                bank.absmax[slot] = channel_max
                bank.seen[slot] = True
            bank.histogram[slot] += histogram(rows).cpu()
            if self.sample_rows:
                self._sample(bank, slot, rows)
        return observe

    def _sample(self, bank: _LayerBank, slot: int, rows: torch.Tensor) -> None:
        """Keep the R rows with the smallest keys among those kept so far and these (only kept rows leave
        the device): the kept old rows first, then the kept new ones."""
        keys = torch.rand(rows.shape[0], generator=self.generator)
        n_old = int(bank.counts[slot])
        all_keys = torch.cat([bank.keys[slot, :n_old], keys])
        kept = torch.topk(all_keys, min(self.sample_rows, all_keys.numel()), largest=False).indices
        from_old, from_new = kept[kept < n_old], kept[kept >= n_old] - n_old
        n_kept = kept.numel()
        new_rows = rows[from_new.to(rows.device)].to("cpu", SAMPLE_DTYPE)
        bank.rows[slot, :n_kept] = torch.cat([bank.rows[slot, from_old], new_rows])
        bank.keys[slot, :n_kept] = torch.cat([bank.keys[slot, from_old], keys[from_new]])
        bank.counts[slot] = n_kept

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor the recording keeps between calls (its memory is these, allocated once per layer)."""
        return [tensor for bank in self.banks.values() for tensor in bank.tensors()]

    def stats(self) -> CalibrationStats:
        timesteps = sorted(self.slots)
        order = torch.tensor([self.slots[t] for t in timesteps], dtype=torch.long)
        absmax, histograms, samples, sample_counts = {}, {}, {}, {}
        for name, bank in self.banks.items():
            absmax[name] = bank.absmax[order]  # zeros where the layer did not run at a timestep
            histograms[name] = bank.histogram[order]
            if self.sample_rows:
                samples[name], sample_counts[name] = bank.rows[order], bank.counts[order]
        return CalibrationStats(timesteps, absmax, self.tracker.calls, histograms=histograms, samples=samples,
                                sample_counts=sample_counts)


@torch.no_grad()
def calibrate(model: nn.Module, forward_loop, *, progress: bool = True, total: int | None = None,
              description: str = "calibrating (DiT forwards)", sample_rows: int = SAMPLE_ROWS) -> CalibrationStats:
    """Run `forward_loop()` (a zero-argument callable that drives the FP model, e.g. the SAT sampler
    over calibration prompts) and record, for every linear of the DiT and every timestep seen, the
    per-input-channel max |x|, a histogram of |x| and `sample_rows` sampled input rows (see the module docstring).

    Timesteps are rounded to 6 decimals; calls at the same t (several prompts, same schedule) merge.
    total: the DiT forwards `forward_loop` will make, when the caller knows: the progress bar then shows an ETA.
    sample_rows: rows kept per layer and timestep (0 = none: recipes with a smoothed or rotated static
    estimator, or an alpha search, then cannot use these statistics).
    """
    if not isinstance(sample_rows, int) or sample_rows < 0:
        raise ValueError(f"calibrate: sample_rows must be an integer >= 0, got {sample_rows!r}")
    dit = find_dit(model)
    layers = linear_layers(dit)
    if not layers:
        raise ValueError("calibrate: the model has no nn.Linear layers to observe")
    handles = []
    with TimestepTracker(dit) as tracker:
        recorder = _Recorder(tracker, sample_rows)
        handles = [layer.register_forward_pre_hook(recorder.hook_for(name)) for name, layer in layers.items()]
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(desc=description, unit="fwd", total=total)

            def count(*_) -> None:  # a forward hook's non-None return would replace the DiT's output
                bar.update(1)
            handles.append(dit.register_forward_hook(count))
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
