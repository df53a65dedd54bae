"""One batch of prompts through the evaluated model, with what the fidelity metrics need recorded on the way.

Sampling itself is `lab.sat.sample` (the project's one adapter to stable-audio-tools); this module adds the
sampler state x at every step, the wall time, and running only the DiT in bf16 for the bf16 row.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lab import sat
from lab.sat import LoadedModel, SamplerSettings


@dataclass
class Batch:
    audio: np.ndarray                 # (prompts, channels, samples) float32
    trajectory: list[torch.Tensor]    # the sampler's state x at each step, (prompts, C, T) float32
    seconds: float                    # wall time of the whole batch


class _Autocast(nn.Module):
    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=self.dtype):
            return self.inner(*args, **kwargs)


@contextlib.contextmanager
def dit_autocast(model: nn.Module, dtype: torch.dtype | None):
    """Run only the DiT (`model.model`, which SAT's samplers call) under CPU autocast in `dtype`. The quantized
    rows change only the DiT, so the bf16 row does too: the pretransform stays fp32 (the demo model's MDCT
    autoencoder adds 64 before each ELU, where bf16 keeps a resolution of 0.5)."""
    if dtype is None:
        yield
        return
    dit = model.model
    model.model = _Autocast(dit, dtype)
    try:
        yield
    finally:
        model.model = dit


def generate_batch(model: nn.Module, loaded: LoadedModel, prompts: list[str], *, seed: int,
                   settings: SamplerSettings, compute_dtype: torch.dtype | None = None) -> Batch:
    """All prompts in one sampler call (one seed -> one noise tensor for the batch), recording the sampler state
    x at every step. Same prompts + seed -> the same initial noise for every model. `settings.seconds` None
    means the model's default length.

    compute_dtype: run the DiT under CPU autocast in that dtype (the bf16 row): a bf16 *model* would make SAT
    draw the initial and Brownian noise in bf16, i.e. a different sample rather than a precision effect."""
    seconds = settings.seconds or loaded.seconds
    trajectory = []
    with dit_autocast(model, compute_dtype):
        start = time.perf_counter()
        audio = sat.sample(model, prompts, settings=settings, seconds=seconds, seed=seed,
                           sample_size=loaded.sample_length(seconds),
                           callback=lambda info: trajectory.append(info["x"].detach().float().clone()))
        elapsed = time.perf_counter() - start
    samples = round(seconds * loaded.sample_rate)
    return Batch(audio[:, :, :samples].float().cpu().numpy(), trajectory, elapsed)
