"""How few calibration forwards suffice: fidelity of calibrated recipes on the demo model as the calibration set
shrinks (prompts x steps x clip length), against full precision from the same noise.

    .venv/bin/python scripts/calibration_size.py [--out runs/calibration-size.json]

Evaluation as in the benchmark's fidelity section (bench.fidelity): its 6 prompts at the model's own sampler
settings and seed, audio SNR in dB (mean over the prompts). Each size calibrates with
`lab.calibration.CalibrationPlan.default` (prompts spread over assets/calibration_prompts.txt, batches of 4).
"""
import argparse
import json
import os
import time
from pathlib import Path

from lab.resources import CALIBRATION_PROMPTS, ROOT, read_prompts

RECIPES = ("w8a8-static", "w8a8-smoothquant", "w8a8-sqd")
# (prompts, steps, seconds): the old app default first (every prompt, the demo model's whole 2.048 s clip), the
# present default (lab.calibration: 4 prompts x 25 steps, 64 DiT tokens = 1.024 s) last
SIZES = ((24, 25, 2.048), (8, 25, 2.048), (4, 25, 2.048), (4, 12, 2.048), (4, 8, 2.048), (2, 25, 2.048),
         (4, 25, 1.024))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "calibration-size.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # OpenMP reads it when torch loads, just below
    from bench.config import EVAL_SEED
    from bench.fidelity import build_variant, compare, fidelity_prompts
    from bench.sampling import generate_batch
    from lab import sat
    from lab.calibration import CalibrationPlan

    loaded = sat.load_model()
    prompts = fidelity_prompts(1)
    reference = generate_batch(loaded.model, loaded, prompts, seed=EVAL_SEED, settings=loaded.sampling)
    calibration_prompts = read_prompts(CALIBRATION_PROMPTS)
    rows = []
    print(f"| prompts | steps | seconds | DiT forwards | calibration s | {' | '.join(RECIPES)} |")
    print("|---:|---:|---:|---:|---:|" + "---:|" * len(RECIPES))
    for count, steps, seconds in SIZES:
        plan = CalibrationPlan.default(loaded, calibration_prompts, count=count, steps=steps, seconds=seconds)
        started = time.perf_counter()
        stats = plan.run(loaded, progress=False)
        calibration_seconds = time.perf_counter() - started
        snr = {}
        for recipe in RECIPES:
            model, _ = build_variant(loaded, recipe, stats)
            batch = generate_batch(model, loaded, prompts, seed=EVAL_SEED, settings=loaded.sampling)
            snr[recipe] = round(compare(reference, batch, loaded.sample_rate)["snr_db"], 2)
        rows.append({"prompts": count, "steps": steps, "seconds": plan.seconds, "forwards": plan.forwards,
                     "calibration_seconds": round(calibration_seconds, 1), "snr_db": snr})
        print(f"| {count} | {steps} | {plan.seconds:g} | {plan.forwards} | {calibration_seconds:.1f} | "
              + " | ".join(f"{snr[r]:.1f}" for r in RECIPES) + " |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": loaded.model_id, "evaluation_prompts": prompts,
                                    "sampling": loaded.sampling.__dict__, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
