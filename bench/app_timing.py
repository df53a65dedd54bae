"""Time the app's Compare-tab clips (full precision, then quantized, from the same noise, with the console's
default layer traced) at the model's defaults: the clip times a user waits for, which the DiT-forward timings of
the benchmark do not give.

    python -m bench.app_timing [RECIPE ...] [--runs N]      # default: w8a8-dynamic w8a8-sqd, 3 runs each

Builds the app's engine exactly as `make demo` does (embedded model, `lab.comparison.build_lab`), calibrates and
quantizes each recipe once (not timed), then generates each pair as `Lab.compare` does (`lab.generation.generate_pair`)
`--runs` times, recipes interleaved, and prints per run both clips' sampling times (conditioners and DiT forwards), their
ratio and each clip's decode (the same fp32 autoencoder for both, timed apart), then the median ratio per recipe (the
machine may be shared: medians of interleaved runs, not a single pair, are what to read).
Torch loads in `main`, after OMP_WAIT_POLICY defaults to PASSIVE (idle threads sleep rather than spin).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lab.generation import GenerationRequest


def default_request(lab, prompt: str = "sine tone at A4", *, steps: int | None = None) -> GenerationRequest:
    """The Compare tab's request at the model's sampler defaults (seed 1), optionally with fewer steps."""
    from lab.generation import GenerationRequest

    defaults = lab.loaded.sampling
    return GenerationRequest.from_ui(prompt=prompt, negative_prompt="", seconds=defaults.seconds or 2.0,
                                     steps=steps or defaults.steps, cfg_scale=defaults.cfg_scale,
                                     sampler=defaults.sampler_type, seed="1", defaults=defaults)


def clip_times(lab, recipe: str, request: GenerationRequest) -> dict:
    """Both clips of one comparison of `recipe` as `Lab.compare` generates them: sampling seconds each, their ratio,
    each clip's decode seconds, and the log-mel distance of the two clips."""
    from lab.generation import generate_pair

    pair = generate_pair(lab.loaded, lab.quantized.get(recipe)[0], request, trace_layer=lab.default_layer())
    fp, q = pair.full_precision.seconds_taken, pair.quantized.seconds_taken
    return {"full_precision_s": fp, "quantized_s": q, "quantized_over_full_precision": q / fp,
            "decode_s": (pair.full_precision.decode_seconds, pair.quantized.decode_seconds),
            "logmel_db": pair.logmel_db}


def main(argv=None) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # OpenMP reads it when torch loads, just below
    from lab.comparison import build_lab
    from lab.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m bench.app_timing", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", default=["w8a8-dynamic", "w8a8-sqd"])
    parser.add_argument("--prompt", default="sine tone at A4")
    parser.add_argument("--runs", type=int, default=3, help="comparisons per recipe (interleaved)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    lab = build_lab(Settings.from_env())
    print(f"model load + warm-up: {time.perf_counter() - started:.1f} s")
    request = default_request(lab, args.prompt)
    if any(not lab.quantized.ready(recipe) for recipe in args.recipes):
        print(lab.calibrate())
    for recipe in args.recipes:
        lab.quantized.get(recipe)  # quantize once: not part of a comparison
    ratios = {recipe: [] for recipe in args.recipes}
    for run in range(1, args.runs + 1):
        for recipe in args.recipes:
            times = clip_times(lab, recipe, request)
            ratios[recipe].append(times["quantized_over_full_precision"])
            print(f"{recipe} run {run}: full precision {times['full_precision_s']:.2f} s, quantized "
                  f"{times['quantized_s']:.2f} s, quantized / full precision {ratios[recipe][-1]:.2f}; decode "
                  f"{times['decode_s'][0]:.2f} s + {times['decode_s'][1]:.2f} s", flush=True)
    for recipe, values in ratios.items():
        print(f"{recipe}: quantized / full-precision clip time, median of {len(values)}: "
              f"{statistics.median(values):.2f}")


if __name__ == "__main__":
    main()
