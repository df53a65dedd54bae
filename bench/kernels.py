"""Per-layer kernel timings at SAO's linear shapes: the measurements `quant.kernels` chooses its paths by.

    python -m bench.kernels [--reps 7] [--tokens 514]

One linear layer of each of SAO's three width pairs (K x N: 1536 x 1536, 1536 x 6144, 6144 x 1536) on `--tokens`
rows (514 = CFG batch 2 x (256 latent tokens + 1 global token)): the float paths (fp32, bf16), every weight-only
path of `quant.kernels.WeightOnlyWeight`, and the int8 paths (W8A8 with static and dynamic activations, W4A8
dynamic; each CPU kernel this torch has) with the activation quantizers, the rotated presets' activation rotation
and dynamic's output rescale alone. All timed interleaved (one call of each per round), median milliseconds, so a
busy moment on a shared machine slows one round, not one path. Torch loads in `main`, after OMP_WAIT_POLICY
defaults to PASSIVE (idle threads sleep rather than spin on a shared machine).
"""
from __future__ import annotations

import argparse
import os

SAO_LINEAR_SHAPES = ((1536, 1536), (1536, 6144), (6144, 1536))  # (in, out): attention/cross, ff in, ff out


def layer_paths(tokens: int, k: int, n: int) -> dict:
    """name -> zero-argument call of each path for one (tokens, k) @ (k, n) layer with bias."""
    import torch
    import torch.nn.functional as F

    from quant import kernels
    from quant.primitives import pack_int4, quantize_weight, unpack_int4
    from quant.recipes import ROTATION_BLOCK
    from quant.rotation import MATMUL_BLOCK, hadamard, rotate

    g = torch.Generator().manual_seed(k + n)
    x = torch.randn(tokens, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.02
    bias = torch.randn(n, generator=g) * 0.02
    x16, w16, bias16 = x.bfloat16(), w.bfloat16(), bias.bfloat16()
    codes8, scale8 = quantize_weight(w, 8)
    codes4, scale4 = quantize_weight(w, 4)
    act_scale = x.abs().amax() / 127
    paths = {"fp32 F.linear": lambda: F.linear(x, w, bias), "bf16 F.linear": lambda: F.linear(x16, w16, bias16)}
    stored4 = pack_int4(codes4)
    stored_codes = {8: lambda: codes8, 4: lambda: unpack_int4(stored4)}  # "dequant" pays the unpacking per call
    for bits, scale in ((8, scale8), (4, scale4)):
        for path in ("resident", "dequant", "packed"):
            dtype = kernels.weight_only_dtype(path, "cpu", torch.float32)
            prepared = kernels.WeightOnlyWeight(stored_codes[bits], scale, bits, path, dtype)
            paths[f"W{bits}A16 {path} ({str(dtype).removeprefix('torch.')})"] = \
                lambda p=prepared: p.linear(x, bias)
    int8_kernels = ["int_mm"] + (["onednn"] if kernels.onednn_available() else [])
    for kernel in int8_kernels:
        prepared = kernels.PreparedWeight(codes8, scale8[:, 0], kernel, owns_codes=False)
        paths[f"W8A8 {kernel} static"] = lambda p=prepared: p.linear(x, 8, act_scale, bias)
        paths[f"W8A8 {kernel} dynamic"] = lambda p=prepared: p.linear(x, 8, None, bias)
        # 4-bit codes in the same int8 GEMM: on AVX2 they cannot saturate, so oneDNN takes them in one pass
        prepared = kernels.PreparedWeight(codes4, scale4[:, 0], kernel, owns_codes=False)
        paths[f"W4A8 {kernel} dynamic"] = lambda p=prepared: p.linear(x, 8, None, bias)
    paths["quantize per tensor (static)"] = lambda: kernels.quantize_per_tensor(x, act_scale, 8, unsigned=True)
    paths["quantize per token (dynamic)"] = lambda: kernels.quantize_per_token(x, 8, unsigned=True)
    # the rotated presets' activation rotation (quant.rotation.rotate), and the single matmul it replaces
    block = ROTATION_BLOCK
    paths[f"rotate (Hadamard {block}: H_{MATMUL_BLOCK} matmul + butterflies)"] = lambda: rotate(x, block)
    paths[f"rotate as one matmul by H_{block}"] = lambda: (x.view(-1, block) @ hadamard(block)).view(x.shape)
    y, token_scale = torch.randn(tokens, n, generator=g), kernels.quantize_per_token(x, 8)[1]
    # what dynamic adds after oneDNN's GEMM (static's scale and bias ride in its epilogue): one pass over the output
    paths["per-token scale + bias on the output (dynamic)"] = lambda: torch.addcmul(bias, y, token_scale)
    return paths


def kernel_table(tokens: int = 514, reps: int = 7) -> dict[str, dict[str, float]]:
    """{"K x N": {path: median ms}} for each SAO linear shape."""
    import torch

    from bench.machine import interleaved_median_seconds

    table = {}
    with torch.no_grad():
        for k, n in SAO_LINEAR_SHAPES:
            paths = layer_paths(tokens, k, n)
            for call in paths.values():  # warm-up
                call()
            seconds = interleaved_median_seconds(paths, reps)
            table[f"{k} x {n}"] = {name: 1e3 * s for name, s in seconds.items()}
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=514, help="rows of the activation (default: SAO's CFG batch)")
    parser.add_argument("--reps", type=int, default=7, help="interleaved rounds")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # OpenMP reads it when torch loads, just below
    from bench.machine import machine_info

    machine = machine_info()
    print(f"{machine['cpu']}, ISA {', '.join(machine['isa'])}, torch {machine['torch']}, "
          f"{machine['torch_threads']} threads; int8: {machine['int8_kernel']}; weight-only: "
          f"{machine['weight_only_kernel']}")
    table = kernel_table(args.tokens, args.reps)
    shapes = list(table)
    print(f"\nms per call, {args.tokens} tokens, median of {args.reps} interleaved rounds\n")
    print("| path | " + " | ".join(f"{s}" for s in shapes) + " |")
    print("|---|" + "---:|" * len(shapes))
    for name in table[shapes[0]]:
        print(f"| {name} | " + " | ".join(f"{table[s][name]:.2f}" for s in shapes) + " |")


if __name__ == "__main__":
    main()
