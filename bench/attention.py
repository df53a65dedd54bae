"""Attention timings at SAO's width: float `scaled_dot_product_attention` against `quant.attention`'s int8
attention, and the lower bounds of any int8 attention computed with eager torch ops.

    python -m bench.attention [--reps 7] [--keys 256,130] [--threads 2]

One attention call of SAO's DiT: CFG batch 2 x 24 heads of 64, 256 queries (the latent tokens), 256 keys
(self-attention) or 130 (cross-attention on the prompt). Rows:
  fp32 / bf16 SDPA             torch's fused attention, the float baselines;
  int8 integer / simulated     `quant.attention.int8_attention` as the recipe runs it;
  int8 without its GEMMs       the same call with both int8 matmuls replaced by a ready result: what its
                               quantizers, scales and softmax cost alone;
  softmax of S (float32)       the scores' softmax alone: an eager attention that materializes S pays it;
  P to int8 / uint8            quantizing P per token as `int8_attention` does (`quant.kernels`), and at one
                               fixed scale in one fused op (the cheapest): an int8 PV product needs one;
  int8 GEMMs                   QK^T and PV alone, two calls per batch and head (torch has no batched int8
                               matmul on CPU): `torch._int_mm`, or oneDNN's int8 linear, which multiplies a
                               prepacked weight: K and V change at every call, so they are prepacked at each;
  fp32 GEMMs                   the float products of the same shapes, batched (`torch.bmm`).
All timed interleaved (one call of each per round), median milliseconds. Torch loads in `main`, after
OMP_WAIT_POLICY defaults to PASSIVE (idle threads sleep rather than spin on a shared machine).
"""
from __future__ import annotations

import argparse
import os

BATCH, HEADS, HEAD_DIM, QUERIES = 2, 24, 64, 256


def attention_paths(keys: int, queries: int = QUERIES, heads: int = HEADS) -> dict:
    """name -> zero-argument call of each path for one attention of BATCH x `heads`, `queries` x `keys`."""
    import torch
    import torch.nn.functional as F

    from quant import attention
    from quant.kernels import quantize_per_token

    g = torch.Generator().manual_seed(keys)
    q, k, v = (torch.randn(BATCH, heads, n, HEAD_DIM, generator=g) for n in (queries, keys, keys))
    q16, k16, v16 = (t.bfloat16() for t in (q, k, v))
    scores = (q @ k.mT).mul_(HEAD_DIM ** -0.5)
    probs = scores.softmax(dim=-1)
    ready = {t.shape: t for t in (scores.reshape(-1, queries, keys), torch.randn(BATCH * heads, queries, HEAD_DIM))}

    def without_gemms():
        original = attention._batched_int_matmul
        attention._batched_int_matmul = lambda a, b: ready[(*a.shape[:2], b.shape[2])].clone()  # its float copy
        try:
            return attention.int8_attention(q, k, v, "integer")
        finally:
            attention._batched_int_matmul = original

    paths = {"fp32 SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
             "bf16 SDPA": lambda: F.scaled_dot_product_attention(q16, k16, v16),
             "int8 integer": lambda: attention.int8_attention(q, k, v, "integer"),
             "int8 simulated": lambda: attention.int8_attention(q, k, v, "simulated"),
             "int8 without its GEMMs": without_gemms,
             "softmax of S (float32)": lambda: scores.softmax(dim=-1),
             "P to int8, per token (quant.kernels)": lambda: quantize_per_token(probs.reshape(-1, keys), 8),
             "P to uint8, fixed scale 1/255": lambda: torch.quantize_per_tensor(probs, 1 / 255, 0, torch.quint8)}
    return {**paths, **gemm_paths(keys, queries, heads)}


def gemm_paths(keys: int, queries: int = QUERIES, heads: int = HEADS) -> dict:
    """The two products QK^T and PV alone: per-head int8 calls (`_int_mm`; oneDNN with prepacking) and fp32 bmm."""
    import torch

    from quant.kernels import onednn_available

    g = torch.Generator().manual_seed(keys + 1)
    heads *= BATCH
    q8, k8, v8 = (torch.randint(-127, 128, (heads, n, HEAD_DIM), dtype=torch.int8, generator=g)
                  for n in (queries, keys, keys))
    p8 = torch.randint(0, 128, (heads, queries, keys), dtype=torch.int8, generator=g)
    qf, kf, vf, pf = (t.float() for t in (q8, k8, v8, p8))
    paths = {"int8 GEMMs: _int_mm per head": lambda: [(torch._int_mm(q8[i], k8[i].t()), torch._int_mm(p8[i], v8[i]))
                                               for i in range(heads)],
             "fp32 GEMMs: bmm": lambda: (torch.bmm(qf, kf.mT), torch.bmm(pf, vf))}
    if onednn_available():
        q_u8, p_u8 = q8.view(torch.uint8) ^ 128, p8.view(torch.uint8) + 128  # codes + 128, zero point 128
        v_t = v8.mT.contiguous()
        unit = {n: (torch.ones(n), torch.zeros(n, dtype=torch.long)) for n in (keys, HEAD_DIM)}

        def onednn(x_u8, weight):
            packed = torch.ops.onednn.qlinear_prepack(weight, None)
            return torch.ops.onednn.qlinear_pointwise(x_u8, 1.0, 128, packed, *unit[weight.shape[0]], None, 1.0, 0,
                                                      torch.float32, "none", [], "")

        paths["int8 GEMMs: oneDNN per head"] = lambda: [(onednn(q_u8[i], k8[i]), onednn(p_u8[i], v_t[i]))
                                                            for i in range(heads)]
    return paths


def attention_table(keys: tuple[int, ...] = (256, 130), reps: int = 7, **shape) -> dict[int, dict[str, float]]:
    """{keys: {path: median ms}}; `shape`: attention_paths' queries and heads."""
    import torch

    from bench.machine import interleaved_median_seconds

    table = {}
    with torch.no_grad():
        for n in keys:
            paths = attention_paths(n, **shape)
            for call in paths.values():  # warm-up
                call()
            table[n] = {name: 1e3 * s for name, s in interleaved_median_seconds(paths, reps).items()}
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", default="256,130", help="key counts, comma-separated (default: self and cross)")
    parser.add_argument("--reps", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # OpenMP reads it when torch loads, just below
    import torch

    from bench.machine import machine_info

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    print(f"{machine['cpu']}, ISA {', '.join(machine['isa'])}, torch {machine['torch']}, "
          f"{torch.get_num_threads()} threads; CPU profile {machine['cpu_profile']}")
    table = attention_table(tuple(int(n) for n in args.keys.split(",")), args.reps)
    print(f"\nms per call, batch {BATCH} x {HEADS} heads of {HEAD_DIM}, {QUERIES} queries, median of {args.reps} "
          "interleaved rounds\n")
    print("| path | " + " | ".join(f"{n} keys" for n in table) + " |")
    print("|---|" + "---:|" * len(table))
    for name in next(iter(table.values())):
        print(f"| {name} | " + " | ".join(f"{row[name]:.2f}" for row in table.values()) + " |")


if __name__ == "__main__":
    main()
