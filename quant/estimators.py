"""Range estimators for static (per-tensor) activation scales: max, percentile, MSE-optimal clipping, and clipping
chosen on held-out calibration rows.

A static scale maps [-c, c] onto the integer codes; anything beyond the clip value c saturates. Taking c as
the largest |x| ever seen ("max") lets one loud token or one loud timestep set the step size for every other
value. A smaller c trades saturation of the rare loud values for finer steps on the rest:

- "percentile": c = the p-th percentile of |x| (p = 100 is the max);
- "mse": the c that minimises the expected squared error of quantize-dequantize over the observed |x|:
  values above c cost (|x| - c)^2, values below it the rounding error: Delta^2 / 12 with Delta = c / qmax,
  or x^2 for values that round to zero (|x| < Delta / 2). The max is one of the candidates, so on the data it
  is computed from "mse" is never worse than "max" (up to the histogram's resolution).
- "holdout": c = m x the max of the calibration sample rows, with the factor m (below or above 1) that a
  two-fold split of the rows chooses: the range is estimated on one half and its quantization error measured on
  the other, so m learns how far new rows stray beyond a range estimated without them (a prompt the calibration
  never saw exceeds calibrated ranges; the max of the rows it was fitted on cannot tell by how much).

The distribution of |x| is a histogram over fixed, log-spaced bins (`BIN_EDGES`: `BINS_PER_OCTAVE` bins per
power of two between 2^LOW_EXP and 2^HIGH_EXP, plus one bin below for zeros and tiny values and one above),
so histograms from different calls, prompts and timesteps add up (calibration keeps one per layer per
timestep; a timestep group's is their sum). Within a bin, values are taken at the bin's geometric centre
(relative error < 2^(1/16) - 1 = 4.4 %).
"""
import math

import torch

from .primitives import qmax

BINS_PER_OCTAVE = 8
LOW_EXP, HIGH_EXP = -24, 24          # |x| in [2^-24, 2^24) gets log-spaced bins; below and above: one bin each
N_LOG_BINS = (HIGH_EXP - LOW_EXP) * BINS_PER_OCTAVE
N_BINS = N_LOG_BINS + 2              # [0, 2^-24), the log bins, [2^24, inf)
# edges of the log bins: BIN_EDGES[k] is the lower edge of bin k + 1
BIN_EDGES = torch.pow(2.0, torch.arange(N_LOG_BINS + 1, dtype=torch.float64) / BINS_PER_OCTAVE + LOW_EXP)
# the value a bin stands for: geometric centre of the log bins, the lower edge's half for bin 0, the upper
# edge for the overflow bin
BIN_VALUES = torch.cat([BIN_EDGES[:1] / 2, (BIN_EDGES[:-1] * BIN_EDGES[1:]).sqrt(), BIN_EDGES[-1:]])

ESTIMATORS = ("max", "percentile", "mse", "holdout")
HOLDOUT_FACTORS = torch.pow(2.0, torch.arange(-16, 9) / 8)  # "holdout" tries m = 1/4 .. 2 (8 steps per octave)
MSE_GRID_OCTAVES = 8                 # "mse" tries clip values from the max down to max / 2^8
MSE_GRID_PER_OCTAVE = 16


def histogram(x: torch.Tensor) -> torch.Tensor:
    """Counts of |x| over the fixed bins: float64 (N_BINS,), on x's device. Non-finite values count as overflow.

    log2 |x| clamped into one bin below and one above the log range, then a single `histc` (a bincount of
    bin indices, or separate counts of the out-of-range values, cost 2-4x more on CPU)."""
    exponent = x.detach().float().abs().reshape(-1).log2_()  # abs() allocates: the in-place ops touch a copy
    half_bin = 0.5 / BINS_PER_OCTAVE
    exponent.clamp_(LOW_EXP - half_bin, HIGH_EXP + half_bin)  # zeros (-inf) and inf land in the end bins
    edge = 1 / BINS_PER_OCTAVE
    counts = torch.histc(exponent, bins=N_BINS, min=LOW_EXP - edge, max=HIGH_EXP + edge).double()
    counts[-1] += exponent.numel() - counts.sum()  # NaN: histc skips it, count it as overflow
    return counts


