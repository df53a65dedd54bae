"""GPU check: every preset's integer path against its simulated reference, speed against bf16 and fp16, and
memory, on a random DiT of Stable Audio Open's shape on one CUDA device, then one comparison of the app (the
embedded demo model, full precision and w8a8-dynamic from the same noise). Writes one JSON.

    python -m bench.gpu_check --out gpu.json [--latent-tokens 256 --cond-tokens 130 --reps 5]   # or: make gpu-check

Short inputs (256 latent tokens, 130 conditioning tokens, CFG batch 2) and few repetitions keep it under
5 minutes on an H100-class GPU. Every model is fp32 on the GPU unless named bf16/fp16; inputs are built on
the CPU from a seeded generator and moved with an explicit dtype and device. Weight-only presets compute in
bf16 on the GPU (quant.kernels.weight_only_dtype): their integer-vs-simulated agreement is measured with both
twins under bf16 autocast, so that it compares the kernels, not bf16 against fp32. Exits with status 2 and a
message on stderr, writing nothing, where CUDA is not available.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import sys
import time

import torch

CFG_SCALE = 7.0  # SAO's default: the DiT then runs cond + uncond as one batch of 2
T = 0.5
CALIBRATION_TIMESTEPS = (0.1, 0.35, 0.6, 0.85)
MIN_SQNR_DB = 40.0  # integer vs simulated on the whole DiT: float rounding only, flips of rare codes included
APP_RECIPE = "w8a8-dynamic"  # needs no calibration: the app comparison costs two demo clips


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--latent-tokens", type=int, default=256)
    parser.add_argument("--cond-tokens", type=int, default=130)
    parser.add_argument("--reps", type=int, default=5, help="timed forwards per variant (after 2 warm-ups)")
    parser.add_argument("--presets", nargs="*", default=None, help="default: every quant.PRESETS entry")
    parser.add_argument("--app-recipe", default=APP_RECIPE, help="the app comparison's recipe ('' skips it)")
    return parser.parse_args(argv)


def inputs(shape: dict, latent_tokens: int, cond_tokens: int, dtype: torch.dtype, device: torch.device,
           seed: int = 0):
    """(x, t, kwargs) of one CFG forward: batch 1 in, the DiT doubles it for CFG. t stays float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, shape["io_channels"], latent_tokens * shape.get("patch_size", 1), generator=g)
    cond = torch.randn(1, cond_tokens, shape["cond_token_dim"], generator=g)
    global_embed = torch.randn(1, shape["global_cond_dim"], generator=g)
    def move(tensor):
        return tensor.to(device=device, dtype=dtype)
    kwargs = dict(cross_attn_cond=move(cond), global_embed=move(global_embed), cfg_scale=CFG_SCALE)
    return move(x), torch.tensor([T], dtype=torch.float32, device=device), kwargs


