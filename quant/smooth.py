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
