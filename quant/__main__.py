"""Command line over the library.

    python -m quant presets
    python -m quant quantize --model-config M.json --ckpt-path M.safetensors --preset w8a8-sqd --out Q.safetensors \
        [--calib-prompts prompts.txt --steps 50 --seconds 10]
    python -m quant memory --sao-shape [--preset w4a8-dynamic+lora]
    python -m quant memory --model-config M.json [--preset ...]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from . import PRESETS, calibrate, get_recipe, linear_layers, memory_report, quantize_, save
from .model import find_dit
from .observers import CalibrationStats

SAO_DIT = dict(io_channels=64, embed_dim=1536, depth=24, num_heads=24, cond_token_dim=768,
               global_cond_dim=1536, project_cond_tokens=False, transformer_type="continuous_transformer")


def cmd_presets(args) -> None:
    print(f"{'preset':<24} {'W':>2} {'A':>2}  {'method':<12} {'groups':>6} {'lora':>4}  {'backend':<9} calibration")
    for name, r in PRESETS.items():
        print(f"{name:<24} {r.w_bits:>2} {r.a_bits:>2}  {r.method:<12} {r.timestep_groups:>6} {r.lora_rank:>4}  "
              f"{r.backend:<9} {'yes' if r.needs_calibration else 'no'}")


# ---- models ----------------------------------------------------------------------------------

def _read_config(path: Path) -> dict:
    """A SAT model config, with relative `tokenizer_name` paths resolved against the config's folder."""
    config = json.loads(path.read_text())
    for conditioner in config.get("model", {}).get("conditioning", {}).get("configs", []):
        name = conditioner.get("config", {}).get("tokenizer_name")
        if name and (path.parent / name).is_dir():
            conditioner["config"]["tokenizer_name"] = str(path.parent / name)
    return config


def _load_sat_model(config_path: Path, ckpt_path: Path | None):
    from stable_audio_tools.models.factory import create_model_from_config
    from stable_audio_tools.models.utils import load_ckpt_state_dict
    config = _read_config(config_path)
    model = create_model_from_config(config)
    if ckpt_path is not None:
        model.load_state_dict(load_ckpt_state_dict(str(ckpt_path)))
    return model.eval().requires_grad_(False), config


def _conditioning(model, prompt: str, seconds: float) -> dict:
    """One conditioning dict filling the model's conditioners: text ids get the prompt, numbers the timing."""
    values = {"seconds_start": 0.0, "seconds_total": seconds}
    conditioning = {}
    for key in model.conditioner.conditioners:
        conditioning[key] = values.get(key, prompt)
    return conditioning


