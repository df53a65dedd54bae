"""Command line over `quant` for stable-audio-tools models (console script `ptq-quantize`).

    ptq-quantize presets
    ptq-quantize calibrate --model-config M.json --ckpt-path M.safetensors --out STATS.safetensors \
        [--calib-prompts prompts.txt --prompt-count 4 --steps 25 --seconds 5]
    ptq-quantize quantize --model-config M.json --ckpt-path M.safetensors --preset w8a8-sqd --out Q.safetensors \
        [--stats-in STATS.safetensors | calibration options as above, --stats-out STATS.safetensors]
    ptq-quantize check --model-config M.json --ckpt-path M.safetensors Q.safetensors [...]
    ptq-quantize memory --sao-shape [--preset w4a8-dynamic+lora]
    ptq-quantize memory --model-config M.json [--preset ...]

Models are loaded, calibrated (same plan: `lab.calibration.CalibrationPlan.default`, same prompt file) and saved
exactly as the app does, so a file written here is served by `ptq-lab --quantized FILE`, statistics by
`ptq-lab --calibration-stats FILE`, and the app's cached files load here.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from lab import sat
from lab.calibration import CalibrationPlan, check_stats, read_stats
from lab.quantized_files import load_quantized, save_quantized
from lab.resources import read_prompts
from lab.settings import Settings
from quant import PRESETS, CalibrationStats, find_dit, get_recipe, memory_report, quantize_


def cmd_presets(args) -> None:
    print(f"{'preset':<24} {'W':>2} {'A':>2}  {'method':<12} {'groups':>6} {'lora':>4}  {'backend':<9} calibration")
    for name, r in PRESETS.items():
        print(f"{name:<24} {r.w_bits:>2} {r.a_bits:>2}  {r.method:<12} {r.timestep_groups:>6} {r.lora_rank:>4}  "
              f"{r.backend:<9} {'yes' if r.needs_calibration else 'no'}")


def _calibrate(args, loaded: sat.LoadedModel) -> CalibrationStats:
    """Statistics under the app's plan, any part of it overridden by the flags."""
    prompts = read_prompts(args.calib_prompts or Settings.from_env().calibration_prompts)
    plan = CalibrationPlan.default(loaded, prompts, count=args.prompt_count, steps=args.steps, seconds=args.seconds,
                                   cfg_scale=args.cfg_scale, batch=args.batch)
    print(f"calibrating on {plan.describe()}", file=sys.stderr)
    started = time.perf_counter()
    stats = plan.run(loaded)
    print(f"calibrated in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return stats


def _load(args) -> sat.LoadedModel:
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    return sat.load_model(model_config=args.model_config, ckpt_path=args.ckpt_path, device=device)


def cmd_calibrate(args) -> None:
    loaded = _load(args)
    stats = _calibrate(args, loaded)
    stats.save(args.out)
    print(f"{stats.forwards} DiT forwards, {len(stats.timesteps)} timesteps, {len(stats.absmax)} layers\n"
          f"wrote {args.out}")


def cmd_quantize(args) -> None:
    recipe = get_recipe(args.preset, **({"backend": args.backend} if args.backend else {}))
    loaded = _load(args)
    stats = None
    if args.stats_in:
        stats = read_stats(args.stats_in)
        check_stats(stats, loaded.model, f"calibration statistics {args.stats_in}")
    elif recipe.needs_calibration:
        stats = _calibrate(args, loaded)
        if args.stats_out:
            stats.save(args.stats_out)
    model = loaded.model
    quantize_(model, recipe, stats, progress=True)
    save_quantized(model, recipe, args.out)
    print(memory_report(model).to_markdown(per_layer=args.per_layer))
    print(f"\nwrote {args.out} (the quantized DiT; the rest of the model comes from the checkpoint)")


def cmd_check(args) -> None:
    loaded = _load(args)
    for path in args.files:
        model, recipe = load_quantized(loaded, path)
        print(f"{path}: {recipe.name}, fits {loaded.model_id}\n{memory_report(model).to_markdown()}\n")


def _meta_dit(args):
    """A DiT of the requested shape on the meta device: memory depends only on shapes and dtypes."""
    if args.sao_shape:
        return sat.build_dit(sat.SAO_DIT, device="meta")
    with torch.device("meta"):
        return find_dit(sat.build_model(sat.read_config(args.model_config)))


def cmd_memory(args) -> None:
    if args.preset:
        recipe = get_recipe(args.preset)
        dit = _meta_dit(args)
        quantize_(dit, recipe, CalibrationStats.placeholder(dit, recipe.timestep_groups), progress=True)
        print(memory_report(dit).to_markdown(per_layer=args.per_layer))
        return
    from tqdm.auto import tqdm
    fp = memory_report(_meta_dit(args))
    print(f"{len(fp.layers)} linear layers, {fp.linear_fp32_bytes / 4 / 1e9:.3f} B parameters, "
          f"fp32 {fp.linear_fp32_bytes / 2**20:.0f} MiB, fp16 {fp.linear_fp16_bytes / 2**20:.0f} MiB\n")
    rows = []
    for name, recipe in tqdm(PRESETS.items(), desc="presets", unit="preset"):
        dit = _meta_dit(args)
        quantize_(dit, recipe, CalibrationStats.placeholder(dit, recipe.timestep_groups))
        report = memory_report(dit)
        rows.append((name, report.linear_bytes / 2**20, report.ratio_fp32, report.ratio_fp16))
    print("| preset | linears MiB | x fp32 | x fp16 |\n|---|---:|---:|---:|")
    for name, mib, r32, r16 in rows:
        print(f"| {name} | {mib:.0f} | {r32:.3f} | {r16:.3f} |")


def _existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value}")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptq-quantize", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("presets", help="list the named recipes").set_defaults(func=cmd_presets)

    def model_files(command):
        command.add_argument("--model-config", type=_existing_file, required=True, help="SAT model_config.json")
        command.add_argument("--ckpt-path", type=_existing_file, required=True,
                             help="checkpoint (.safetensors or .ckpt)")
        command.add_argument("--device", default="auto", help="torch device (default: cuda when available)")

    def model_and_calibration(command):
        model_files(command)
        calibration = command.add_argument_group("calibration (default: the app's plan for this model)")
        calibration.add_argument("--calib-prompts", type=_existing_file,
                                 help="prompts, one per line (default: $LAB_CALIBRATION_PROMPTS or the project's)")
        calibration.add_argument("--prompt-count", type=int, help="prompts used, spread over the file")
        calibration.add_argument("--steps", type=int, help="sampler steps per prompt")
        calibration.add_argument("--seconds", type=float, help="audio length per prompt")
        calibration.add_argument("--cfg-scale", type=float, help="CFG scale (default: the model's)")
        calibration.add_argument("--batch", type=int, help="prompts per sampler call")

    c = sub.add_parser("calibrate", help="record calibration statistics of a SAT model (shareable file)")
    model_and_calibration(c)
    c.add_argument("--out", type=Path, required=True, help="output .safetensors")
    c.set_defaults(func=cmd_calibrate)

    q = sub.add_parser("quantize", help="calibrate (if needed), quantize and save a SAT model's DiT")
    model_and_calibration(q)
    q.add_argument("--preset", required=True, choices=list(PRESETS), metavar="PRESET",
                   help="one of: " + ", ".join(PRESETS))
    q.add_argument("--backend", choices=["simulated", "integer"], help="override the preset's backend")
    q.add_argument("--out", type=Path, required=True, help="output .safetensors")
    q.add_argument("--stats-in", type=_existing_file, help="reuse calibration statistics instead of calibrating")
    q.add_argument("--stats-out", type=Path, help="also save the calibration statistics here")
    q.add_argument("--per-layer", action="store_true", help="print the memory report per layer")
    q.set_defaults(func=cmd_quantize)

    k = sub.add_parser("check", help="load quantized model files into a SAT model as the app would (before "
                                     "publishing one): recipe and memory, or what does not fit")
    model_files(k)
    k.add_argument("files", nargs="+", type=Path, help="files written by `ptq-quantize quantize` or the app")
    k.set_defaults(func=cmd_check)

    m = sub.add_parser("memory", help="memory report of a DiT shape (meta device: no weights needed)")
    shape = m.add_mutually_exclusive_group(required=True)
    shape.add_argument("--sao-shape", action="store_true", help="Stable Audio Open's DiT (1.06 B parameters)")
    shape.add_argument("--model-config", type=_existing_file, help="SAT model_config.json")
    m.add_argument("--preset", choices=list(PRESETS), metavar="PRESET", help="one preset in detail (default: all)")
    m.add_argument("--per-layer", action="store_true")
    m.set_defaults(func=cmd_memory)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as error:  # our clear errors: print them without a traceback
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
