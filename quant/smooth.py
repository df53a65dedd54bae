"""SmoothQuant factors: move activation outliers into the weight, channel by channel.

For a linear y = x W^T, dividing input channel j of x by s_j and multiplying column j of W by s_j
leaves y unchanged (x / s) (W * s)^T = x W^T, but flattens the activation's outlier channels so
a per-tensor or per-token activation quantizer wastes fewer levels on them (Xiao et al. 2023):

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

alpha = 0.5 splits the difficulty evenly; alpha -> 1 moves all of it into the weight.
"""
import torch

MIN_VALUE = 1e-5  # floor for maxima and factors: dead channels get a tiny, finite factor


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel divisors s.

    act_absmax: (in,) for one vector per layer (SmoothQuant) or (G, in) for one per timestep group (SQD).
    weight: (out, in). Returns float32 with act_absmax's shape.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    weight_absmax = weight.abs().amax(dim=0).float().clamp(min=MIN_VALUE)  # (in,)
    act = act_absmax.float().clamp(min=MIN_VALUE)
    return (act.pow(alpha) / weight_absmax.pow(1 - alpha)).clamp(min=MIN_VALUE)


def smooth_weight(weight: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """W * s column-wise: weight (out, in), factors (in,) -> (out, in) float32."""
    return weight.float() * factors


def smooth_activation(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """x / s on the last dimension: x (..., in), factors (in,)."""
    return x / factors.to(x.dtype)


# ---- which activation statistic a smoothing vector comes from ----------------------------------------

SMOOTHING_SOURCES = ("per-group", "max", "mean")
ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))  # alpha="search" tries these (0.5 included)


def smoothing_statistic(group_absmax: torch.Tensor, timestep_absmax: torch.Tensor, smoothing: str) -> torch.Tensor:
    """The per-channel activation statistic each smoothing vector is computed from: (V, in).

    group_absmax: (G, in) per-channel max |x| per timestep group; timestep_absmax: (T, in) the same per
    calibrated timestep. smoothing: "per-group" -> group_absmax itself (V = G, one vector and one weight copy
    per group, the paper's SQD); "max" -> the per-channel max over everything (V = 1, the worst case);
    "mean" -> each timestep's per-channel max divided by that timestep's per-tensor max, averaged over the
    timesteps and rescaled to the overall max (V = 1: every step's outlier pattern counts, however loud the
    step).
    """
    if smoothing == "per-group":
        return group_absmax.float()
    if smoothing == "max":
        return group_absmax.float().amax(dim=0, keepdim=True)
    if smoothing == "mean":
        per_t = timestep_absmax.float()
        profile = (per_t / per_t.amax(dim=1, keepdim=True).clamp(min=MIN_VALUE)).mean(dim=0)  # (in,) in [0, 1]
        return (profile / profile.max().clamp(min=MIN_VALUE) * per_t.max()).unsqueeze(0)
    raise ValueError(f"smoothing must be one of {SMOOTHING_SOURCES}, got {smoothing!r}")


def search_alpha(error, grid=ALPHA_GRID) -> float:
    """The alpha of `grid` with the smallest error(alpha) (the first one on ties)."""
    errors = [float(error(alpha)) for alpha in grid]
    return grid[min(range(len(grid)), key=errors.__getitem__)]
