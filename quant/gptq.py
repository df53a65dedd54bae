"""GPTQ weight rounding (Frantar et al., ICLR 2023): round a weight column by column and push each column's
rounding error onto the columns not yet rounded, weighted by the layer's input statistics, so the layer's
*output* error on calibration data shrinks instead of each weight's own error.

For inputs X (rows, in) the output error of a rounded weight Q is ||X (W - Q)^T||^2 = tr((W - Q) H (W - Q)^T)
with H = X^T X / rows. Rounding column i leaves an error e_i; the optimal update of the remaining columns is
-e_i H^-1[i, i+1:] / H^-1[i, i], read off the upper Cholesky factor of H^-1 (the paper's lazy-batch form:
blocks of columns, the rest of the matrix updated once per block). The scales are the round-to-nearest ones
of the original weight (per output channel, per group of input channels, or progressive groups' integer group
scales times a channel scale: `gptq_codes` takes any step per weight), so GPTQ only chooses codes: the stored
format, the kernels and every file stay the same.

H comes from the calibration sample rows (`quant.calibrate` keeps R rows per layer and timestep), transformed
exactly as the quantized matmul sees them (smoothed, rotated). Fewer rows than input channels leave H singular;
the dampening `GPTQ_DAMP` x mean(diag H) added to its diagonal keeps it invertible.
"""
import torch

from .primitives import quantize

GPTQ_DAMP = 0.1  # of the mean diagonal of H; 0.1 beat 0.01 on the demo model (docs/fidelity.md)
GPTQ_BLOCK = 128  # columns rounded before the rest of the weight is updated (speed only: same result)


def hessian_from_rows(rows: torch.Tensor) -> torch.Tensor:
    """H = X^T X / rows (float64, (in, in)) of input rows X (rows, in): the layer's output-error metric."""
    x = rows.double()
    return x.t() @ x / max(1, x.shape[0])


def gptq_codes(w: torch.Tensor, step: torch.Tensor, bits: int, hessian: torch.Tensor, damp: float = GPTQ_DAMP,
               block: int = GPTQ_BLOCK, lowest: int | None = None) -> torch.Tensor:
    """GPTQ's int8 codes (out, in) of `w` for the float `step` of each weight (broadcasting to (out, in)): any
    format whose value is code x step (per channel, per group, progressive groups); codes in [lowest, qmax]
    (`primitives.quantize`)."""
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"GPTQ needs a ({w.shape[1]}, {w.shape[1]}) input Hessian, got {tuple(hessian.shape)}")
    device = w.device
    column_scale = step.expand(w.shape).double()  # (out, in)
    h = hessian.to(device=device, dtype=torch.float64).clone()
    work = w.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0  # channels calibration never saw non-zero: no information, no error to spread
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=device)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty(w.shape, dtype=torch.int8, device=device)
    for start in range(0, w.shape[1], block):
        end = min(start + block, w.shape[1])
        chunk = work[:, start:end].clone()
        errors = torch.zeros_like(chunk)
        h_chunk = h_inv[start:end, start:end]
        for i in range(end - start):
            s = column_scale[:, start + i]
            codes[:, start + i] = quantize(chunk[:, i], s, bits, lowest)  # round-to-nearest of the updated column
            error = (chunk[:, i] - codes[:, start + i].double() * s) / h_chunk[i, i]
            chunk[:, i:] -= error[:, None] * h_chunk[i, i:][None, :]
            errors[:, i] = error
        work[:, end:] -= errors @ h_inv[start:end, end:]
    return codes
