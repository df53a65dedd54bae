"""How the denoising timestep reaches the quantized layers: a forward pre-hook on the DiT.

The DiffusionTransformer's forward receives `t` (positionally after `x`, or as keyword `t`) on every
denoising step. A `TimestepTracker` reads it there, before any layer runs, so calibration observers,
timestep-aware smoothing (SQD) and per-step statistics in the engine all see the same value, and
nobody has to set a global by hand at call sites.

`t` is a batch vector. SAT's samplers give every batch item the same timestep, and classifier-free
guidance duplicates the batch with the same `t`, so the tracker keeps `t[0]` as a Python float.
"""
import bisect

import torch
from torch import nn


class TimestepTracker:
    """Remembers the `t` of the latest forward of `module` (None before the first call, or when the
    module's forward takes no timestep).

    Usage: `tracker = TimestepTracker(dit)`; after `dit(x, t, ...)` starts, `tracker.t` is `float(t[0])`.
    `tracker.remove()` detaches the hook. `TimestepTracker.shared(dit)` returns one tracker per module,
    the one quantized layers use.
    """

    _SHARED_ATTR = "_quant_timestep_tracker"

    def __init__(self, module: nn.Module, *, arg_index: int = 1, kwarg_name: str = "t"):
        self.t: float | None = None
        self.calls = 0  # number of forwards seen: one per sampler step (CFG is batched)
        self._arg_index = arg_index
        self._kwarg_name = kwarg_name
        self._handle = module.register_forward_pre_hook(self._capture, with_kwargs=True)

    @classmethod
    def shared(cls, module: nn.Module) -> "TimestepTracker":
        """The tracker attached to `module` for quantized layers, created on first use."""
        tracker = module.__dict__.get(cls._SHARED_ATTR)
        if tracker is None:
            tracker = cls(module)
            module.__dict__[cls._SHARED_ATTR] = tracker  # plain attribute: not a submodule, not saved
        return tracker

    def _capture(self, module, args, kwargs):
        t = kwargs.get(self._kwarg_name)
        if t is None and len(args) > self._arg_index:
            t = args[self._arg_index]
        if t is None:  # a module tree without timesteps (plain stack of linears): nothing to track
            self.t = None
        else:
            self.t = float(t.reshape(-1)[0]) if torch.is_tensor(t) else float(t)
        self.calls += 1

    def set(self, t: float) -> None:
        """Set the timestep explicitly, for layers used outside a DiT forward (tests, analysis)."""
        self.t = float(t)

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def group_index(t: float, boundaries: list[float]) -> int:
    """Timestep group of `t` given ascending group boundaries (G-1 values for G groups).

    Group 0 holds the smallest timesteps (least noise), group G-1 the largest.
    """
    return bisect.bisect_right(boundaries, t)
