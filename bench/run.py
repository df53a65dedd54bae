"""The benchmark: the paper's table on what runs here, plus speed and memory at Stable Audio Open's scale.

    python -m bench                        # full run, ~30 min on 2 cores -> results/results.{json,md}, chart.html
    python -m bench --quick --out /tmp/b   # tiny random models, few prompts/steps/recipes (what the tests run)
    python -m bench --recipes w8a8-sqd,w4a8-sqd+lora --skip-speed --ratings ratings/ratings.csv

This module is the command line (`ptq-bench`, `python -m bench`) and the order of the sections: memory and
speed at SAO's shape (with torchao's int8 config beside it when torchao is installed), fidelity on the evaluated model, studies, CLAP, MOS, with the results saved after each
one. The `bench` package's docstring says which module measures what.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import quant
from bench.config import BENCH_RECIPES, FLOAT_ROWS, BenchConfig
from bench.external import clap_metrics, mos_rows
from bench.fidelity import fidelity_rows, prepare_fidelity
from bench.machine import load_average, machine_info
from bench.report import NOTES, write_outputs
from bench.shape import memory_at_shape, speed_at_shape
from bench.studies import mixed_precision_study, sensitivity_study, sqd_sweep
from bench.targets import add_speedups, check_targets, profile_name
from bench.torchao import torchao_speed

COMMAND = "python -m bench"


def run(cfg: BenchConfig, command: str = COMMAND) -> dict:
    """Run every section `cfg` asks for and write results.json / results.md / chart.html into cfg.out."""
    started = time.time()
    sections: dict[str, float] = {}
    results = {
        "meta": {"command": command, "quick": cfg.quick,
                 "started_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(),
                 "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                 "section_seconds": sections, "load_average_start": load_average()},
        "rows": {row: {} for row in cfg.rows}, "targets": [], "notes": list(NOTES)}
    rows = results["rows"]

    def save(chart: bool = False):
        """Write everything measured so far: a crash or an interruption later loses nothing."""
        results["meta"]["duration_s"] = time.time() - started
        results["meta"]["load_average_end"] = load_average()
        add_speedups(rows)
        results["targets"] = check_targets(rows, profile_name(results["meta"]["machine"]))
        write_outputs(results, cfg.out, chart=chart)

    @contextlib.contextmanager
    def section(name: str, chart: bool = False):
        start = time.time()
        yield
        sections[name] = round(time.time() - start, 1)
        save(chart)

    with section("memory"):
        for row, memory in memory_at_shape(cfg.dit_shape, cfg.rows, progress=cfg.progress).items():
            rows[row]["memory_sao"] = memory
    if not cfg.skip_speed:
        with section("speed"):
            for row, speed in speed_at_shape(cfg):
                rows[row]["speed"] = speed
                save()
            results["torchao"] = torchao_speed(cfg.dit_shape, cfg.latent_tokens, cfg.cond_tokens, cfg.reps)
    context = None
    if not cfg.skip_fidelity:
        with section("fidelity"):
            context = prepare_fidelity(cfg)
            settings = context.settings
            results["meta"]["fidelity_model"] = (
                f"{context.loaded.model_id}, {len(context.prompts)} held-out prompts x {settings.steps} steps "
                f"({settings.sampler_type}, cfg {settings.cfg_scale}, {settings.seconds:g} s), calibrated on "
                f"{len(context.calibration)} stratified prompts x {settings.steps} steps "
                f"({len(context.stats.timesteps)} timesteps); gap measured on {len(context.calibration_like)} "
                "of the calibration prompts")
            results["meta"]["fidelity_prompts"] = context.prompts
            results["meta"]["calibration_prompts"] = context.calibration
            results["meta"]["calibration_like_prompts"] = context.calibration_like
            for row, result in fidelity_rows(cfg, context):
                rows[row].update(result)
                save()
        if not cfg.skip_studies:
            with section("sensitivity"):
                results["sensitivity"] = sensitivity_study(cfg, context)
            with section("mixed_precision"):
                results["mixed_precision"] = mixed_precision_study(cfg, context, results["sensitivity"]["layers"], rows)
            with section("sqd_sweep"):
                results["sqd_sweep"] = sqd_sweep(cfg, context, rows)
    with section("clap"):
        results["clap"] = clap_metrics(cfg.clap, cfg.clap_amodel, context.prompts if context else [],
                                       context.clips if context else {}, context.loaded.sample_rate if context else 0)
    with section("mos", chart=True):
        if cfg.ratings is not None:
            for row, mos in mos_rows(cfg.ratings, cfg.rows).items():
                rows[row]["mos"] = mos
    return results


def parse_args(argv=None) -> BenchConfig:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random models, 2 prompts x 5 steps, 7 recipes (what the test runs)")
    parser.add_argument("--out", type=Path, help="output folder (default: results/, or runs/bench-quick with --quick)")
    parser.add_argument("--recipes", help=f"comma-separated presets (default: all {len(BENCH_RECIPES)}); "
                                          "fp32 and bf16 are always included")
    parser.add_argument("--ratings", type=Path, help="ratings CSV of the app: adds MOS with 95%% CI per row")
    parser.add_argument("--clap", type=Path, help="LAION-CLAP checkpoint: adds CLAP score and FAD per row")
    parser.add_argument("--clap-amodel", default="HTSAT-tiny", help="CLAP audio encoder of that checkpoint")
    parser.add_argument("--skip-speed", action="store_true", help="skip the SAO-shape DiT forward timings")
    parser.add_argument("--skip-fidelity", action="store_true", help="skip generation (and the studies)")
    parser.add_argument("--skip-studies", action="store_true", help="skip sensitivity, mixed precision, sqd sweep")
    parser.add_argument("--reps", type=int, help="timed DiT forwards per row (default 3; quick 1)")
    parser.add_argument("--prompts-per-family", type=int,
                        help="held-out fidelity prompts per caption family (default 2: 12 prompts)")
    parser.add_argument("--calibration-prompts", type=int,
                        help="calibration prompts, stratified over the caption grammar (default 18)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model's generation.json)")
    parser.add_argument("--model", help="model to evaluate: Hugging Face repo id (default: embedded demo model)")
    parser.add_argument("--model-config", help="local SAT model_config.json (with --ckpt-path)")
    parser.add_argument("--ckpt-path", help="local checkpoint (with --model-config)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = parser.parse_args(argv)

    overrides = {key: value for key, value in dict(
        out=args.out, ratings=args.ratings, clap=args.clap, clap_amodel=args.clap_amodel, skip_speed=args.skip_speed,
        skip_fidelity=args.skip_fidelity, skip_studies=args.skip_studies, reps=args.reps,
        prompts_per_family=args.prompts_per_family, calibration_prompts=args.calibration_prompts, steps=args.steps, model=args.model,
        model_config=args.model_config, ckpt_path=args.ckpt_path, progress=not args.no_progress).items()
        if value is not None}
    if args.recipes:
        names = tuple(dict.fromkeys(n.strip() for n in args.recipes.split(",") if n.strip() not in ("", *FLOAT_ROWS)))
        for name in names:
            quant.get_recipe(name)  # ValueError listing the valid presets
        overrides["recipes"] = names
    for key in ("reps", "prompts_per_family", "calibration_prompts", "steps"):
        if key in overrides and overrides[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {overrides[key]}")
    if args.ratings is not None and not args.ratings.is_file():
        raise ValueError(f"--ratings: no such file {args.ratings}")
    return BenchConfig.quick_defaults(**overrides) if args.quick else BenchConfig(**overrides)


def main(argv=None) -> None:
    """The console script: returns nothing, so a finished run exits 0 (a returned dict would be printed and
    turned into exit code 1 by the entry-point wrapper)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = parse_args(argv)
    except ValueError as error:
        raise SystemExit(f"{COMMAND}: error: {error}") from None
    results = run(cfg, command=" ".join([COMMAND, *argv]))
    print(f"wrote {cfg.out / 'results.md'} ({results['meta']['duration_s']:.0f} s)")
