"""Time one Compare-tab comparison of the app (full precision + quantized clip, figures included) at the
model's defaults: the number a user waits for, which the DiT-forward timings of the benchmark do not give.

    python -m bench.app_timing [RECIPE ...]        # default: w8a8-sqd

Builds the app's engine exactly as `make demo` does (embedded model), calibrates and quantizes each recipe once
(cached under runs/cache, not timed), then times two comparisons per recipe.
"""
import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as app.py does

import app  # noqa: E402  (the installed top-level module app.py)
from lab.generation import GenerationRequest  # noqa: E402
from lab.settings import Settings  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.app_timing", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", default=["w8a8-sqd"])
    parser.add_argument("--prompt", default="sine tone at A4")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    lab = app.build_lab(Settings.from_env())
    print(f"model load + warm-up: {time.perf_counter() - started:.1f} s")
    defaults = lab.loaded.sampling
    request = GenerationRequest.from_ui(prompt=args.prompt, negative_prompt="", seconds=defaults.seconds or 2.0,
                                        steps=defaults.steps, cfg_scale=defaults.cfg_scale,
                                        sampler=defaults.sampler_type, seed="1", defaults=defaults)
    for recipe in args.recipes:
        lab.quantized.get(recipe)  # calibrate + quantize once: not part of a comparison
        for run in (1, 2):
            started = time.perf_counter()
            view = lab.compare(request, recipe, lab.default_layer())
            print(f"{recipe} run {run}: {time.perf_counter() - started:.2f} s per comparison | "
                  f"{view.summary.splitlines()[0]}")


if __name__ == "__main__":
    main()
