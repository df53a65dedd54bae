"""Orthogonal rotation of a linear's input channels: block-diagonal Hadamard (QuaRot-style, no random signs).

For an orthogonal R, y = x W^T = (x R)(W R)^T. Rotating spreads a loud input channel evenly over the `block`
channels of its block (each rotated channel gets 1/sqrt(block) of it), so per-tensor and per-token
activation scales waste fewer levels on outlier channels, and the rotated weight's rows lose their own
outliers the same way. The weight is rotated once, before quantizing (what is stored is Q(W R)); the
activation is rotated at run time, before it is quantized (`rotate`: a small float matmul and butterflies).

R = diag(H, ..., H) with H the normalised Sylvester-Hadamard matrix of size `block` (a power of two), which is
symmetric and its own inverse, so rotating twice gives x back. A recipe's rotation is the largest block: each
layer uses the largest power of two up to it that divides its in_features (`layer_block`), so one recipe fits
models of different widths. Nothing is stored: R follows from the block and the layer's width.
"""
import functools

import torch


def check_block(block: int, in_features: int | None = None, name: str = "") -> None:
    """ValueError unless `block` is a power of two >= 2 dividing `in_features` (when given)."""
    if not isinstance(block, int) or isinstance(block, bool) or block < 2 or block & (block - 1):
        raise ValueError(f"rotation block must be a power of two >= 2, got {block!r}")
    if in_features is not None and in_features % block:
        where = f" of layer '{name}'" if name else ""
        raise ValueError(f"rotation block {block} does not divide in_features {in_features}{where}: choose a "
                         f"power of two that divides every quantized layer's width (e.g. "
                         f"{largest_block(in_features)} here), or skip the layer")


def layer_block(block: int | None, in_features: int, name: str = "") -> int | None:
    """The block a layer of width `in_features` uses under a recipe's largest `block` (None: no rotation): the
    largest power of two <= block dividing in_features. ValueError when that is 1 (an odd width)."""
    if block is None:
        return None
    check_block(block)
    used = min(block, largest_block(in_features))
    if used < 2:
        where = f" of layer '{name}'" if name else ""
        raise ValueError(f"rotation needs an even in_features to rotate over, got {in_features}{where}: skip the layer")
    return used


def largest_block(in_features: int) -> int:
    """The largest power of two dividing in_features (1 when it is odd)."""
    return in_features & -in_features


@functools.cache
def _hadamard_cpu(block: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / block ** 0.5).float()


def hadamard(block: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The normalised Sylvester-Hadamard matrix (block, block): orthogonal, symmetric, H @ H = I."""
    check_block(block)
    return _hadamard_cpu(block).to(device=device, dtype=dtype)


MATMUL_BLOCK = 32  # the largest Hadamard factor `rotate` multiplies as a matrix; larger blocks end in butterflies


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """x R on the last dimension: x (..., in) -> (..., in), R = diag(H_block, ...). Its own inverse.

    Also rotates a weight (out, in) along its input channels: W R, so that (x R)(W R)^T = x W^T.

    Sylvester's H_block = H_2 x ... x H_2 x H_sub (Kronecker), so x R is a matmul by H_sub (sub = MATMUL_BLOCK or
    less), then one butterfly (a, b) -> (a + b, a - b) per remaining factor of 2, in place on the product. A
    (tokens, 128) @ H_128 is compute-bound at 2 x 128 flops per value; this does 2 x 32 and two adds per butterfly,
    whose two in-place passes cost less than the flops they save (`python -m bench.kernels` times both forms).
    """
    in_features = x.shape[-1]
    check_block(block, in_features)
    sub = min(block, MATMUL_BLOCK)
    y = x.reshape(-1, sub) @ (hadamard(sub, x.device, x.dtype) * (sub / block) ** 0.5)  # H_sub scaled for H_block
    half = sub
    while half < block:
        pairs = y.view(-1, block // (2 * half), 2, half)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        a.add_(b)
        torch.add(a, b, alpha=-2, out=b)  # (a + b) - 2 b = a - b: in place, no temporary
        half *= 2
    return y.reshape(x.shape)
