"""What a user would reach for instead: torchao's `Int8DynamicActivationInt8WeightConfig` (W8A8, dynamic per-token
activations), eager and under `torch.compile`, on the same random DiT of SAO's shape as the speed section, next to
fp32 and quant's w8a8-dynamic (integer backend, eager and compiled), all timed interleaved in one run.

    python -m bench.torchao [--reps 3] [--out torchao.json]

torchao is optional and not in requirements.txt: `pip install torchao==0.18.0 --no-deps` (a 3.4 MB wheel with no
runtime dependencies, works with torch 2.11; see docs/bench.md). Without it the result says why it did not run.
torchao quantizes the same layers as the preset (its `skip` list stays in full precision).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time

import torch

import quant
from bench.config import SAO_COND_TOKENS, SAO_LATENT_TOKENS
from bench.random_models import random_dit
from bench.shape import forward_inputs
from lab import sat
from quant.primitives import sqnr

PRESET = "w8a8-dynamic"
TORCHAO_ROWS = ("torchao int8-dynamic (eager)", "torchao int8-dynamic + torch.compile")


def torchao_version() -> str | None:
    """torchao's version when it imports with this torch, else None."""
    try:
        import torchao
    except Exception:  # not installed, or built against another torch
        return None
    return getattr(torchao, "__version__", "unknown")


def torchao_model(dit: torch.nn.Module, preset: str = PRESET) -> torch.nn.Module:
    """A copy of `dit` with torchao's int8 dynamic-activation config on the layers `preset` quantizes."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from torchao.quantization import quantize_ as torchao_quantize_

    model = copy.deepcopy(dit)
    targets = {id(layer) for layer in quant.quantization_targets(model, quant.get_recipe(preset)).values()}
    torchao_quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, _: id(m) in targets)
    return model


@torch.no_grad()
def torchao_speed(shape: dict, latent_tokens: int, cond_tokens: int, reps: int = 3) -> dict:
    """{"status", "torchao", "compile_s", "rows": {row: {"seconds", "x_fp32", "sqnr_vs_fp32_db"}}}: fp32, quant's
    w8a8-dynamic and torchao, each eager and compiled, one forward each per round, `reps` rounds after a warm-up
    (a compiled model's first call compiles, timed separately: compile_s per row)."""
    version = torchao_version()
    if version is None:
        return {"status": "not run: torchao is not installed (pip install torchao==0.18.0 --no-deps; see docs/bench.md)"}
    dit = random_dit(shape)
    x, t, kwargs = forward_inputs(shape, latent_tokens, cond_tokens)
    ao = torchao_model(dit)
    ours = quant.quantize_(copy.deepcopy(dit), PRESET)
    models = {"fp32": dit, PRESET: ours, f"{PRESET} + torch.compile": torch.compile(ours), TORCHAO_ROWS[0]: ao,
              TORCHAO_ROWS[1]: torch.compile(ao)}
    reference = dit(x, t, **kwargs)
    outputs, compile_s = {}, {}
    for name, model in models.items():  # warm-up; the compiled models compile here
        start = time.perf_counter()
        outputs[name] = model(x, t, **kwargs)
        if name.endswith("torch.compile"):
            compile_s[name] = time.perf_counter() - start
    seconds = {name: [] for name in models}
    for _ in range(max(1, reps)):
        for name, model in models.items():
            start = time.perf_counter()
            model(x, t, **kwargs)
            seconds[name].append(time.perf_counter() - start)
    fp32 = statistics.median(seconds["fp32"])
    rows = {name: {"seconds": statistics.median(s), "x_fp32": fp32 / statistics.median(s),
                   "sqnr_vs_fp32_db": None if name == "fp32" else sqnr(reference, outputs[name])}
            for name, s in seconds.items()}
    del models, ao
    gc.collect()
    return {"status": "ok", "torchao": version, "compile_s": compile_s, "reps": reps, "rows": rows}


def torchao_markdown(result: dict) -> list[str]:
    """The section's lines for results.md."""
    lines = ["", "## What you would use instead: torchao", ""]
    if result.get("status") != "ok":
        return lines + [result.get("status", "not run")]
    compiled = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result["compile_s"].items())
    lines += [f"torchao {result['torchao']} `Int8DynamicActivationInt8WeightConfig` on the same SAO-shape DiT and "
              f"layers as `{PRESET}`, median of {result['reps']} interleaved forwards; first calls, which compile "
              f"and are not in the times: {compiled}.", "",
              "| row | fwd (s) | x fp32 | SQNR vs fp32 dB |", "|---|---:|---:|---:|"]
    for name, row in result["rows"].items():
        sqnr = "ref" if row["sqnr_vs_fp32_db"] is None else f"{row['sqnr_vs_fp32_db']:.1f}"
        lines.append(f"| {name} | {row['seconds']:.3f} | {row['x_fp32']:.2f} | {sqnr} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.torchao", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds (one forward per row each)")
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    result = torchao_speed(dict(sat.SAO_DIT), SAO_LATENT_TOKENS, SAO_COND_TOKENS, args.reps)
    print("\n".join(torchao_markdown(result)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