def time_forward(model, x, t, kwargs, reps: int) -> dict:
    """Median / min milliseconds of one forward (2 warm-ups) and the peak bytes allocated: CUDA events on a
    CUDA device; on the CPU (the test's dry run only) wall time and no peak."""
    cuda = x.is_cuda
    with torch.no_grad():
        for _ in range(2):
            model(x, t, **kwargs)
        if cuda:
            torch.cuda.synchronize(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
        times = []
        for _ in range(reps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(x, t, **kwargs)
                end.record()
                torch.cuda.synchronize(x.device)
                times.append(start.elapsed_time(end))
            else:
                start_s = time.perf_counter()
                model(x, t, **kwargs)
                times.append(1e3 * (time.perf_counter() - start_s))
    return {"ms_median": statistics.median(times), "ms_min": min(times),
            "max_memory_allocated": torch.cuda.max_memory_allocated(x.device) if cuda else None}


def agreement_autocast(device: torch.device, compute_dtype: torch.dtype):
    """Autocast to `compute_dtype` where a preset's integer path computes in 16 bits (weight-only on bf16 hardware),
    so that its simulated twin rounds alike; otherwise nothing."""
    if compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype)


def app_comparison(lab, recipe: str = APP_RECIPE, steps: int | None = None, prompt: str = "sine tone at A4") -> dict:
    """One comparison of the app's engine `lab` (`lab.comparison.build_lab`): `Lab.compare` end to end (clips,
    figures, wav files) and the two clips' generation times, at the model's sampler defaults (`steps` fewer)."""
    from bench.app_timing import clip_times, default_request

    request = default_request(lab, prompt, steps=steps)
    started = time.perf_counter()
    view = lab.compare(request, recipe, lab.default_layer())  # first call: quantizes and prepares the weights
    first = time.perf_counter() - started
    return {"recipe": recipe, "model": lab.loaded.model_id, "steps": request.steps, "compare_first_call_s": first,
            "summary": view.summary.splitlines()[0], **clip_times(lab, recipe, request)}


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args: argparse.Namespace, device: torch.device | str = "cuda", shape: dict | None = None) -> dict:
    """The whole check on `device` (a CUDA device; "cpu" with a tiny `shape` only for the test's dry run)."""
    import quant
    from bench.random_models import random_dit
    from lab import sat
    from quant.kernels import kernel_name, weight_only_dtype, weight_only_kernel_name
    from quant.primitives import sqnr

    device = torch.device(device)
    started = time.perf_counter()
    shape = sat.SAO_DIT if shape is None else shape
    dit = random_dit(shape, device=str(device))  # fp32
    assert next(dit.parameters()).device.type == device.type and next(dit.parameters()).dtype == torch.float32
    x, t, kwargs = inputs(shape, args.latent_tokens, args.cond_tokens, torch.float32, device)
    cuda = device.type == "cuda"
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "kernel": kernel_name(device),
        "weight_only_kernel": weight_only_kernel_name(device),
        "shape": {"latent_tokens": args.latent_tokens, "cond_tokens": args.cond_tokens, "batch": 2,
                  "cfg_scale": CFG_SCALE, "t": T, "reps": args.reps},
        "float": {}, "presets": {}, "errors": {},
    }
    with torch.no_grad():
        reference = dit(x, t, **kwargs).float()
    result["float"]["fp32"] = time_forward(dit, x, t, kwargs, args.reps)
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model = copy.deepcopy(dit).to(dtype)
        xd, td, kwd = inputs(shape, args.latent_tokens, args.cond_tokens, dtype, device)
        with torch.no_grad():
            out = model(xd, td, **kwd).float()
        result["float"][name] = {**time_forward(model, xd, td, kwd, args.reps), "sqnr_vs_fp32_db": sqnr(reference, out)}
        del model, out
        free()
    fastest_float = min(result["float"].values(), key=lambda row: row["ms_median"])["ms_median"]

    short_x, short_t, short_kwargs = inputs(shape, 32, args.cond_tokens, torch.float32, device, seed=1)
    stats = quant.calibrate(dit, lambda: [dit(short_x, torch.full_like(short_t, ti), **short_kwargs)
                                          for ti in CALIBRATION_TIMESTEPS], progress=False)
    for preset in args.presets or list(quant.PRESETS):
        try:
            recipe = quant.get_recipe(preset, lora_init="random", backend="integer")  # shape-only branch
            integer = quant.quantize_(copy.deepcopy(dit), recipe, stats if recipe.needs_calibration else None)
            # the simulated twin holds the very same buffers (random branch included): only the backend differs
            simulated = copy.deepcopy(integer)
            for layer in quant.quantized_layers(simulated).values():
                layer.recipe = layer.recipe.replace(backend="simulated")
            compute_dtype = torch.float32 if recipe.quantizes_activations else \
                weight_only_dtype("resident", device, torch.float32)
            with torch.no_grad(), agreement_autocast(device, compute_dtype):
                y_sim = simulated(x, t, **kwargs).float()
                del simulated
                free()
                y_int = integer(x, t, **kwargs).float()
            timing = time_forward(integer, x, t, kwargs, args.reps)
            report = quant.memory_report(integer)
            row = {
                "compute_dtype": str(compute_dtype).removeprefix("torch."),
                "sqnr_integer_vs_simulated_db": sqnr(y_sim, y_int),
                "sqnr_integer_vs_fp32_db": sqnr(reference, y_int),
                **timing,
                "speedup_vs_fastest_float": fastest_float / timing["ms_median"],
                "linear_bytes": report.linear_bytes, "linear_ratio_fp32": report.ratio_fp32,
                "model_bytes": report.model_bytes, "bytes_by_kind": report.by_kind,
            }
            row["agrees"] = row["sqnr_integer_vs_simulated_db"] >= MIN_SQNR_DB
            result["presets"][preset] = row
            print(f"{preset:22s} int-vs-sim {row['sqnr_integer_vs_simulated_db']:6.1f} dB  "
                  f"{timing['ms_median']:8.2f} ms  x{row['speedup_vs_fastest_float']:.2f} vs fastest float",
                  flush=True)
            del integer, y_sim, y_int
        except Exception as error:  # one preset failing must not lose the others' figures
            result["errors"][preset] = f"{type(error).__name__}: {error}"
            print(f"{preset:22s} ERROR {result['errors'][preset]}", file=sys.stderr, flush=True)
        free()
    result["all_agree"] = not result["errors"] and all(row["agrees"] for row in result["presets"].values())
    result["seconds"] = time.perf_counter() - started
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench.gpu_check needs a CUDA GPU, and torch.cuda.is_available() is False here (torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}). Nothing was written to {args.out}.",
              file=sys.stderr)
        raise SystemExit(2)
    result = run(args)
    if args.app_recipe:
        started = time.perf_counter()
        try:
            from lab.comparison import build_lab
            from lab.settings import Settings

            result["app"] = app_comparison(build_lab(Settings.from_env()), args.app_recipe)
        except Exception as error:  # the preset figures above are kept
            result["errors"]["app"] = f"{type(error).__name__}: {error}"
            result["all_agree"] = False
        result["seconds"] += time.perf_counter() - started
        print(f"app comparison: {result.get('app', result['errors'].get('app'))}", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out} in {result['seconds']:.0f} s; all presets agree: {result['all_agree']}")
    return 0 if result["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
