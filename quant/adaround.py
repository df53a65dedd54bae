"""AdaRound weight rounding (Nagel et al., ICML 2020): learn, per weight, whether to round down or up, so the
layer's output error on calibration data is smallest, starting from GPTQ's codes and never ending worse.

The objective is GPTQ's (quant/gptq.py): f(Q) = tr((W - Q) H (W - Q)^T) with H = X^T X / rows of the layer's
calibration sample rows as the matmul sees them, damped as GPTQ damps it (`ADAROUND_DAMP` x mean(diag H) on the
diagonal, which keeps few rows from being fitted too closely; GPTQ's own `GPTQ_DAMP` by default). It is
evaluated through a factor, H = F F^T + d I (F from H's eigenvectors: in x rank, the rank at most the number of
rows), so an iteration costs ~4 x out x in x rank multiply-adds and no activation is stored.

Each weight chooses between two adjacent codes lo and lo + 1 in [-qmax, qmax] that contain its initial code (GPTQ's,
or round-to-nearest's) on the side of its float value w / step. The choice is relaxed to h = clip(sigmoid(V)
(ZETA - GAMMA) + GAMMA, 0, 1) (the rectified sigmoid), started at the float value (h = w / step - lo, clipped),
and Adam minimises f(step (lo + h)) / f(initial codes) + LAMBDA x mean(1 - |2h - 1|^beta): the regulariser,
off for the first WARMUP of the schedule, then with beta annealed from 20 to 2, pushes every h to 0 or 1.
The hard rounding (h >= 1/2) is scored every CHECK_EVERY iterations and the best one is returned, the initial
codes included: the result never has a higher objective than its initialisation.

Budget per layer: `ADAROUND_ITERATIONS` iterations or `ADAROUND_WORK` multiply-adds, whichever ends first (the
count follows from the layer's shape and H's rank, not from a clock: the same codes on every machine and load). The
schedule (warm-up, annealing) runs over that count, so a layer cut short by the work budget still anneals to hard
codes.
"""
import torch

from .gptq import GPTQ_DAMP, gptq_codes
from .primitives import qmax, quantize

ADAROUND_ITERATIONS = 500  # per layer
ADAROUND_WORK = 2e12       # multiply-adds per layer: every demo-model layer runs its 500 iterations; SAO's
                           # (H's rank <= its ~275 calibration rows) 190-500
ADAROUND_DAMP = GPTQ_DAMP  # H's dampening in the objective and in the GPTQ codes it starts from
ADAROUND_LR = 0.05         # Adam's step on V
ZETA, GAMMA = 1.1, -0.1    # the rectified sigmoid's stretch (the paper's values)
LAMBDA = 10.0              # regulariser weight against the output error relative to the initial codes'
BETA = (20.0, 2.0)         # the regulariser's exponent, annealed from the first to the second
WARMUP = 0.2               # fraction of the schedule without the regulariser
CHECK_EVERY = 10           # iterations between scorings of the hard rounding


def _factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """(F float32 (in, rank), d) with F F^T + d I = H damped as GPTQ damps it (channels calibration never saw
    count as unit diagonal, then damp x mean(diag H) is added to the diagonal)."""
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    d = damp * float(torch.diagonal(h).mean())
    values, vectors = torch.linalg.eigh(h)
    keep = values > values.amax() * 1e-10
    return (vectors[:, keep] * values[keep].sqrt()).float(), d


def _objective(error: torch.Tensor, f: torch.Tensor, d: float) -> torch.Tensor:
    """tr(E (F F^T + d I) E^T) of the weight error E (out, in)."""
    return (error @ f).pow(2).sum() + d * error.pow(2).sum()