def _sampler_loop(model, config: dict, prompts: list[str], steps: int, seconds: float, cfg_scale: float):
    from stable_audio_tools.inference.generation import generate_diffusion_cond
    sample_rate = config["sample_rate"]
    sample_size = int(seconds * sample_rate)
    if model.pretransform is not None:  # whole latent frames
        ratio = model.pretransform.downsampling_ratio
        sample_size = max(ratio, sample_size // ratio * ratio)

    def run():
        for seed, prompt in enumerate(prompts):
            generate_diffusion_cond(model, steps=steps, cfg_scale=cfg_scale, conditioning=[_conditioning(model, prompt, seconds)],
                                    sample_size=sample_size, seed=seed, device=str(next(model.parameters()).device),
                                    sampler_type="dpmpp-3m-sde", sigma_min=0.3, sigma_max=500, return_latents=True)
    return run


def cmd_quantize(args) -> None:
    recipe = get_recipe(args.preset, **({"backend": args.backend} if args.backend else {}))
    model, config = _load_sat_model(args.model_config, args.ckpt_path)
    stats = None
    if args.stats_in:
        stats = CalibrationStats.load(args.stats_in)
    elif recipe.needs_calibration:
        if args.calib_prompts is None:
            raise SystemExit(f"preset {recipe.name} calibrates: pass --calib-prompts FILE (one prompt per line) "
                             "or --stats-in STATS.safetensors")
        prompts = [line.strip() for line in args.calib_prompts.read_text().splitlines() if line.strip()]
        if not prompts:
            raise SystemExit(f"{args.calib_prompts} holds no prompts")
        prompts = prompts[:args.max_prompts] if args.max_prompts else prompts
        print(f"calibrating on {len(prompts)} prompts x {args.steps} steps ({args.seconds} s each)", file=sys.stderr)
        stats = calibrate(model, _sampler_loop(model, config, prompts, args.steps, args.seconds, args.cfg_scale))
        if args.stats_out:
            stats.save(args.stats_out)
    quantize_(model, recipe, stats, progress=True)
    save(model, recipe, args.out)
    print(memory_report(model).to_markdown(per_layer=args.per_layer))
    print(f"\nwrote {args.out}")


def _meta_dit(args):
    """A DiT of the requested shape on the meta device: memory depends only on shapes and dtypes."""
    with torch.device("meta"):
        if args.sao_shape:
            from stable_audio_tools.models.dit import DiffusionTransformer
            return DiffusionTransformer(**SAO_DIT)
        from stable_audio_tools.models.factory import create_model_from_config
        return find_dit(create_model_from_config(_read_config(args.model_config)))


def _stand_in_stats(dit, groups: int) -> CalibrationStats:
    """Calibration statistics of the right shapes (values do not change the bytes held)."""
    timesteps = [(i + 0.5) / groups for i in range(groups)]
    return CalibrationStats(timesteps, {name: torch.ones(groups, layer.in_features)
                                        for name, layer in linear_layers(dit).items()})


def cmd_memory(args) -> None:
    if args.preset:
        recipe = get_recipe(args.preset)
        dit = _meta_dit(args)
        quantize_(dit, recipe, _stand_in_stats(dit, recipe.timestep_groups), progress=True)
        print(memory_report(dit).to_markdown(per_layer=args.per_layer))
        return
    from tqdm.auto import tqdm
    fp = memory_report(_meta_dit(args))
    print(f"{len(fp.layers)} linear layers, {fp.linear_fp32_bytes / 4 / 1e9:.3f} B parameters, "
          f"fp32 {fp.linear_fp32_bytes / 2**20:.0f} MiB, fp16 {fp.linear_fp16_bytes / 2**20:.0f} MiB\n")
    rows = []
    for name, recipe in tqdm(PRESETS.items(), desc="presets", unit="preset"):
        dit = _meta_dit(args)
        quantize_(dit, recipe, _stand_in_stats(dit, recipe.timestep_groups))
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
    parser = argparse.ArgumentParser(prog="python -m quant", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("presets", help="list the named recipes").set_defaults(func=cmd_presets)

    q = sub.add_parser("quantize", help="calibrate (if needed), quantize and save a SAT model")
    q.add_argument("--model-config", type=_existing_file, required=True, help="SAT model_config.json")
    q.add_argument("--ckpt-path", type=_existing_file, help="checkpoint (.safetensors or .ckpt)")
    q.add_argument("--preset", required=True, choices=list(PRESETS), metavar="PRESET",
                   help="one of: " + ", ".join(PRESETS))
    q.add_argument("--backend", choices=["simulated", "integer"], help="override the preset's backend")
    q.add_argument("--out", type=Path, required=True, help="output .safetensors")
    q.add_argument("--calib-prompts", type=_existing_file, help="calibration prompts, one per line")
    q.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0 = all)")
    q.add_argument("--steps", type=int, default=50, help="sampler steps per calibration prompt (default 50)")
    q.add_argument("--seconds", type=float, default=10.0, help="audio length per calibration run (default 10)")
    q.add_argument("--cfg-scale", type=float, default=7.0)
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
        raise SystemExit(f"error: {error}")


if __name__ == "__main__":
    main()
