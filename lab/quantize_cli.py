"""Command line over `quant` for stable-audio-tools models (console script `ptq-quantize`).

    ptq-quantize presets
    ptq-quantize quantize --model-config M.json --ckpt-path M.safetensors --preset w8a8-sqd --out Q.safetensors \
        [--calib-prompts prompts.txt --steps 25 --seconds 10]
    ptq-quantize memory --sao-shape [--preset w4a8-dynamic+lora]
    ptq-quantize memory --model-config M.json [--preset ...]

Models are loaded exactly as the app loads them (`lab.sat.load_model`), so a file written here is served by
`ptq-lab --quantized FILE` and the other way round.
"""
import argparse
import sys
from pathlib import Path

import torch

from lab import sat
from lab.quantized import calibrate
from lab.resources import read_prompts
from quant import PRESETS, CalibrationStats, find_dit, get_recipe, memory_report, quantize_, save


def cmd_presets(args) -> None:
    print(f"{'preset':<24} {'W':>2} {'A':>2}  {'method':<12} {'groups':>6} {'lora':>4}  {'backend':<9} calibration")
    for name, r in PRESETS.items():
        print(f"{name:<24} {r.w_bits:>2} {r.a_bits:>2}  {r.method:<12} {r.timestep_groups:>6} {r.lora_rank:>4}  "
              f"{r.backend:<9} {'yes' if r.needs_calibration else 'no'}")


def cmd_quantize(args) -> None:
    recipe = get_recipe(args.preset, **({"backend": args.backend} if args.backend else {}))
    loaded = sat.load_model(model_config=args.model_config, ckpt_path=args.ckpt_path)
    stats = None
    if args.stats_in:
        stats = CalibrationStats.load(args.stats_in)
    elif recipe.needs_calibration:
        if args.calib_prompts is None:
            raise SystemExit(f"preset {recipe.name} calibrates: pass --calib-prompts FILE (one prompt per line) "
                             "or --stats-in STATS.safetensors")
        prompts = read_prompts(args.calib_prompts)
        if not prompts:
            raise SystemExit(f"{args.calib_prompts} holds no prompts")
        prompts = prompts[:args.max_prompts] if args.max_prompts else prompts
        seconds = args.seconds or loaded.seconds
        print(f"calibrating on {len(prompts)} prompts x {args.steps or loaded.sampling.steps} steps "
              f"({seconds:g} s each)", file=sys.stderr)
        stats = calibrate(loaded, prompts, steps=args.steps, seconds=seconds, cfg_scale=args.cfg_scale)
        if args.stats_out:
            stats.save(args.stats_out)
    model = loaded.model
    quantize_(model, recipe, stats, progress=True)
    save(model, recipe, args.out)
    print(memory_report(model).to_markdown(per_layer=args.per_layer))
    print(f"\nwrote {args.out}")


def _meta_dit(args):
    """A DiT of the requested shape on the meta device: memory depends only on shapes and dtypes."""
    if args.sao_shape:
        return sat.random_dit(sat.SAO_DIT, device="meta")
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

    q = sub.add_parser("quantize", help="calibrate (if needed), quantize and save a SAT model")
    q.add_argument("--model-config", type=_existing_file, required=True, help="SAT model_config.json")
    q.add_argument("--ckpt-path", type=_existing_file, required=True, help="checkpoint (.safetensors or .ckpt)")
    q.add_argument("--preset", required=True, choices=list(PRESETS), metavar="PRESET",
                   help="one of: " + ", ".join(PRESETS))
    q.add_argument("--backend", choices=["simulated", "integer"], help="override the preset's backend")
    q.add_argument("--out", type=Path, required=True, help="output .safetensors")
    q.add_argument("--calib-prompts", type=_existing_file, help="calibration prompts, one per line")
    q.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0 = all)")
    q.add_argument("--steps", type=int, help="sampler steps per calibration prompt (default: the model's)")
    q.add_argument("--seconds", type=float, help="audio length per calibration run (default: the model's)")
    q.add_argument("--cfg-scale", type=float, help="CFG scale while calibrating (default: the model's)")
    q.add_argument("--stats-in", type=_existing_file, help="reuse calibration statistics instead of calibrating")
    q.add_argument("--stats-out", type=Path, help="also save the calibration statistics here")
    q.add_argument("--per-layer", action="store_true", help="print the memory report per layer")
    q.set_defaults(func=cmd_quantize)

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