def check_estimator(estimator: str, percentile: float) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not isinstance(percentile, (int, float)) or isinstance(percentile, bool) or not 0 < percentile <= 100:
        raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}")


def clip_value(counts: torch.Tensor | None, absmax: float, estimator: str, bits: int,
               percentile: float = 99.99) -> float:
    """The clip value c (<= absmax) for one static scale.

    counts: histogram of |x| (N_BINS,) (`histogram`), unused by "max"; absmax: the largest |x| (exact, or
    the best bound known): "max" returns it, the others never exceed it.
    """
    check_estimator(estimator, percentile)
    absmax = float(absmax)
    if estimator == "max" or absmax <= 0 or not math.isfinite(absmax):
        return absmax
    if counts is None:
        raise ValueError(f"estimator {estimator!r} needs a histogram of |x|")
    counts = counts.detach().double().cpu()
    total = float(counts.sum())
    if total <= 0:
        return absmax
    if estimator == "percentile":
        return min(absmax, _percentile(counts, total, percentile))
    return _mse_clip(counts, absmax, bits)


def _percentile(counts: torch.Tensor, total: float, percentile: float) -> float:
    """The smallest value v with (fraction of |x| <= v) >= percentile / 100, interpolated log-linearly
    within its bin."""
    if percentile >= 100:
        nonzero = torch.nonzero(counts).flatten()
        return float(_upper_edge(int(nonzero[-1])))
    target = total * percentile / 100
    cumulative = torch.cumsum(counts, 0)
    k = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)).clamp(max=N_BINS - 1))
    if k == 0 or k == N_BINS - 1:
        return float(BIN_VALUES[k])
    below = float(cumulative[k - 1]) if k > 0 else 0.0
    fraction = (target - below) / max(float(counts[k]), 1e-300)
    low, high = float(BIN_EDGES[k - 1]), float(BIN_EDGES[k])
    return low * (high / low) ** min(max(fraction, 0.0), 1.0)


def _upper_edge(k: int) -> float:
    if k == 0:
        return float(BIN_EDGES[0])
    return float(BIN_EDGES[min(k, N_LOG_BINS)])


def _mse_clip(counts: torch.Tensor, absmax: float, bits: int) -> float:
    """argmin over a log grid of clip values (absmax included) of the expected quantize-dequantize error."""
    q = qmax(bits)
    values = BIN_VALUES.clamp(max=absmax)                                    # (B,)
    steps = torch.arange(MSE_GRID_OCTAVES * MSE_GRID_PER_OCTAVE + 1, dtype=torch.float64)
    candidates = absmax * torch.pow(2.0, -steps / MSE_GRID_PER_OCTAVE)      # (C,) descending, [0] = absmax
    delta = (candidates / q)[:, None]                                        # (C, 1)
    v = values[None, :]
    rounding = torch.where(v < delta / 2, v * v, delta * delta / 12)
    clipped = (v - candidates[:, None]).clamp(min=0) ** 2
    error = torch.where(v > candidates[:, None], clipped, rounding) @ counts  # (C,)
    return float(candidates[int(torch.argmin(error))])


def holdout_clip(rows: torch.Tensor, bits: int) -> float:
    """c = m x max |rows| for the factor m of HOLDOUT_FACTORS with the least quantize-dequantize error summed over
    a two-fold split of `rows` (tokens, channels): each half quantized with the range m x max of the other."""
    x = rows.detach().float()
    halves = (x[0::2], x[1::2]) if x.shape[0] > 1 else (x, x)
    q = qmax(bits)
    errors = torch.zeros(len(HOLDOUT_FACTORS), dtype=torch.float64)
    for fit, held in (halves, halves[::-1]):
        top = float(fit.abs().amax())
        for i, factor in enumerate(HOLDOUT_FACTORS.tolist()):
            step = max(top * factor / q, 1e-12)
            errors[i] += float((torch.round(held / step).clamp_(-q, q) * step - held).pow_(2).sum())
    return float(HOLDOUT_FACTORS[int(torch.argmin(errors))]) * float(x.abs().amax())