def _inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    h = h.clamp(0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def adaround_codes(w: torch.Tensor, step: torch.Tensor, bits: int, hessian: torch.Tensor,
                   init: torch.Tensor | str = "gptq", damp: float = GPTQ_DAMP,
                   iterations: int | None = None, work: float | None = None,
                   lowest: int | None = None) -> torch.Tensor:
    """AdaRound's int8 codes (out, in) of `w` for the float `step` of each weight (broadcasting to (out, in); any
    format whose value is code x step, like `gptq_codes`), in [lowest, qmax] (`primitives.quantize`). init:
    "gptq", "nearest", or int8 codes (out, in); iterations / work: the budget (None: `ADAROUND_ITERATIONS` /
    `ADAROUND_WORK`, read at the call)."""
    iterations = ADAROUND_ITERATIONS if iterations is None else iterations
    work = ADAROUND_WORK if work is None else work
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"AdaRound needs a ({w.shape[1]}, {w.shape[1]}) input Hessian, got {tuple(hessian.shape)}")
    if isinstance(init, str):
        if init not in ("gptq", "nearest"):
            raise ValueError(f"AdaRound's init must be 'gptq', 'nearest' or codes, got {init!r}")
        init = (gptq_codes(w, step, bits, hessian, damp, lowest=lowest) if init == "gptq"
                else quantize(w, step, bits, lowest))
    q = qmax(bits)
    lowest = -q if lowest is None else lowest
    w = w.float()
    step = step.float().expand(w.shape)
    f, d = _factor(hessian.to(w.device), damp)
    start = init.float()
    ratio = w / step
    low = torch.where(ratio >= start, start, start - 1).clamp(lowest, q - 1)  # {low, low + 1} holds the start
    v = _inverse_rectified_sigmoid(ratio - low)
    best, best_error = init.clone(), float(_objective(w - start * step, f, d))
    metric = (f, d, max(best_error, 1e-30))
    moments = (torch.zeros_like(v), torch.zeros_like(v))
    total = int(min(iterations, work // (4 * w.numel() * f.shape[1] + 1)))  # 4 x out x in x rank per iteration
    for i in range(total):
        progress = (i + 1) / total
        _adam_step(v, _gradient(v, low, w, step, metric, progress), moments, i + 1)
        if (i + 1) % CHECK_EVERY == 0 or progress >= 1:
            codes = low + (v >= 0).float()  # h >= 1/2 exactly where V >= 0 (the stretch is symmetric)
            error = float(_objective(w - codes * step, f, d))
            if error < best_error:
                best, best_error = codes.to(torch.int8), error
    return best


def _gradient(v, low, w, step, metric, progress: float) -> torch.Tensor:
    """d/dV of the loss: the soft rounding's output error relative to the initial codes' (metric = (F, d, that
    error)) plus, after the warm-up, LAMBDA x mean(1 - |2h - 1|^beta) with beta annealed (in closed form: cheaper
    than autograd, and it runs under the no_grad of quantize_)."""
    f, d, scale = metric
    sigmoid = torch.sigmoid(v)
    stretched = sigmoid * (ZETA - GAMMA) + GAMMA
    h = stretched.clamp(0.0, 1.0)
    error = w - (low + h) * step
    grad_h = (error @ f @ f.t() + d * error).mul_(step).mul_(-2.0 / scale)
    if progress > WARMUP:
        beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - (progress - WARMUP) / (1 - WARMUP))
        t = 2 * h - 1
        grad_h -= (2 * beta * LAMBDA / h.numel()) * t.abs().pow(beta - 1) * t.sign()
    inside = (stretched > 0) & (stretched < 1)  # the clip passes no gradient
    return grad_h * (ZETA - GAMMA) * sigmoid * (1 - sigmoid) * inside


def _adam_step(v: torch.Tensor, grad: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor], count: int,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One Adam update of v in place (Kingma & Ba), with ADAROUND_LR."""
    first, second = moments
    first.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    second.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    denominator = (second / (1 - betas[1] ** count)).sqrt_().add_(eps)
    v.addcdiv_(first, denominator, value=-ADAROUND_LR / (1 - betas[0] ** count))


def hessian_codes(w: torch.Tensor, step: torch.Tensor, bits: int, hessian: torch.Tensor, rounding: str,
                  lowest: int | None = None) -> torch.Tensor:
    """The codes in [lowest, qmax] that `rounding` ("gptq" or "adaround", `Recipe.weight_rounding`) chooses for
    `w` under `hessian`."""
    if rounding == "gptq":
        return gptq_codes(w, step, bits, hessian, lowest=lowest)
    return adaround_codes(w, step, bits, hessian, init=gptq_codes(w, step, bits, hessian, ADAROUND_DAMP, lowest=lowest),
                          damp=ADAROUND_DAMP, lowest=lowest)
