"""Command line for listening studies.

    python -m lab.study build DEFINITION.json [--model OWNER/NAME | --model-config M.json --ckpt-path M.safetensors]
                                              [--root runs/studies] [--cache-dir DIR] [--device auto] [--yes]
    torchrun --nproc-per-node 2 -m lab.study build DEFINITION.json ...     (items split over the processes)
    python -m lab.study analyse STUDY_DIR [--csv STUDY_DIR/ratings.csv] [--out STUDY_DIR/analysis]
    python -m lab.study show STUDY_DIR
    python -m lab.study release STUDY_DIR RATER_ID

A build says what it will cost (clips, time on this machine, disk) before it starts; one estimated over 30 min
starts only with --yes. A build that stops (Ctrl-C, crash, preemption) resumes where it stopped when run again
with the same command. `release` withdraws a rater's registration (someone registered another person's
platform id first): the id may register again, the slot goes to the next arrival, the analysis excludes the
released rater's ratings.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lab.settings import Settings


def cmd_build(args) -> None:
    import torch

    from lab import sat
    from lab.quantized import QuantizedModels
    from lab.resources import read_prompts
    from lab.study.build import build_study, estimate_build
    from lab.study.definition import StudyDefinition

    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    definition = StudyDefinition.from_json(_read_text(args.definition))
    device = args.device
    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    settings = Settings.from_env()
    loaded = sat.load_model(args.model, model_config=args.model_config, ckpt_path=args.ckpt_path, device=device)
    models = QuantizedModels(loaded, cache_dir=args.cache_dir or settings.cache_dir,
                             calibration_prompts=read_prompts(args.calibration_prompts or settings.calibration_prompts),
                             calibration_steps=args.calibration_steps or settings.calibration_steps,
                             max_models=args.max_models or len(definition.conditions))
    estimate = estimate_build(definition, loaded, models)
    if rank == 0:
        print(f"{definition.study_id}: {estimate.describe()}", file=sys.stderr)
    estimate.check_confirmed(args.yes, "add --yes")
    manifest = build_study(definition, loaded, models, args.root, rank=rank, world_size=world_size,
                           progress=not args.no_progress)
    if rank == 0:
        print(describe(manifest.study_dir))


def cmd_analyse(args) -> None:
    from lab.study import analyse

    study_dir = Path(args.study_dir)
    report = analyse(args.csv or study_dir / "ratings.csv", args.out or study_dir / "analysis")
    print(report.markdown)
    print(f"wrote {report.report_path} and {report.plot_path}", file=sys.stderr)


def cmd_show(args) -> None:
    print(describe(args.study_dir))


def cmd_release(args) -> None:
    import time

    from lab.study.manifest import load_manifest
    from lab.study.raters import release

    manifest = load_manifest(args.study_dir, verify=False)
    record = release(manifest.study_dir, args.rater_id, time.time())
    print(f"released {args.rater_id} of {manifest.study_id}: their link no longer works, the id "
          f"{record['platform_id'] or '(anonymous)'} may register again, slot {record['slot']} goes to the next "
          "arrival, and the analysis excludes their ratings.")


def describe(study_dir: str | Path) -> str:
    """A human summary of a built study, its files verified."""
    from lab.study.manifest import load_manifest
    from lab.study.raters import read_raters
    from lab.study.store import RatingsStore

    manifest = load_manifest(study_dir, verify=True)
    definition = manifest.definition
    sampler = ", ".join(f"{key}={value}" for key, value in manifest.sampler.items())
    lines = [f"study      {manifest.study_id}: {definition.title}",
             f"folder     {manifest.study_dir}",
             f"test       {definition.test_type} (anchor: {definition.anchor or 'none'}, "
             f"{definition.trials_per_rater or definition.n_items} trials per rater + "
             f"{definition.attention_checks} attention checks)",
             f"model      {manifest.model['id']} (fingerprint {manifest.model['fingerprint']}, "
             f"{manifest.model['sample_rate']} Hz)",
             f"sampler    {sampler}",
             "conditions " + ", ".join(f"{name} [{info['hash']}]" for name, info in manifest.recipes.items()),
             f"items      {len(manifest.items)} ({len(definition.prompts)} prompts x {len(definition.seeds)} seeds), "
             f"{sum(len(item.stimuli) for item in manifest.items)} stimuli, all files verified",
             f"raters     {len(read_raters(manifest.study_dir))} registered, "
             f"{len(RatingsStore(manifest).read())} rating rows"]
    return "\n".join(lines)


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"Cannot read {path}: {err.strerror}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lab.study", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="generate (or resume) a study's stimuli and manifest")
    b.add_argument("definition", type=Path, help="study definition JSON (see lab.study.definition)")
    b.add_argument("--model", help="Hugging Face model repo (default: the embedded demo model)")
    b.add_argument("--model-config", type=Path, help="local SAT model_config.json (with --ckpt-path)")
    b.add_argument("--ckpt-path", type=Path, help="local checkpoint (.safetensors or .ckpt)")
    b.add_argument("--root", type=Path, default=Settings.from_env().studies_dir,
                   help="folder of studies (default: $LAB_STUDIES_DIR or runs/studies, where the app serves them)")
    b.add_argument("--cache-dir", type=Path, help="quantized-model cache (default: $LAB_CACHE_DIR or runs/cache)")
    b.add_argument("--calibration-prompts", type=Path, help="prompts for calibrated presets, one per line")
    b.add_argument("--calibration-steps", type=int, help="sampler steps per calibration prompt")
    b.add_argument("--max-models", type=int, help="quantized models kept in memory (default: one per condition, "
                   "so none is rebuilt per item; lower it when memory is short)")
    b.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda:$LOCAL_RANK when available)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--yes", action="store_true", help="build even when the estimate is over 30 minutes")
    b.set_defaults(func=cmd_build)

    a = sub.add_parser("analyse", help="post-screening, means, intervals and tests from the ratings")
    a.add_argument("study_dir", type=Path)
    a.add_argument("--csv", type=Path, help="ratings CSV (default: STUDY_DIR/ratings.csv)")
    a.add_argument("--out", type=Path, help="output folder (default: STUDY_DIR/analysis)")
    a.set_defaults(func=cmd_analyse)

    s = sub.add_parser("show", help="summary of a built study, its files verified")
    s.add_argument("study_dir", type=Path)
    s.set_defaults(func=cmd_show)

    r = sub.add_parser("release", help="withdraw a rater (e.g. someone took another person's id): frees the id "
                                       "and the slot, and the analysis excludes their ratings")
    r.add_argument("study_dir", type=Path)
    r.add_argument("rater_id", help="as in raters.json and the ratings' rater_id column")
    r.set_defaults(func=cmd_release)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as error:  # our clear errors (ModelLoadError and StudyError included): no traceback
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
